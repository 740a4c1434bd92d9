"""What the framework drop-ins share: checks of a micro-batch's inputs (clear errors naming the
argument, raised before anything runs) and carrying the expert baseline per row."""

from __future__ import annotations

import torch

from ..config import Config
from ..ops import LossInputs

_ROW_FIELDS = ("advantages", "weights", "signs", "is_expert", "expert_index")
_TOKEN_FIELDS = ("mask", "old_logprobs", "ref_logprobs")


def needs_expert(cfg: Config) -> bool:
    """Whether the loss reads ``expert_logprobs`` (CalibRL's exploration term with the expert
    baseline, λ > 0)."""
    d = cfg.to_dict()
    return d["loss"] == "calibrl" and float(d["lambda"]) != 0.0 and d["baseline"] == "expert"


def check_inputs(inputs: LossInputs, token_shape: tuple, cfg: Config, arg: str = "inputs") -> None:
    """Row and token tensors must match ``token_shape`` (padded ``[B, S]``); a CalibRL config that
    reads the expert baseline must get it. Raises ``ValueError`` naming the argument."""
    if not isinstance(inputs, LossInputs):
        raise TypeError(f"`{arg}` must be a calibrl.LossInputs, got {type(inputs).__name__}")
    if len(token_shape) != 2:
        raise ValueError(f"`{arg}`: the drop-ins take the padded [B, S] layout, got token shape {token_shape}")
    rows = token_shape[0]
    for name in _ROW_FIELDS:
        t = getattr(inputs, name)
        if t is not None and tuple(t.shape) != (rows,):
            raise ValueError(f"`{arg}.{name}` has shape {tuple(t.shape)}, expected [{rows}] (one value per row)")
    for name in _TOKEN_FIELDS:
        t = getattr(inputs, name)
        if t is not None and tuple(t.shape) != tuple(token_shape):
            raise ValueError(f"`{arg}.{name}` has shape {tuple(t.shape)}, expected {tuple(token_shape)}")
    if needs_expert(cfg):
        if inputs.expert_logprobs is None:
            raise ValueError(
                f"`{arg}.expert_logprobs` is missing: this config (loss 'calibrl', λ > 0, expert baseline) "
                "needs the expert responses' log-probs from the no-grad pass (or use the 'grpo' preset)"
            )
        if inputs.expert_index is None:
            raise ValueError(f"`{arg}.expert_index` is missing: each row's expert slot (−1 for none)")


def per_row_expert(expert_logprobs, expert_index, expert_mask=None):
    """The expert baseline carried per row: row i gets a copy of its group's expert response.

    ``expert_logprobs [P, S*]`` (padded, with optional ``expert_mask``) and ``expert_index [B]``
    (each row's slot, −1 for none) become ``(logprobs [B, S*], mask [B, S*], index [B])`` with
    ``index[i] = i`` (or −1). Rows can then be split over ranks and micro-batches (DeepSpeed's
    data loader, Megatron's context-parallel slicing) like any other per-row tensor.
    """
    index = torch.as_tensor(expert_index).long()
    if expert_logprobs.dim() != 2:
        raise ValueError(f"`expert_logprobs` must be padded [P, S*], got shape {tuple(expert_logprobs.shape)}")
    p = expert_logprobs.shape[0]
    if index.numel() and (int(index.max()) >= p or int(index.min()) < -1):
        raise ValueError(f"`expert_index` holds slots outside [-1, {p}) for {p} expert rows")
    mask = torch.ones_like(expert_logprobs) if expert_mask is None else expert_mask.to(expert_logprobs.dtype)
    has = index >= 0
    safe = index.clamp(min=0)
    rows_lp = torch.where(has[:, None], expert_logprobs[safe], torch.zeros_like(expert_logprobs[safe]))
    rows_mask = torch.where(has[:, None], mask[safe], torch.zeros_like(mask[safe]))
    rows_index = torch.where(has, torch.arange(index.numel()), torch.full_like(index, -1))
    return rows_lp, rows_mask, rows_index


def masked_labels(labels: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """``labels`` flattened, with −1 (not computed) where ``inputs.mask`` is 0."""
    flat = labels.reshape(-1).long()
    if inputs.mask is not None:
        flat = torch.where(inputs.mask.reshape(-1) != 0, flat, torch.full_like(flat, -1))
    return flat
