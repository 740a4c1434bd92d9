"""A DeepSpeed training step with the CalibRL loss at any data-parallel size × gradient
accumulation (CPU accelerator, gloo):

    DS_ACCELERATOR=cpu python integration/deepspeed/example_train.py OUT_DIR [WORLD] [STAGES]

starts WORLD processes (default 2); each runs one optimizer step of its share of a global
mini-batch (its rows split into GA = 2 micro-batches) for every ZeRO stage in STAGES
(default "0,1,2,3"), and rank 0 saves the updated weights and the metrics to OUT_DIR.
Used by bindings/python/tests/test_deepspeed.py, which checks the update against the
single-process mini-batch update.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys

import torch

import calibrl
from calibrl.integrations.deepspeed import per_row_expert, train_micro_batch

VOCAB, HIDDEN, ROWS, S, GA = 20, 8, 8, 6, 2
CFG = {"preset": "paper", "entropy_coef": 0.01}
LR = 20.0  # large: the update is of the weights' size, so a wrong scale cannot hide in rounding


def ds_config(world: int, stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": ROWS // (world * GA),
        "gradient_accumulation_steps": GA,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)

    def forward(self, input_ids):
        return torch.tanh(self.embedding[input_ids]) @ self.head.t()  # logits [B, S, V]


def make_minibatch(per_row: bool = True) -> dict:
    """One global mini-batch of ROWS rows (4 prompts × 2 rollouts), the expert carried per row
    (or, ``per_row=False``, as one ``[P, S]`` row per prompt with ``expert_index`` = prompt)."""
    g = torch.Generator().manual_seed(1)
    groups = torch.arange(ROWS) // 2
    lengths = torch.randint(1, S + 1, (ROWS,), generator=g)
    mask = (torch.arange(S)[None] < lengths[:, None]).float()
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv, w, c = calibrl.group_advantages(rewards, groups)
    expert = -torch.rand(ROWS // 2, S, generator=g) * 2
    expert_mask = (torch.arange(S)[None] < torch.randint(2, S + 1, (ROWS // 2,), generator=g)[:, None]).float()
    e_lp, e_mask, e_index = per_row_expert(expert, groups, expert_mask) if per_row else (expert, expert_mask, groups)
    return {
        "input_ids": torch.randint(0, VOCAB, (ROWS, S), generator=g),
        "labels": torch.randint(0, VOCAB, (ROWS, S), generator=g),
        "inputs": calibrl.LossInputs(
            advantages=adv, weights=w, signs=c, mask=mask,
            old_logprobs=-torch.rand(ROWS, S, generator=g) * 3,
            expert_logprobs=e_lp, expert_mask=e_mask, expert_index=e_index,
            normalizers=(float(mask.sum()), float(ROWS)),  # global: the whole mini-batch
        ),
    }


def take_rows(batch: dict, rows: slice) -> dict:
    """Rows of a batch (every tensor is per row, the expert included; expert_index re-based)."""
    i = batch["inputs"]
    sub = i.map_tensors(lambda t: t[rows])
    sub.expert_index = torch.where(sub.expert_index >= 0, torch.arange(sub.expert_index.numel()), -1)
    return {"input_ids": batch["input_ids"][rows], "labels": batch["labels"][rows], "inputs": sub}


def rank_microbatches(batch: dict, rank: int, world: int) -> list[dict]:
    b = ROWS // (world * GA)
    return [take_rows(batch, slice((rank * GA + m) * b, (rank * GA + m + 1) * b)) for m in range(GA)]


def _worker(rank: int, world: int, port: int, stages: list[int], out_dir: str):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    batch = make_minibatch()
    result = {}
    for stage in stages:
        model = TinyLM()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_config(world, stage))
        metrics = [train_micro_batch(engine, mb, CFG) for mb in rank_microbatches(batch, rank, world)]
        params = [engine.module.embedding, engine.module.head]
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext():
            result[stage] = {
                "metrics": metrics,
                "global_steps": engine.global_steps,
                "embedding": params[0].detach().clone(),
                "head": params[1].detach().clone(),
            }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Teardown in order (see example_calibrl.py): collectives done, engine released, then the group.
    torch.distributed.barrier()
    engine.destroy()
    del engine
    gc.collect()
    torch.distributed.destroy_process_group()


def run(out_dir: str, world: int = 2, stages=(0, 1, 2, 3)):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(world, port, list(stages), out_dir), nprocs=world, join=True)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2,
        [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else (0, 1, 2, 3))
