"""DeepSpeed: a CalibRL training micro-step on a ``DeepSpeedEngine``, and the no-grad pass.

- ``train_micro_batch(engine, batch, config)``: the engine's forward to logits, the fused CalibRL
  loss from logits (log-probs, entropy and the in-place d-logits backward in the library),
  ``engine.backward`` and ``engine.step`` (DeepSpeed applies the optimizer at the gradient
  accumulation boundary).
- ``logprobs(engine, batch)``: the forward-only pass (old-policy and expert log-probs).

See integration/deepspeed/README.md.
"""

from __future__ import annotations

import torch

from .. import ops
from ..autograd import fused_logits_calibrl_loss
from ..config import Config
from ._common import check_inputs, masked_labels, per_row_expert

__all__ = ["train_micro_batch", "logprobs", "loss_scale", "per_row_expert"]


def _logits(engine, batch, forward):
    logits = forward(engine, batch) if forward is not None else engine(batch["input_ids"])
    labels = batch["labels"]
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits must be [B, S, V] matching `batch['labels']` {tuple(labels.shape)}, got {tuple(logits.shape)}"
        )
    return logits, labels


def loss_scale(engine, inputs) -> int:
    """The factor that makes DeepSpeed's update the global mini-batch update.

    DeepSpeed divides each micro-batch loss by ``gradient_accumulation_steps`` and averages the
    gradients over the ``dp_world_size`` data-parallel ranks (ZeRO stages included). With global
    ``inputs.normalizers`` the partial losses of all micro-batches on all ranks already add up
    to the mini-batch loss, so both divisions are undone; without them every micro-batch is its
    own mean and DeepSpeed's averaging is kept (factor 1).
    """
    if inputs.normalizers is None:
        return 1
    return int(engine.gradient_accumulation_steps()) * int(engine.dp_world_size)


def train_micro_batch(engine, batch: dict, config=None, *, temperature: float = 1.0, forward=None) -> dict:
    """One micro-batch: forward, CalibRL loss, backward, step. Returns the metrics dict.

    ``batch`` holds ``input_ids`` (what the model takes; or use ``forward(engine, batch)``
    returning logits ``[B, S, V]``), ``labels [B, S]`` (the next-token ids the log-probs are
    taken at) and ``inputs`` (:class:`calibrl.LossInputs`, padded ``[B, S]``, with the response
    mask). With global ``inputs.normalizers`` (over every micro-batch of every data-parallel
    rank) the step is the global mini-batch step: see :func:`loss_scale`. Carry the expert
    per row (:func:`per_row_expert`) so that any split of the rows over ranks and micro-batches
    keeps each row's baseline.
    """
    cfg = Config.coerce(config)
    labels, inputs = batch.get("labels"), batch.get("inputs")
    if labels is None or inputs is None:
        raise ValueError("`batch` must hold 'labels' [B, S] and 'inputs' (calibrl.LossInputs)")
    check_inputs(inputs, tuple(labels.shape), cfg, "batch['inputs']")
    logits, labels = _logits(engine, batch, forward)
    n, v = labels.numel(), logits.shape[-1]
    loss, metrics = fused_logits_calibrl_loss(
        logits.reshape(n, v), masked_labels(labels, inputs), inputs, cfg, token_shape=tuple(labels.shape),
        temperature=temperature,
    )
    engine.backward(loss * loss_scale(engine, inputs))
    engine.step()
    return metrics


@torch.no_grad()
def logprobs(engine, batch: dict, *, mask=None, temperature: float = 1.0, forward=None, entropy: bool = False):
    """The no-grad pass: log-probs ``[B, S]`` (float32) of ``batch['labels']`` under the
    engine's model (the old policy's for rollouts, ``ℓ*`` for expert responses). Positions where
    ``mask`` is 0 get 0. With ``entropy=True`` returns ``(logprobs, entropy)``."""
    logits, labels = _logits(engine, batch, forward)
    n, v = labels.numel(), logits.shape[-1]
    flat = labels.reshape(n).long()
    if mask is not None:
        flat = torch.where(mask.reshape(n) != 0, flat, torch.full_like(flat, -1))
    lp, ent, _ = ops.logits_forward(logits.reshape(n, v).contiguous(), flat, temperature, entropy=entropy)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if entropy else lp
