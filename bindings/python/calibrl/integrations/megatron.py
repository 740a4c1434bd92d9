"""Megatron-Core drop-in: a ``loss_func`` for an RL step on vocabulary-parallel logits.

In ``forward_step`` call the model without labels (so it returns the logits shard
``[B, S, V/tp]`` instead of a cross-entropy) and return::

    return output_tensor, functools.partial(calibrl.integrations.megatron.loss_func,
                                            labels, inputs, config=cfg)

The loss function all-gathers the phase-1 softmax statistics ``[N, 4]`` over the
tensor-parallel group, finishes ℓ and H on every rank, computes the CalibRL loss, and its
backward writes this rank's slice of ∂L/∂logits (in place over the logits shard). See
integration/megatron/README.md.
"""

from __future__ import annotations

import torch

from ..autograd import vocab_parallel_calibrl_loss
from ..config import Config
from ..ops import LossInputs

__all__ = ["loss_func", "tensor_parallel_group"]


def tensor_parallel_group():
    """Megatron-Core's tensor-parallel group (``parallel_state`` must be initialised)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def loss_func(
    labels: torch.Tensor,
    inputs: LossInputs,
    output_tensor: torch.Tensor,
    *,
    config=None,
    tp_group=None,
    temperature: float = 1.0,
    loss_scale: float = 1.0,
    inplace: bool = True,
):
    """CalibRL loss of one micro-batch from Megatron's vocabulary-parallel logits.

    Args:
        labels: ``[B, S]`` global token ids of the next tokens (Megatron's ``labels``).
        inputs: the batch's :class:`calibrl.LossInputs` in the padded ``[B, S]`` layout;
            ``inputs.mask`` is the response mask (prompt and padding positions are not computed).
        output_tensor: the logits shard ``[B, S, V/tp]`` (or ``[S, B, V/tp]`` with
            ``labels`` given as ``[S, B]`` and ``inputs`` in that layout).
        config: a :class:`calibrl.Config`, a dict or a preset name.
        tp_group: the tensor-parallel process group (default: Megatron's).
        loss_scale: multiplies the returned loss (and so the gradients). With global
            ``inputs.normalizers`` the micro-batch losses already add up to the mini-batch loss;
            Megatron divides each micro-batch loss by ``num_microbatches`` and averages gradients
            over data-parallel ranks, so pass ``num_microbatches * data_parallel_size`` to undo
            both.

    Returns ``(loss, metrics)`` as Megatron's schedules expect: a 0-d tensor and a dict of
    0-d tensors (``calibrl/<name>``).
    """
    if output_tensor.dim() != 3 or output_tensor.shape[:2] != labels.shape:
        raise ValueError(
            f"`output_tensor` must be [B, S, V/tp] matching labels {tuple(labels.shape)}, "
            f"got {tuple(output_tensor.shape)}"
        )
    group = tp_group if tp_group is not None else tensor_parallel_group()
    n, v_local = labels.numel(), output_tensor.shape[-1]
    logits = output_tensor.reshape(n, v_local)
    flat_labels = labels.reshape(n).long()
    if inputs.mask is not None:
        flat_labels = torch.where(inputs.mask.reshape(n) != 0, flat_labels, torch.full_like(flat_labels, -1))
    loss, metrics = vocab_parallel_calibrl_loss(
        logits,
        flat_labels,
        inputs,
        Config.coerce(config),
        group=group,
        token_shape=tuple(labels.shape),
        temperature=temperature,
        inplace=inplace,
    )
    reported = {f"calibrl/{k}": torch.tensor(v, device=loss.device) for k, v in metrics.items()}
    return loss * loss_scale, reported
