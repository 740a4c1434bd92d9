"""PyTorch autograd for the CalibRL loss.

- :class:`CalibRLLoss` (``nn.Module``) / :func:`calibrl_loss`: the loss from log-probs ℓ (and
  optionally entropy H). The library computes the value and ∂L/∂ℓ, ∂L/∂H in the forward; the
  backward only scales them by the incoming gradient.
- :class:`FusedLogitsCalibRL` / :func:`fused_logits_calibrl_loss`: the loss from logits
  ``[N, V]`` (SPEC §6): log-probs and entropy in one pass, and a backward that writes
  ∂L/∂logits over the logits buffer in place (entropy term included).
- :func:`vocab_parallel_calibrl_loss`: the same for vocabulary-parallel logits ``[N, V/tp]``
  with the phase-1 statistics all-gathered over a ``torch.distributed`` group.

Every entry point returns ``(loss, metrics)``: a 0-d tensor and a dict of Python floats
(reading them synchronises a CUDA stream once per call).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from . import ops
from ._dlpack import as_array
from .config import Config
from .ops import LossInputs

__all__ = [
    "CalibRLLoss",
    "calibrl_loss",
    "FusedLogitsCalibRL",
    "fused_logits_calibrl_loss",
    "vocab_parallel_calibrl_loss",
]


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _run_loss(cfg: Config, logprobs, entropy, inputs: LossInputs, want_grad_entropy: bool):
    """One library call: returns (loss tensor, metrics dict, grad ℓ, grad H or None).

    The token tensors are ``[B, S]``/``[T]``-sized (not vocabulary-sized), so strided ones
    (e.g. a ``gather`` result's slice) are made contiguous here rather than refused."""
    inputs = _lists_to_tensors(inputs, logprobs.device)
    res = ops.loss(
        cfg,
        logprobs.detach().contiguous(),
        inputs,
        entropy=None if entropy is None else entropy.detach().contiguous(),
        grad_logprobs=True,
        grad_entropy=want_grad_entropy,
        host_metrics=not logprobs.is_cuda,
    )
    metrics = res.metrics if res.metrics else ops.metrics_dict(res.metrics_tensor)
    value = res.metrics_tensor[0].to(_loss_dtype(logprobs))
    return value, metrics, res.grad_logprobs, res.grad_entropy


class _LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, cfg, inputs, out_metrics):
        want_h = entropy is not None and entropy.requires_grad
        value, metrics, g, h = _run_loss(cfg, logprobs, entropy, inputs, want_h)
        out_metrics.update(metrics)
        ctx.grads = (g, h)
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        g, h = ctx.grads
        ctx.grads = None
        gl = (g * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gh = (h * grad_out).to(ctx.dtypes[1]) if h is not None and ctx.needs_input_grad[1] else None
        return gl, gh, None, None, None


def calibrl_loss(logprobs: torch.Tensor, inputs: LossInputs, config=None, *, entropy=None):
    """The loss from log-probs; differentiable in ``logprobs`` and ``entropy``.

    Returns ``(loss, metrics)``. ``inputs`` holds the detached batch data (see
    :class:`calibrl.LossInputs`).
    """
    metrics: dict = {}
    loss = _LossFunction.apply(logprobs, entropy, Config.coerce(config), inputs, metrics)
    return loss, metrics


class CalibRLLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`calibrl_loss`: ``loss, metrics = module(logprobs,
    inputs, entropy=None)``."""

    def __init__(self, config=None):
        super().__init__()
        self.config = Config.coerce(config)

    def forward(self, logprobs, inputs: LossInputs, entropy=None):
        return calibrl_loss(logprobs, inputs, self.config, entropy=entropy)


# --------------------------------------------------------------------------------------------
# From logits


def _entropy_coef(cfg: Config) -> float:
    coef = getattr(cfg, "_entropy_coef", None)
    if coef is None:
        coef = float(cfg.to_dict()["entropy_coef"])
        cfg._entropy_coef = coef
    return coef


def _check_logits(logits: torch.Tensor, labels) -> torch.Tensor:
    """Checks ``logits [N, V]`` and returns ``labels`` as a tensor on the logits' device."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`logits`: expected a torch.Tensor [N, V], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"`logits`: expected [N, V], got shape {tuple(logits.shape)} (flatten the token dimensions)")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels, device=logits.device)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"`labels`: expected shape [{logits.shape[0]}], got {tuple(labels.shape)}")
    return labels


def _token_shape(token_shape, n: int, inputs: LossInputs) -> tuple:
    """The log-probs' layout for the loss: ``token_shape`` checked against the ``n`` logits rows,
    or, when it is not given, ``(N,)`` with ``inputs.seq_offsets`` (packed) or the shape of a
    2-D ``inputs.mask`` (padded)."""
    if token_shape is None:
        if inputs.seq_offsets is not None:
            return (n,)
        mask_shape = tuple(int(d) for d in np.shape(inputs.mask)) if inputs.mask is not None else ()
        if len(mask_shape) == 2 and mask_shape[0] * mask_shape[1] == n:
            return mask_shape
        raise ValueError(
            f"`token_shape`: not given, and the inputs do not imply it: pass token_shape=(B, S) "
            f"for padded rows (B·S = N = {n} logits rows, the shape of `mask`), or "
            f"inputs.seq_offsets [B+1] for packed rows"
        )
    try:
        shape = tuple(int(d) for d in token_shape)
    except TypeError:
        raise TypeError(f"`token_shape`: expected a tuple (B, S) or (N,), got {token_shape!r}") from None
    if len(shape) not in (1, 2) or math.prod(shape) != n:
        raise ValueError(
            f"`token_shape`: {shape} does not fit the {n} logits rows: expected (B, S) with "
            f"B·S = {n} (padded) or ({n},) (packed, with inputs.seq_offsets)"
        )
    return shape


def _lists_to_tensors(inputs: LossInputs, device) -> LossInputs:
    """Plain lists/tuples among the inputs as tensors on the call's device."""
    lists = {
        k: torch.as_tensor(as_array(v, k), device=device)
        for k, v in vars(inputs).items()
        if k != "normalizers" and isinstance(v, (list, tuple))
    }
    return dataclasses.replace(inputs, **lists) if lists else inputs


class _LogitsFunction(torch.autograd.Function):
    """Shared by the full-vocabulary and vocabulary-parallel paths (``group`` None or not)."""

    @staticmethod
    def forward(ctx, logits, labels, cfg, inputs, token_shape, temperature, inplace, group, vocab_start, out_metrics,
                inputs_hook=None):
        z = logits.detach()  # shares the logits' memory and version counter
        if z.shape[1] > 1 and z.stride(1) != 1:
            z = z.contiguous()  # the library needs a dense vocabulary dimension
        if group is None:
            lp, ent, lse = ops.logits_forward(z, labels, temperature)
        else:
            stats = ops.logits_shard_stats(z, labels, temperature, vocab_start=vocab_start)
            gathered = _all_gather_stats(stats, group)
            lp, ent, lse = ops.logits_shard_finish(gathered, labels)
        finish = None
        if inputs_hook is not None:  # e.g. context parallelism: inputs that need this call's ℓ
            inputs, finish = inputs_hook(lp.view(token_shape), inputs)
        want_h = _entropy_coef(cfg) != 0.0
        value, metrics, g, h = _run_loss(cfg, lp.view(token_shape), ent.view(token_shape), inputs, want_h)
        if finish is not None:
            value = finish(value, metrics)
        metrics["mean_token_entropy"] = _masked_mean(ent, labels)
        out_metrics.update(metrics)
        ctx.state = (z, labels, lse, ent, g.reshape(-1), None if h is None else h.reshape(-1))
        ctx.params = (temperature, inplace, vocab_start)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        z, labels, lse, ent, g, h = ctx.state
        ctx.state = None
        temperature, inplace, vocab_start = ctx.params
        g = (g * grad_out).float()
        h = None if h is None else (h * grad_out).float()
        grad = ops.logits_backward(
            z,
            labels,
            lse,
            g,
            temperature,
            vocab_start=vocab_start,
            entropy=ent if h is not None else None,
            grad_entropy=h,
            out=z if inplace else None,
        )
        if inplace:
            # The library wrote ∂L/∂logits over the logits through a raw pointer, which PyTorch
            # cannot see. Bump the version counter `z` shares with the logits, so that an op
            # recorded earlier that saved the logits for its own backward (a z-loss
            # `(logits ** 2).sum()`, a soft-cap's tanh) raises "modified by an inplace operation"
            # instead of silently using d-logits as logits.
            torch.autograd.graph.increment_version(z)
        return grad, None, None, None, None, None, None, None, None, None, None


def _masked_mean(values: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels >= 0
    n = int(keep.sum().item())
    return float(values[keep].double().sum().item() / n) if n else 0.0


def _all_gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """``[N, 4]`` per rank → ``[R, N, 4]`` in rank order of ``group``."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((world,) + tuple(stats.shape), dtype=stats.dtype, device=stats.device)
    if hasattr(dist, "all_gather_into_tensor") and stats.is_cuda:
        dist.all_gather_into_tensor(out, stats, group=group)
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.unbind(0)), stats, group=group)
    return out


def fused_logits_calibrl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inputs: LossInputs,
    config=None,
    *,
    token_shape=None,
    temperature: float = 1.0,
    inplace: bool = True,
):
    """The loss from ``logits [N, V]`` (bf16, f16 or f32) at ``labels [N]``.

    ``token_shape`` is the log-probs' layout for the loss: ``(B, S)`` padded (``N = B·S``) or
    ``(N,)`` packed with ``inputs.seq_offsets``; by default ``(N,)`` when ``inputs.seq_offsets``
    is given, else the shape of ``inputs.mask``. Labels < 0 mark rows that are not computed
    (their log-prob is 0; mask them out in ``inputs.mask``).
    With ``inplace=True`` the backward overwrites ``logits`` with ∂L/∂logits: do not reuse the
    logits after ``backward()``. When an op recorded before this one saved the logits for its
    backward (e.g. a z-loss), ``backward()`` raises PyTorch's "modified by an inplace operation"
    error: pass ``inplace=False`` there.
    Returns ``(loss, metrics)``; ``metrics["mean_token_entropy"]`` is the mean entropy of the
    labelled rows.
    """
    labels = _check_logits(logits, labels)
    shape = _token_shape(token_shape, logits.shape[0], inputs)
    metrics: dict = {}
    loss = _LogitsFunction.apply(
        logits, labels, Config.coerce(config), inputs, shape, float(temperature), inplace, None, 0, metrics, None
    )
    return loss, metrics


class FusedLogitsCalibRL(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`fused_logits_calibrl_loss`."""

    def __init__(self, config=None, *, temperature: float = 1.0, inplace: bool = True):
        super().__init__()
        self.config = Config.coerce(config)
        self.temperature = temperature
        self.inplace = inplace

    def forward(self, logits, labels, inputs: LossInputs, token_shape=None):
        return fused_logits_calibrl_loss(
            logits,
            labels,
            inputs,
            self.config,
            token_shape=token_shape,
            temperature=self.temperature,
            inplace=self.inplace,
        )


def vocab_parallel_calibrl_loss(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    inputs: LossInputs,
    config=None,
    *,
    group=None,
    vocab_start: int | None = None,
    token_shape=None,
    temperature: float = 1.0,
    inplace: bool = True,
    inputs_hook=None,
):
    """The loss from a vocabulary shard ``logits_shard [N, V/R]`` of rank r of ``group``
    (a ``torch.distributed`` process group; ``None`` = the default group). ``labels`` are global
    ids. ``vocab_start`` defaults to ``r · V/R`` (equal shards in rank order, as Megatron's).
    Every rank of the group gets the same loss and metrics; the backward writes this rank's
    slice of ∂L/∂logits (in place by default). ``inputs_hook(logprobs, inputs) -> (inputs,
    finish)`` may replace the inputs once this call's log-probs are known, and ``finish(value,
    metrics) -> value`` correct the result (the Megatron drop-in's context parallelism).
    """
    import torch.distributed as dist

    labels = _check_logits(logits_shard, labels)
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * logits_shard.shape[1]
    shape = _token_shape(token_shape, logits_shard.shape[0], inputs)
    metrics: dict = {}
    loss = _LogitsFunction.apply(
        logits_shard,
        labels,
        Config.coerce(config),
        inputs,
        shape,
        float(temperature),
        inplace,
        group if group is not None else dist.group.WORLD,
        int(vocab_start),
        metrics,
        inputs_hook,
    )
    return loss, metrics
