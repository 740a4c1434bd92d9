"""verl drop-in: CalibRL registered as a verl policy loss named ``"calibrl"``.

Importing this module registers the loss with ``verl.trainer.ppo.core_algos.register_policy_loss``.
Select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=calibrl`` and put CalibRL's keys
under ``actor_rollout_ref.actor.policy_loss.calibrl`` (or ``actor_rollout_ref.actor.calibrl``)::

    calibrl:
      preset: paper            # paper | reference | grpo
      lambda: 0.1              # any key of calibrl.Config
      alpha: 0.5

verl's own ``clip_ratio_low``/``clip_ratio_high``/``clip_ratio_c`` and ``loss_agg_mode`` map to
``clip_low``/``clip_high``/``dual_clip``/``agg`` unless the ``calibrl`` block sets them.

verl's policy-loss signature carries no expert data, so the actor hands the micro-batch's extra
tensors over with :func:`micro_batch` (one line around the ``policy_loss_fn`` call)::

    with calibrl.integrations.verl.micro_batch(model_inputs):
        pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = policy_loss_fn(...)

``model_inputs`` may hold (all optional; missing → that feature is off):
``calibrl_expert_log_probs [P, S*]`` (+ ``calibrl_expert_mask``), ``calibrl_expert_index [B]``,
``calibrl_correct [B]`` (else ``calibrl_rewards [B]`` > τ, else the sign of the advantage),
``calibrl_ref_log_prob [B, S]``, ``calibrl_normalizers`` ``(token_count, seq_count)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

from ..autograd import calibrl_loss
from ..config import Config
from ..ops import LossInputs

LOSS_NAME = "calibrl"
_VERL_TO_CALIBRL = {"clip_ratio_low": "clip_low", "clip_ratio_high": "clip_high", "clip_ratio_c": "dual_clip"}
_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("calibrl_verl_micro_batch", default=None)


@contextlib.contextmanager
def micro_batch(data: Any):
    """Makes a micro-batch's ``calibrl_*`` tensors visible to the policy loss inside the block."""
    token = _current.set(data)
    try:
        yield
    finally:
        _current.reset(token)


def _get(obj, key: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    try:
        value = obj.get(key, default)  # DictConfig, verl's BaseConfig, TensorDict
        return default if value is None else value
    except (AttributeError, TypeError, KeyError):
        return getattr(obj, key, default)


def _to_dict(block) -> dict:
    if block is None:
        return {}
    if isinstance(block, dict):
        return dict(block)
    try:
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(block, resolve=True))
    except Exception:
        return dict(block)


def config_from_verl(config, loss_agg_mode: str) -> Config:
    """The CalibRL configuration for verl's actor ``config`` and ``loss_agg_mode``."""
    block = _get(config, "calibrl") or _get(_get(config, "policy_loss"), "calibrl")
    keys = _to_dict(block)
    preset = keys.pop("preset", "paper")
    clip = _get(config, "clip_ratio")
    for verl_key, ours in _VERL_TO_CALIBRL.items():
        value = _get(config, verl_key)
        if value is None and verl_key != "clip_ratio_c":
            value = clip
        if value is not None:
            keys.setdefault(ours, float(value))
    keys.setdefault("agg", loss_agg_mode)
    if keys["agg"] == "seq-mean-token-sum-norm":
        keys.setdefault("t_norm", float(_get(config, "loss_scale_factor") or 0) or None)
    return Config(preset, **keys)


def compute_policy_loss_calibrl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_log_probs: torch.Tensor | None = None,
):
    """verl policy loss: returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.

    ``pg_loss`` is the CalibRL objective ``L_pg + λ·L_explore`` (plus CalibRL's own entropy/KL
    terms only if its ``calibrl`` block turns them on; verl adds its own otherwise).
    """
    cfg = config_from_verl(config, loss_agg_mode)
    extra = _current.get()
    mask = response_mask.to(log_prob.dtype)
    counts = mask.sum(-1)
    # verl's outcome advantages are per-row constants broadcast over the response tokens.
    row_adv = ((advantages * mask).sum(-1) / counts.clamp(min=1)).detach()
    rarity = cfg["rarity_weighting"]
    weights = row_adv.abs() if rarity else torch.ones_like(row_adv)
    correct = _get(extra, "calibrl_correct")
    rewards = _get(extra, "calibrl_rewards")
    if correct is not None:
        signs = torch.where(torch.as_tensor(correct).to(row_adv.device).bool(), 1.0, -1.0)
    elif rewards is not None:
        signs = torch.where(torch.as_tensor(rewards).to(row_adv.device) > cfg["correct_threshold"], 1.0, -1.0)
    else:
        signs = torch.where(row_adv > 0, 1.0, -1.0)
    expert_lp = _get(extra, "calibrl_expert_log_probs")
    inputs = LossInputs(
        advantages=row_adv.float(),
        weights=weights.float(),
        signs=signs.float(),
        mask=response_mask,
        old_logprobs=old_log_prob.detach(),
        ref_logprobs=_get(extra, "calibrl_ref_log_prob"),
        expert_logprobs=expert_lp,
        expert_mask=_get(extra, "calibrl_expert_mask") if expert_lp is not None else None,
        expert_index=_get(extra, "calibrl_expert_index") if expert_lp is not None else None,
        normalizers=_get(extra, "calibrl_normalizers"),
    )
    if expert_lp is None and cfg["loss"] == "calibrl" and cfg["lambda"] != 0 and cfg["baseline"] == "expert":
        raise ValueError(
            "calibrl policy loss: no expert log-probs for this micro-batch; wrap the policy_loss_fn "
            "call in `calibrl.integrations.verl.micro_batch(model_inputs)` with "
            "`calibrl_expert_log_probs`/`calibrl_expert_index`, or use the `grpo` preset"
        )
    loss, metrics = calibrl_loss(log_prob, inputs, cfg)
    device = log_prob.device
    return (
        loss,
        torch.tensor(metrics["clipfrac"], device=device),
        torch.tensor(metrics["ppo_kl"], device=device),
        torch.tensor(metrics["clipfrac_lower"], device=device),
    )


def register(core_algos=None):
    """Registers the loss under ``"calibrl"`` in verl's registry (done on import)."""
    if core_algos is None:
        from verl.trainer.ppo import core_algos
    core_algos.register_policy_loss(LOSS_NAME)(compute_policy_loss_calibrl)
    return compute_policy_loss_calibrl


try:
    register()
except ImportError:  # verl is not installed: call register(core_algos) yourself
    pass
