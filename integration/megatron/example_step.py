"""A minimal Megatron-style RL step using the CalibRL drop-in ``loss_func``.

Megatron-Core's pipeline schedules need CUDA, so ``train_step`` below reproduces what
``forward_backward_no_pipelining`` does with a ``forward_step``/``loss_func`` pair (call
``loss_func(output_tensor)``, divide by ``num_microbatches``, backward) on the CPU; the model
uses Megatron-Core's tensor-parallel state and its ``copy_to_tensor_model_parallel_region``
when they are available. Used by bindings/python/tests/test_megatron.py.
"""

from __future__ import annotations

from functools import partial

import torch

import calibrl
from calibrl.integrations.megatron import loss_func


def _copy_to_tp_region(x, group):
    """Identity forward, all-reduce of the gradient backward (Megatron's mapping)."""
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
    except ImportError:
        parallel_state = None
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return copy_to_tensor_model_parallel_region(x)
    return _CopyToTP.apply(x, group)  # megatron-core absent or not initialised: the same by hand


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


class TinyLM(torch.nn.Module):
    """Replicated embedding, vocabulary-parallel output layer (weight ``[V/tp, H]``)."""

    def __init__(self, vocab: int, hidden: int, tp_rank: int = 0, tp_size: int = 1, group=None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        full_embedding = torch.randn(vocab, hidden, generator=g) * 0.5
        full_output = torch.randn(vocab, hidden, generator=g) * 0.5
        v = vocab // tp_size
        self.embedding = torch.nn.Parameter(full_embedding)
        self.output_weight = torch.nn.Parameter(full_output[tp_rank * v:(tp_rank + 1) * v].clone())
        self.tp_size, self.group = tp_size, group

    def forward(self, tokens):
        hidden = self.embedding[tokens]
        if self.tp_size > 1:
            hidden = _copy_to_tp_region(hidden, self.group)
        return hidden @ self.output_weight.t()  # [B, S, V/tp]: Megatron's logits without labels


# --- the user's forward_step, after the README change ------------------------------------


def forward_step(data_iterator, model, *, cfg, tp_group, loss_scale):
    batch = next(data_iterator)
    output_tensor = model(batch["tokens"])
    return output_tensor, partial(
        loss_func, batch["labels"], batch["inputs"], config=cfg, tp_group=tp_group, loss_scale=loss_scale
    )


def train_step(model, optimizer, microbatches, *, cfg, tp_group):
    """One optimizer step over ``microbatches`` (what Megatron's schedule does, on the CPU)."""
    num_microbatches = len(microbatches)
    data_iterator = iter(microbatches)
    optimizer.zero_grad()
    reported = []
    for _ in range(num_microbatches):
        output_tensor, loss_fn = forward_step(
            data_iterator, model, cfg=cfg, tp_group=tp_group, loss_scale=num_microbatches
        )
        loss, metrics = loss_fn(output_tensor)
        loss = loss / num_microbatches  # the schedule's scaling, undone by loss_scale
        loss.backward()
        reported.append(metrics)
    optimizer.step()
    return reported


def make_microbatches(vocab: int, num_microbatches: int = 2, B: int = 4, S: int = 6, seed: int = 0):
    """Token ids, labels and CalibRL inputs with global normalisers over all micro-batches."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    masks = []
    for _ in range(num_microbatches):
        lengths = torch.randint(2, S + 1, (B,), generator=g)
        masks.append((torch.arange(S)[None] < lengths[:, None]).float())
    norm = (float(sum(m.sum() for m in masks)), float(B * num_microbatches))
    for mb in range(num_microbatches):
        rewards = torch.randint(0, 2, (B,), generator=g).float()
        adv, w, c = calibrl.group_advantages(rewards, torch.tensor([0, 0, 1, 1])[:B])
        inputs = calibrl.LossInputs(
            advantages=adv, weights=w, signs=c, mask=masks[mb],
            old_logprobs=-torch.rand(B, S, generator=g) * 3,
            expert_logprobs=-torch.rand(2, S, generator=g) * 2,
            expert_index=torch.tensor([0, 0, 1, 1])[:B],
            normalizers=norm,
        )
        batches.append({
            "tokens": torch.randint(0, vocab, (B, S), generator=g),
            "labels": torch.randint(0, vocab, (B, S), generator=g),
            "inputs": inputs,
        })
    return batches
