"""A minimal DeepSpeed training step with the CalibRL loss (CPU, gloo, one process).

    DS_ACCELERATOR=cpu python integration/deepspeed/example_train.py OUT.pt

runs two gradient-accumulation micro-batches (one optimizer step) and saves the loss, the
metrics and the updated weights to OUT.pt. Used by bindings/python/tests/test_deepspeed.py.
"""

from __future__ import annotations

import os
import sys

import torch

import calibrl
from calibrl.integrations.deepspeed import train_micro_batch

VOCAB, HIDDEN, B, S = 20, 8, 4, 5
CFG = {"preset": "paper", "entropy_coef": 0.01}
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": B,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
}


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)

    def forward(self, input_ids):
        return self.embedding[input_ids] @ self.head.t()  # logits [B, S, V]


def make_batches():
    g = torch.Generator().manual_seed(1)
    masks = [(torch.arange(S)[None] < torch.randint(1, S + 1, (B,), generator=g)[:, None]).float() for _ in range(2)]
    norm = (float(sum(m.sum() for m in masks)), float(2 * B))
    batches = []
    for m in masks:
        adv, w, c = calibrl.group_advantages(torch.randint(0, 2, (B,), generator=g).float(), torch.tensor([0, 0, 1, 1]))
        batches.append({
            "input_ids": torch.randint(0, VOCAB, (B, S), generator=g),
            "labels": torch.randint(0, VOCAB, (B, S), generator=g),
            "inputs": calibrl.LossInputs(
                advantages=adv, weights=w, signs=c, mask=m,
                old_logprobs=-torch.rand(B, S, generator=g) * 3,
                expert_logprobs=-torch.rand(2, S, generator=g) * 2,
                expert_index=torch.tensor([0, 0, 1, 1]),
                normalizers=norm,
            ),
        })
    return batches


def main(out_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = TinyLM()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG)
    metrics = [train_micro_batch(engine, b, CFG) for b in make_batches()]
    torch.save({
        "metrics": metrics,
        "global_steps": engine.global_steps,
        "embedding": engine.module.embedding.detach().clone(),
        "head": engine.module.head.detach().clone(),
    }, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
