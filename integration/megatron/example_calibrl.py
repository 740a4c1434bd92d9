"""End to end: a few complete CalibRL steps with Megatron-Core on the CPU (2 processes, gloo).

    python integration/megatron/example_calibrl.py OUT_DIR [TP] [STEPS]

Each step, on every rank: sample rollouts (the toy task of integration/toy_rl.py), rewards →
group advantages, plan the step (calibrl.plan: no-grad pass, mini-batches, normalisers), run the
no-grad pass through Megatron-Core's schedule (``forward_only``, ``logprobs_func``: every
rollout's ℓold and each expert's ℓ* once), then the training pass mini-batch by mini-batch
through the schedule with the CalibRL ``loss_func`` and an optimizer step. TP = 1 (default)
gives DP = 2; TP = 2 gives tensor parallelism. Rank 0 writes OUT_DIR/log.pt (the metrics
Megatron-LM would log, per mini-batch, and the mean reward per step).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import example_step as ex  # noqa: E402
import toy_rl  # noqa: E402

CFG = {"preset": "paper", "entropy_coef": 0.001}
HIDDEN, PROMPTS, GROUP = 16, 4, 4
LR = 2.0  # plain SGD: the update follows the gradient's scale (Adam would hide a wrong one)


def _worker(rank: int, world: int, port: int, tp: int, steps: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    dp_group, dp, d = ps.get_data_parallel_group(), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model = ex.make_model(toy_rl.VOCAB, HIDDEN)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    log = []
    for step in range(steps):
        # Rollouts (an inference engine's job; here sampled from the full-vocabulary weights).
        full_out = [torch.empty_like(model.module.output_weight) for _ in range(tp)]
        dist.all_gather(full_out, model.module.output_weight.detach(), group=ps.get_tensor_model_parallel_group())
        weight = torch.cat(full_out)
        emb = model.module.embedding.detach()
        prompts = toy_rl.make_prompts(PROMPTS, seed=100 + step)
        rollouts = toy_rl.sample(lambda t: torch.tanh(emb[t[:, -1]]) @ weight.t(), prompts, GROUP, seed=step)
        data = toy_rl.Step(prompts, rollouts, dp, config=CFG, train_token_budget=4 * toy_rl.S, minibatch_prompts=2)

        # The no-grad pass: this rank's share of the plan, through the schedule (forward only).
        nograd = [data.padded(seqs) for seqs in data.plan.nograd[d]]
        for seqs, lp in zip(data.plan.nograd[d], ex.forward_logprobs(model, nograd)):
            data.store_nograd(seqs, lp)
        data.gather(lambda t: dist.all_reduce(t, group=dp_group))

        # The training pass: one optimizer step per mini-batch.
        for mb in data.plan.minibatches:
            micro = [ex.microbatch(**_split(data.train_batch(seqs, mb.normalizers))) for seqs in mb.train[d]]
            logged = ex.train_step(model, optimizer, micro, cfg=CFG)
            log.append({"step": step, "minibatch": mb.index, **logged})
        log[-1]["mean_reward"] = float(data.rewards.mean())
        if rank == 0:
            print(f"step {step}: mean reward {data.rewards.mean():.3f}, "
                  f"loss {logged['calibrl/loss']:.4f}, mean Δ {logged['calibrl/mean_delta']:.3f}", flush=True)
    if rank == 0:
        torch.save(log, os.path.join(out_dir, "log.pt"))
    dist.destroy_process_group()


def _split(batch: dict) -> dict:
    return {"tokens": batch["tokens"], "labels": batch["labels"], "inputs": batch["inputs"]}


def main(out_dir: str, tp: int = 1, steps: int = 3):
    toy_rl.spawn_ranks(_worker, tp, steps, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
