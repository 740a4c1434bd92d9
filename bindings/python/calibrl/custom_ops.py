"""The loss as PyTorch custom ops, so ``torch.compile(fullgraph=True)`` captures it.

The library is reached through ctypes, which TorchDynamo cannot trace; registered as
``torch.library.custom_op`` with fake (shape-only) implementations and registered autograd,
each call is one opaque node of the graph instead of a graph break:

- ``calibrl::loss``: log-probs (and entropy) → metrics ``[METRICS_LEN]`` (``metrics[0]`` is the loss) and
  ∂L/∂ℓ, ∂L/∂H, computed in the forward; the backward scales them by the incoming gradient.
- ``calibrl::logits_loss``: logits ``[N, V]`` → the same, with the log-sum-exp and entropy the
  backward needs; ``calibrl::logits_backward`` (also a custom op, so the compiled backward
  graph holds it too) writes ∂L/∂logits into a new tensor (never in place here: a compiled
  graph may not overwrite its input behind PyTorch's back).

:class:`CompiledCalibRLLoss` and :class:`CompiledFusedLogitsCalibRL` return ``(loss,
metrics)`` with ``metrics`` a float64 tensor ``[METRICS_LEN]`` in ``calibrl.METRICS_NAMES`` order (a
dict of Python floats would force a device sync and a graph break; use
``calibrl.metrics_dict(metrics)`` outside the compiled region). Needs torch >= 2.4.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Optional

import torch
from torch import Tensor

from . import ops
from ._abi import METRICS_LEN
from .config import Config
from .ops import LossInputs

__all__ = ["CompiledCalibRLLoss", "CompiledFusedLogitsCalibRL"]

#: The tensor fields of LossInputs, in the order the ops take them.
_FIELDS = (
    "advantages", "weights", "signs", "mask", "seq_offsets", "old_logprobs", "ref_logprobs",
    "is_expert", "expert_logprobs", "expert_offsets", "expert_mask", "expert_index", "token_weights",
)


@functools.lru_cache(maxsize=64)
def _config(config_json: str) -> Config:
    return Config.from_dict(json.loads(config_json))


def _inputs(fields: tuple, normalizers: Optional[list[float]]) -> LossInputs:
    kw = {k: v for k, v in zip(_FIELDS, fields) if v is not None}
    return LossInputs(**kw, normalizers=tuple(normalizers) if normalizers is not None else None)


def _grad_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# calibrl::loss


@torch.library.custom_op("calibrl::loss", mutates_args=())
def _loss_op(
    logprobs: Tensor, entropy: Optional[Tensor], want_grad_entropy: bool, config_json: str,
    normalizers: Optional[list[float]],
    advantages: Tensor, weights: Tensor, signs: Tensor, mask: Optional[Tensor],
    seq_offsets: Optional[Tensor], old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
    is_expert: Optional[Tensor], expert_logprobs: Optional[Tensor], expert_offsets: Optional[Tensor],
    expert_mask: Optional[Tensor], expert_index: Optional[Tensor], token_weights: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    fields = (advantages, weights, signs, mask, seq_offsets, old_logprobs, ref_logprobs, is_expert,
              expert_logprobs, expert_offsets, expert_mask, expert_index, token_weights)
    want_h = want_grad_entropy and entropy is not None
    res = ops.loss(
        _config(config_json), logprobs.contiguous(), _inputs(fields, normalizers),
        entropy=None if entropy is None else entropy.contiguous(),
        grad_logprobs=True, grad_entropy=want_h, host_metrics=False,
    )
    grad_h = res.grad_entropy if want_h else logprobs.new_empty((0,), dtype=_grad_dtype(logprobs))
    return res.metrics_tensor, res.grad_logprobs, grad_h


@_loss_op.register_fake
def _(logprobs, entropy, want_grad_entropy, config_json, normalizers, *fields):
    dt = _grad_dtype(logprobs)
    want_h = want_grad_entropy and entropy is not None
    return (
        logprobs.new_empty((METRICS_LEN,), dtype=torch.float64),
        logprobs.new_empty(logprobs.shape, dtype=dt),
        logprobs.new_empty(logprobs.shape if want_h else (0,), dtype=dt),
    )


def _loss_setup_context(ctx, inputs, output):
    logprobs, entropy = inputs[0], inputs[1]
    _, g, h = output
    ctx.save_for_backward(g, h)
    ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)


def _loss_backward(ctx, grad_metrics, _grad_g, _grad_h):
    g, h = ctx.saved_tensors
    d_loss = grad_metrics[0]
    gl = (g * d_loss).to(ctx.dtypes[0])
    gh = (h * d_loss).to(ctx.dtypes[1]) if ctx.dtypes[1] is not None and h.numel() else None
    return (gl, gh) + (None,) * 16


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------------------------
# calibrl::logits_loss, calibrl::logits_backward


@torch.library.custom_op("calibrl::logits_loss", mutates_args=())
def _logits_loss_op(
    logits: Tensor, labels: Tensor, token_shape: list[int], temperature: float, want_grad_entropy: bool,
    config_json: str, normalizers: Optional[list[float]],
    advantages: Tensor, weights: Tensor, signs: Tensor, mask: Optional[Tensor],
    seq_offsets: Optional[Tensor], old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
    is_expert: Optional[Tensor], expert_logprobs: Optional[Tensor], expert_offsets: Optional[Tensor],
    expert_mask: Optional[Tensor], expert_index: Optional[Tensor], token_weights: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """→ (metrics [METRICS_LEN], ∂L/∂ℓ [N], ∂L/∂H [N] or [0], lse [N], entropy [N])."""
    fields = (advantages, weights, signs, mask, seq_offsets, old_logprobs, ref_logprobs, is_expert,
              expert_logprobs, expert_offsets, expert_mask, expert_index, token_weights)
    z = logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()
    lp, ent, lse = ops.logits_forward(z, labels, temperature)
    shape = tuple(token_shape)
    res = ops.loss(
        _config(config_json), lp.view(shape), _inputs(fields, normalizers), entropy=ent.view(shape),
        grad_logprobs=True, grad_entropy=want_grad_entropy, host_metrics=False,
    )
    grad_h = res.grad_entropy.reshape(-1) if want_grad_entropy else lp.new_empty((0,))
    return res.metrics_tensor, res.grad_logprobs.reshape(-1), grad_h, lse, ent


@_logits_loss_op.register_fake
def _(logits, labels, token_shape, temperature, want_grad_entropy, config_json, normalizers, *fields):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        logits.new_empty((METRICS_LEN,), dtype=torch.float64),
        logits.new_empty((n,), **f32),
        logits.new_empty((n,) if want_grad_entropy else (0,), **f32),
        logits.new_empty((n,), **f32),
        logits.new_empty((n,), **f32),
    )


@torch.library.custom_op("calibrl::logits_backward", mutates_args=())
def _logits_backward_op(
    logits: Tensor, labels: Tensor, lse: Tensor, grad_logprobs: Tensor, entropy: Tensor,
    grad_entropy: Optional[Tensor], temperature: float,
) -> Tensor:
    z = logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()
    return ops.logits_backward(
        z, labels, lse, grad_logprobs.contiguous(), temperature,
        entropy=entropy if grad_entropy is not None else None,
        grad_entropy=None if grad_entropy is None else grad_entropy.contiguous(),
    )


@_logits_backward_op.register_fake
def _(logits, labels, lse, grad_logprobs, entropy, grad_entropy, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_setup_context(ctx, inputs, output):
    logits, labels, _, temperature = inputs[:4]
    _, g, h, lse, ent = output
    ctx.save_for_backward(logits, labels, g, h, lse, ent)
    ctx.temperature = temperature


def _logits_backward(ctx, grad_metrics, *_unused):
    logits, labels, g, h, lse, ent = ctx.saved_tensors
    d_loss = grad_metrics[0]
    g = (g * d_loss).float()
    h = (h * d_loss).float() if h.numel() else None
    grad = _logits_backward_op(logits, labels, lse, g, ent, h, ctx.temperature)
    return (grad,) + (None,) * 19


_logits_loss_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------
# Modules (the configuration is turned into a constant string once, outside any graph)


def _config_json(config: Any) -> str:
    return json.dumps(Config.coerce(config).to_dict(), sort_keys=True)


def _field_args(inputs: LossInputs) -> tuple:
    n = ops._normalizers(inputs.normalizers)
    counts = None if n is None else [float(getattr(n, name)) for name, _ in n._fields_]
    return (counts,) + tuple(getattr(inputs, k) for k in _FIELDS)


class CompiledCalibRLLoss(torch.nn.Module):
    """``loss, metrics = module(logprobs, inputs, entropy=None)``; ``inputs`` holds tensors
    (not lists). Compiles without graph breaks."""

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.config_json = _config_json(config)

    def forward(self, logprobs: Tensor, inputs: LossInputs, entropy: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        want_h = entropy is not None and entropy.requires_grad
        metrics, _, _ = _loss_op(logprobs, entropy, want_h, self.config_json, *_field_args(inputs))
        return metrics[0].to(_grad_dtype(logprobs)), metrics


class CompiledFusedLogitsCalibRL(torch.nn.Module):
    """``loss, metrics = module(logits [N, V], labels [N], inputs, token_shape=None)`` (see
    :func:`calibrl.fused_logits_calibrl_loss`; never in place). Compiles without graph breaks."""

    def __init__(self, config: Any = None, *, temperature: float = 1.0) -> None:
        super().__init__()
        cfg = Config.coerce(config)
        self.config_json = _config_json(cfg)
        self.temperature = float(temperature)
        self.want_grad_entropy = float(cfg.to_dict()["entropy_coef"]) != 0.0

    def forward(
        self, logits: Tensor, labels: Tensor, inputs: LossInputs, token_shape: Optional[list[int]] = None
    ) -> tuple[Tensor, Tensor]:
        if token_shape is None:
            if inputs.seq_offsets is not None or inputs.mask is None:
                token_shape = [logits.shape[0]]
            else:
                token_shape = list(inputs.mask.shape)  # type: ignore[union-attr]
        metrics, *_ = _logits_loss_op(
            logits, labels, list(token_shape), self.temperature, self.want_grad_entropy, self.config_json,
            *_field_args(inputs),
        )
        return metrics[0].to(torch.float32), metrics
