"""One of 2 processes (torch.distributed.run, gloo on the CPU) of test_trl's data-parallel check:
TRL's accelerator sees 2 processes; this rank takes its half of the saved 16-row mini-batch, runs
2 gradient-accumulation micro-batches of 4 rows through CalibRLGRPOTrainer._compute_loss, and
averages the gradients over the ranks as DDP does. Rank 0 writes the result.

    python -m torch.distributed.run --nproc_per_node=2 trl_worker.py MODEL_DIR BATCH.pt OUT.pt
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import trl_harness as h

from calibrl.integrations import trl as ctrl


def main(model_dir: str, batch_path: str, out_path: str) -> None:
    loss_type = os.environ["CALIBRL_TRL_LOSS_TYPE"]
    args = h.config(
        ctrl.CalibRLGRPOConfig,
        tempfile.mkdtemp(),
        calibrl={"preset": "paper", "lambda": 0.3},
        loss_type=loss_type,
        beta=0.05,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
    )
    trainer = ctrl.CalibRLGRPOTrainer(
        model=model_dir, reward_funcs=h.reward_a, args=args, train_dataset=h.dataset(), processing_class=h.tokenizer()
    )
    acc = trainer.accelerator
    assert acc.num_processes == 2 and dist.is_initialized(), (acc.num_processes, acc.distributed_type)
    rank = acc.process_index
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = torch.load(batch_path)
    rows = batch["completion_ids"].shape[0]
    half = rows // 2
    loss_sum = torch.zeros(())
    for k in range(2):  # micro-batches of this rank's half
        lo = rank * half + k * (half // 2)
        sl = slice(lo, lo + half // 2)
        mb = {key: (v if v.dim() == 0 else v[sl]) for key, v in batch.items()}  # num_items_in_batch: global
        loss = trainer._compute_loss(trainer.model, mb)
        loss.backward()
        loss_sum += loss.detach()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    dist.all_reduce(grads)  # DDP: the average over ranks
    grads /= acc.num_processes
    dist.all_reduce(loss_sum)  # the logged loss: the sum of the ranks' averages
    loss_sum /= acc.num_processes
    if rank == 0:
        torch.save({"grads": grads, "loss_sum": loss_sum, "world_size": acc.num_processes, "micro_batches": 2}, out_path)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
