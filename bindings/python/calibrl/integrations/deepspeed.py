"""DeepSpeed: a CalibRL training micro-step on a ``DeepSpeedEngine``.

``train_micro_batch(engine, batch, config)`` runs the engine's forward to get logits, the fused
CalibRL loss from logits (log-probs, entropy and the in-place d-logits backward in the library),
``engine.backward`` and ``engine.step`` (DeepSpeed applies the optimizer at the gradient
accumulation boundary). See integration/deepspeed/README.md.
"""

from __future__ import annotations

import torch

from ..autograd import fused_logits_calibrl_loss
from ..config import Config

__all__ = ["train_micro_batch"]


def train_micro_batch(engine, batch: dict, config=None, *, temperature: float = 1.0, forward=None) -> dict:
    """One micro-batch: forward, CalibRL loss, backward, step. Returns the metrics dict.

    ``batch`` holds ``input_ids`` (what the model takes; or use ``forward(engine, batch)``
    returning logits ``[B, S, V]``), ``labels [B, S]`` (the next-token ids the log-probs are
    taken at) and ``inputs`` (:class:`calibrl.LossInputs`, padded ``[B, S]``, with the response
    mask). When ``inputs.normalizers`` are global over the gradient-accumulation micro-batches
    the loss is multiplied by ``engine.gradient_accumulation_steps()``, cancelling DeepSpeed's
    division so the accumulated gradient is the mini-batch gradient.
    """
    logits = forward(engine, batch) if forward is not None else engine(batch["input_ids"])
    labels, inputs = batch["labels"], batch["inputs"]
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, S, V] matching labels {tuple(labels.shape)}, got {tuple(logits.shape)}")
    n, v = labels.numel(), logits.shape[-1]
    flat = labels.reshape(n).long()
    if inputs.mask is not None:
        flat = torch.where(inputs.mask.reshape(n) != 0, flat, torch.full_like(flat, -1))
    loss, metrics = fused_logits_calibrl_loss(
        logits.reshape(n, v), flat, inputs, Config.coerce(config), token_shape=tuple(labels.shape),
        temperature=temperature,
    )
    scale = engine.gradient_accumulation_steps() if inputs.normalizers is not None else 1
    engine.backward(loss * scale)
    engine.step()
    return metrics
