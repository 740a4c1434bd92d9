"""The fused linear path in PyTorch: log-probs and entropy per token from the hidden states and
the LM head, differentiable in ``hidden``, ``weight`` and ``bias``, without an ``[N, V]`` logits
tensor (see :mod:`calibrl.linear`).

Both ops are ``torch.library`` custom ops with fake implementations and registered autograd,
so the same code runs eagerly and under ``torch.compile(fullgraph=True)``:

- ``calibrl::fused_linear_logprobs``: → (logprobs, entropy, lse), float32 ``[N]``;
- ``calibrl::fused_linear_backward``: → (d_hidden, d_weight, d_bias), recomputing the logits
  chunk by chunk (the saved tensors are the inputs and two ``[N]`` vectors).

Feed the log-probs and entropy to :func:`calibrl.calibrl_loss` (any preset); for the old-policy
and expert passes use :func:`fused_linear_logprobs_nograd`. CUDA tensors run the CUDA backend
(cuBLAS GEMMs; proven only in the host emulation so far, never on a GPU: docs/cuda.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import linear, ops
from .autograd import _all_gather_stats
from .linear import DEFAULT_CHUNK

__all__ = [
    "FusedLinearLogprobs",
    "fused_linear_logprobs",
    "fused_linear_logprobs_nograd",
    "vocab_parallel_fused_linear_logprobs",
]


@torch.library.custom_op("calibrl::fused_linear_logprobs", mutates_args=())
def _forward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    lp, ent, lse = linear.forward(hidden, weight, labels, temperature, bias=bias, chunk_size=chunk_size)
    return lp, ent, lse


@_forward_op.register_fake
def _(hidden, weight, bias, labels, temperature, chunk_size):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("calibrl::fused_linear_backward", mutates_args=())
def _backward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Tensor,
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], temperature: float, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = linear.backward(
        hidden, weight, labels, lse, grad_logprobs.float().contiguous(), temperature, bias=bias,
        entropy=entropy if grad_entropy is not None else None,
        grad_entropy=None if grad_entropy is None else grad_entropy.float().contiguous(),
        chunk_size=chunk_size,
    )
    # d_weight / d_bias are accumulated in float32 by the library; hand back the parameter's dtype.
    db = db.to(bias.dtype) if bias is not None else hidden.new_empty((0,))
    return dh, dw.to(weight.dtype), db


@_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, chunk_size):
    db = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, chunk_size = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
    ctx.temperature, ctx.chunk_size = temperature, chunk_size


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    dh, dw, db = _backward_op(hidden, weight, bias, labels, lse, ent, grad_logprobs, grad_entropy,
                              ctx.temperature, ctx.chunk_size)
    return dh, dw, (db if bias is not None else None), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"`labels`: shape {tuple(labels.shape)} must be hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()


def fused_linear_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` (float32, ``labels``' shape) of ``hidden [..., H] · weightᵀ + bias``
    divided by ``temperature``; differentiable in ``hidden``, ``weight`` and ``bias``. Negative
    labels mark ignored tokens (0 there, no gradient)."""
    h2, l1 = _flatten(hidden, labels)
    lp, ent, _ = _forward_op(h2, weight, bias, l1, float(temperature), int(chunk_size))
    return lp.view(labels.shape), ent.view(labels.shape)


@torch.no_grad()
def fused_linear_logprobs_nograd(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK, entropy: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """The forward alone, for the old-policy and expert (no-grad) passes: ``(logprobs,
    entropy)`` (entropy ``None`` with ``entropy=False``), float32, ``labels``' shape."""
    h2, l1 = _flatten(hidden, labels)
    lp, ent, _ = linear.forward(h2, weight, l1, temperature, bias=bias, chunk_size=chunk_size, entropy=entropy)
    return lp.view(labels.shape), (ent.view(labels.shape) if ent is not None else None)


class FusedLinearLogprobs(torch.nn.Module):
    """:func:`fused_linear_logprobs` as a module: ``forward(hidden, weight, labels, bias=None)``."""

    def __init__(self, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        self.temperature, self.chunk_size = float(temperature), int(chunk_size)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None):
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                     chunk_size=self.chunk_size)


class _VocabParallel(torch.autograd.Function):
    """Forward: this shard's ``[N, 4]`` statistics, all-gathered over ``group`` and finished
    (every rank gets the same ℓ, H). Backward: this shard's ``d_weight``/``d_bias`` and its part
    of ``d_hidden``, summed over ``group`` (the hidden states are replicated over it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, vocab_start, temperature, chunk_size):
        stats = linear.shard_stats(hidden, weight, labels, temperature, vocab_start=vocab_start, bias=bias,
                                   chunk_size=chunk_size)
        lp, ent, lse = ops.logits_shard_finish(_all_gather_stats(stats, group), labels)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.args = (group, vocab_start, temperature, chunk_size)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        import torch.distributed as dist

        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        group, vocab_start, temperature, chunk_size = ctx.args
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        dh, dw, db = linear.backward(
            hidden, weight, labels, lse, grad_logprobs.float().contiguous(), temperature, bias=bias,
            entropy=ent if grad_entropy is not None else None,
            grad_entropy=None if grad_entropy is None else grad_entropy.float().contiguous(),
            vocab_start=vocab_start, chunk_size=chunk_size, d_hidden=torch.empty(hidden.shape),
        )
        dist.all_reduce(dh, group=group)
        return (dh.to(hidden.dtype), dw.to(weight.dtype), None if bias is None else db.to(bias.dtype),
                None, None, None, None, None)


def vocab_parallel_fused_linear_logprobs(
    hidden: Tensor, weight_shard: Tensor, labels: Tensor, *, group=None, vocab_start: Optional[int] = None,
    bias_shard: Optional[Tensor] = None, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """:func:`fused_linear_logprobs` with the LM head split over the vocabulary across
    ``group`` (a ``torch.distributed`` group; ``None`` = the default one), as Megatron's
    ``ColumnParallelLinear`` output layer holds it: rank r has rows ``vocab_start ...`` of the
    weight (default ``r · V_local``). ``hidden`` is the layer's input, the same on every rank of
    the group; its gradient is summed over the group here (pass it *before* any
    ``copy_to_tensor_model_parallel_region``, whose backward would sum it again)."""
    import torch.distributed as dist

    h2, l1 = _flatten(hidden, labels)
    if group is None:
        group = dist.group.WORLD
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * weight_shard.shape[0]
    lp, ent = _VocabParallel.apply(h2, weight_shard, bias_shard, l1, group, int(vocab_start), float(temperature),
                                   int(chunk_size))
    return lp.view(labels.shape), ent.view(labels.shape)
