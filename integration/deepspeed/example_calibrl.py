"""End to end: a few complete CalibRL steps with DeepSpeed on the CPU (2 processes, gloo).

    DS_ACCELERATOR=cpu python integration/deepspeed/example_calibrl.py OUT_DIR [ZERO_STAGE] [STEPS]

Each step, on every rank: sample rollouts (the toy task of integration/toy_rl.py), rewards →
group advantages, plan the step (calibrl.plan), the no-grad pass of this rank's share
(``calibrl.integrations.deepspeed.logprobs``: every rollout's ℓold and each expert's ℓ* once),
then per mini-batch the gradient-accumulation micro-batches through ``train_micro_batch``
(DeepSpeed's own backward / step; its accumulation steps set to the plan's micro-batch count).
Rank 0 writes OUT_DIR/log.pt (per mini-batch: the loss summed over micro-batches and ranks, and
the mean reward per step).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import toy_rl  # noqa: E402

from calibrl.integrations.deepspeed import logprobs, train_micro_batch  # noqa: E402

CFG = {"preset": "paper", "entropy_coef": 0.001}
HIDDEN, PROMPTS, GROUP = 16, 4, 4
LR = 2.0  # plain SGD: the update follows the gradient's scale (Adam would hide a wrong one)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(toy_rl.VOCAB, HIDDEN, generator=g) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(toy_rl.VOCAB, HIDDEN, generator=g) * 0.5)

    def forward(self, tokens):
        return torch.tanh(self.embedding[tokens]) @ self.head.t()  # logits [B, S, V]


def _worker(rank: int, world: int, port: int, stage: int, steps: int, out_dir: str):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = TinyLM()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
    })
    log = []
    for step in range(steps):
        module = engine.module
        prompts = toy_rl.make_prompts(PROMPTS, seed=100 + step)
        rollouts = toy_rl.sample(lambda t: module(t[:, -1:])[:, -1], prompts, GROUP, seed=step)
        data = toy_rl.Step(prompts, rollouts, world, config=CFG, train_token_budget=4 * toy_rl.S, minibatch_prompts=2)

        # The no-grad pass: this rank's share of the plan.
        for seqs in data.plan.nograd[rank]:
            batch = data.padded(seqs)
            data.store_nograd(seqs, logprobs(engine, batch, mask=batch["mask"], forward=_forward))
        data.gather(dist.all_reduce)

        # The training pass: the plan's micro-batches are DeepSpeed's accumulation steps.
        for mb in data.plan.minibatches:
            engine.set_train_batch_size(mb.microbatches * world)  # 1 "sample" per micro-batch
            losses = [train_micro_batch(engine, data.train_batch(seqs, mb.normalizers), CFG, forward=_forward)["loss"]
                      for seqs in mb.train[rank]]
            total = torch.tensor(sum(losses), dtype=torch.float64)
            dist.all_reduce(total)  # the partial losses of all micro-batches and ranks add up
            log.append({"step": step, "minibatch": mb.index, "loss": float(total), "global_steps": engine.global_steps})
        log[-1]["mean_reward"] = float(data.rewards.mean())
        if rank == 0:
            print(f"step {step}: mean reward {data.rewards.mean():.3f}, loss {float(total):.4f}", flush=True)
    if rank == 0:
        torch.save(log, os.path.join(out_dir, "log.pt"))
    # Teardown in order: every rank done with its collectives, the engine's buffers and group
    # references released, then the process group; left to interpreter shutdown, one rank once
    # aborted at exit ("terminate called without an active exception").
    dist.barrier()
    engine.destroy()
    del engine, module
    gc.collect()
    dist.destroy_process_group()


def _forward(engine, batch):
    return engine(batch["tokens"])


def main(out_dir: str, stage: int = 0, steps: int = 3):
    toy_rl.spawn_ranks(_worker, stage, steps, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
