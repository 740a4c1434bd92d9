"""TRL drop-in (trl 1.16.0): :class:`CalibRLGRPOTrainer`, TRL's ``GRPOTrainer`` with the CalibRL loss.

A TRL user changes the trainer and config classes and adds a ``calibrl`` block (any key of
:class:`calibrl.Config`, plus ``preset``); the dataset gains an ``expert`` column (the expert
response as text or token ids). See integration/trl/README.md.

It overrides the two extension points TRL 1.16 has for this:

* ``_generate_and_score_completions`` — after TRL's own generation and scoring, one no-grad
  forward pass over this process's distinct (prompt, expert response) pairs gives the expert's
  token log-probs under the policy of the step's start; each rollout row carries its expert's
  log-probs (``calibrl_expert_logps [B, S*]`` + mask) and its correctness (``calibrl_correct``:
  TRL's weighted reward sum > τ, SPEC §2), so TRL's shuffle and split keep rows and experts together.
* ``_compute_loss`` — TRL's own log-probs and entropies (its fused-LM-head forward), then the
  CalibRL loss by libcalibrl (:func:`calibrl.calibrl_loss`), normalised as TRL's ``loss_type``
  (:func:`normalization`). TRL's own terms stay as TRL computes them: β·KL against the reference
  model (same aggregation), the static entropy bonus, the MoE aux loss; TRL's per-token factors
  on the policy-gradient term (vLLM importance-sampling ratio, off-policy mask,
  ``top_entropy_quantile`` mask) become the library's ``token_weights``; ``tool_mask`` is part of
  the mask.

With ``calibrl={"preset": "grpo"}`` the loss and its gradient equal TRL's own ``GRPOTrainer``
for ``loss_type`` ``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo`` (tests/test_trl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..autograd import calibrl_loss
from ..config import Config
from ..ops import LossInputs
from ._common import needs_expert

SUPPORTED_TRL = ("1.16.0",)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# Per-row keys added to TRL's generation batch (batch dimension B = the rollout rows).
EXPERT_LOGPS = "calibrl_expert_logps"  # [B, S*] the row's expert response log-probs
EXPERT_MASK = "calibrl_expert_mask"  # [B, S*] its token mask (all 0: the row has no expert)
CORRECT = "calibrl_correct"  # [B] 1 = correct rollout (reward > τ)

# TRL's GRPOConfig owns these; the calibrl block must not contradict them.
_TRL_OWNED = {
    "clip_low": "epsilon",
    "clip_high": "epsilon_high",
    "dual_clip": "delta",
    "agg": "loss_type",
    "t_norm": "loss_type / max_completion_length",
    "entropy_coef": "entropy_coef",
    "kl_coef": "beta",
    "kl_kind": "beta (TRL's k3)",
}


def normalization(
    loss_type: str,
    *,
    rows: int,
    tokens: float,
    grad_accum: int,
    num_items_in_batch: float,
    num_processes: int,
    steps_per_generation: int,
    max_completion_length: int,
) -> tuple[str, float | None, tuple[float, float]]:
    """TRL 1.16's ``loss_type`` as the library's ``(agg, t_norm, (token_count, seq_count))`` for
    one micro-batch of ``rows`` rollouts with ``tokens`` counted tokens.

    The counts are this process's share of the accumulation window (``grad_accum`` micro-batches;
    1 in eval): DDP averages the processes' gradients, so each divides by count / processes, as
    TRL does (``grpo``: mean over rows / GA; ``bnpo``: this micro-batch's token mean / GA;
    ``dr_grpo``: sum / (rows·max_completion_length) / GA; ``dapo``: sum / (generation batch's
    ``num_items_in_batch`` / processes · GA / steps_per_generation)). ``seq_count`` (CalibRL's
    sequence-mode exploration term) counts every rollout row of the window, like TRL's ``grpo``.
    """
    seq_count = float(rows * grad_accum)
    local_tokens = max(float(tokens), 1.0) * grad_accum  # TRL's mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        return "seq-mean-token-mean", None, (local_tokens, seq_count)
    if loss_type == "bnpo":
        return "token-mean", None, (local_tokens, seq_count)
    if loss_type == "dr_grpo":
        return "seq-mean-token-sum-norm", float(rows * max_completion_length * grad_accum), (local_tokens, seq_count)
    if loss_type == "dapo":
        count = max(float(num_items_in_batch), 1.0) / num_processes * grad_accum / steps_per_generation
        return "token-mean", None, (count, seq_count)
    raise ValueError(f"calibrl: TRL `loss_type` {loss_type!r} is not supported; use one of {LOSS_TYPES}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, t_norm, normalizers) -> torch.Tensor:
    """A per-token term (TRL's KL) aggregated exactly as the library aggregates ``L_pg``."""
    m = mask.to(per_token.dtype)
    token_count, seq_count = normalizers
    if agg == "token-mean":
        return (per_token * m).sum() / token_count
    if agg == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / seq_count
    if agg == "seq-mean-token-sum-norm":
        return (per_token * m).sum() / t_norm
    raise ValueError(f"calibrl: aggregation {agg!r} has no TRL loss_type")


def config_from_trl(args, agg: str, t_norm: float | None) -> Config:
    """The CalibRL configuration: ``args.calibrl`` (preset + library keys) with TRL's clipping and
    aggregation. TRL's ``delta`` (two-sided clipping) is the dual clip; none = off."""
    keys = dict(getattr(args, "calibrl", None) or {})
    for ours, trl_key in _TRL_OWNED.items():
        if ours in keys:
            raise ValueError(f"calibrl: `calibrl.{ours}` is set by TRL's `{trl_key}`; remove it from the block")
    preset = keys.pop("preset", "paper")
    keys["clip_low"] = float(args.epsilon)
    keys["clip_high"] = float(args.epsilon_high if args.epsilon_high is not None else args.epsilon)
    keys["dual_clip"] = float(args.delta) if args.delta is not None else 0.0
    keys["agg"] = agg
    if t_norm is not None:
        keys["t_norm"] = t_norm
    return Config(preset, **keys)


def check_args(args) -> None:
    """The TRL options this drop-in reproduces; anything else is a clear error, not a silent drop."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"calibrl: TRL `loss_type` {args.loss_type!r} is not supported; use one of {LOSS_TYPES}")
    if args.importance_sampling_level != "token":
        raise ValueError(
            "calibrl: `importance_sampling_level` must be 'token' (CalibRL's ratio clip is per token; "
            f"got {args.importance_sampling_level!r})"
        )
    if getattr(args, "use_adaptive_entropy", False):
        raise ValueError("calibrl: `use_adaptive_entropy` is not supported; use a static `entropy_coef`")
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "calibrl: `use_liger_kernel` replaces TRL's loss with Liger's fused GRPO loss; CalibRL computes its "
            "own loss from TRL's per-token log-probs (turn use_liger_kernel off)"
        )
    config_from_trl(args, "token-mean", None)  # the calibrl block's keys, checked now


def expert_token_ids(value, tokenizer) -> list[int]:
    """An ``expert`` column value as token ids: text (tokenised without special tokens), a list
    of ids, or None/"" for no expert."""
    if value is None:
        return []
    if isinstance(value, str):
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(
        f"calibrl: an expert response must be text or a list of token ids, got {type(value).__name__}"
    )


def _pad_right(rows: list[list[int]], value: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


try:
    from trl import GRPOConfig as _GRPOConfig
    from trl import GRPOTrainer as _GRPOTrainer
except ImportError:  # trl absent: the helpers above still import
    _GRPOTrainer = None

if _GRPOTrainer is not None:
    from trl.models.utils import disable_gradient_checkpointing

    @dataclass
    class CalibRLGRPOConfig(_GRPOConfig):
        """TRL's ``GRPOConfig`` plus ``calibrl`` (preset + keys of calibrl.Config) and the name of
        the dataset column holding each prompt's expert response."""

        calibrl: dict = field(default_factory=dict)
        calibrl_expert_column: str = "expert"

    class CalibRLGRPOTrainer(_GRPOTrainer):
        """TRL's ``GRPOTrainer`` whose policy loss is CalibRL's (libcalibrl)."""

        # The multimodal inputs TRL's loss forwards to the model (the expert pass refuses them).
        _MULTIMODAL = (
            "pixel_values",
            "image_grid_thw",
            "num_images",
            "pixel_attention_mask",
            "spatial_shapes",
            "num_tiles",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        )

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            check_args(self.args)
            self._calibrl_rewards = None

        # ---------------------------------------------------------------- generation batch

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._calibrl_rewards = rewards_per_func  # every process's rows (TRL gathers them)
            return rewards_per_func

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            cfg = Config.coerce({"preset": "paper", **(getattr(self.args, "calibrl", None) or {})})
            # Correctness: the weighted sum of TRL's reward functions (before its group
            # normalisation) > τ, on this process's slice; an unscorable row (NaN) is wrong.
            rpf = self._calibrl_rewards
            rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
            n = len(inputs)
            local = rewards[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
            output[CORRECT] = (local > cfg["correct_threshold"]).float().to(self.accelerator.device)
            if needs_expert(cfg):  # the grpo preset (λ = 0) and the ref_policy baseline need no expert pass
                logps, mask = self._expert_pass(inputs, output["prompt_ids"], output["prompt_mask"], output.keys())
                output[EXPERT_LOGPS], output[EXPERT_MASK] = logps, mask
            return output

        @torch.no_grad()
        def _expert_pass(self, inputs, prompt_ids, prompt_mask, output_keys=()):
            """One no-grad forward pass over the distinct (prompt, expert) pairs of this
            process's generation batch; returns per-row ``[B, S*]`` log-probs and mask."""
            column = getattr(self.args, "calibrl_expert_column", "expert")
            if any(key in self._MULTIMODAL for key in output_keys):
                raise ValueError("calibrl: the expert pass takes text prompts; multimodal inputs are not supported")
            keys, slots, firsts, experts = [], {}, [], []
            for i, row in enumerate(inputs):
                if column not in row:
                    raise ValueError(f"calibrl: the dataset has no `{column}` column (each prompt's expert response)")
                ids = expert_token_ids(row[column], self.processing_class)
                key = (tuple(prompt_ids[i][prompt_mask[i].bool()].tolist()), tuple(ids))
                if ids and key not in slots:
                    slots[key] = len(firsts)
                    firsts.append(i)
                    experts.append(ids)
                keys.append(key)
            device = self.accelerator.device
            width = max((len(e) for e in experts), default=0)
            slot_logps = torch.zeros(len(experts), width, device=device)
            if experts:
                pad = self.processing_class.pad_token_id
                expert_ids = _pad_right(experts, pad, device)
                expert_mask = _pad_right([[1] * len(e) for e in experts], 0, device)
                idx = torch.tensor(firsts, device=device)
                input_ids = torch.cat([prompt_ids[idx], expert_ids], 1)
                attention = torch.cat([prompt_mask[idx], expert_mask], 1)
                with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                    slot_logps, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention, width, batch_size=self.args.per_device_train_batch_size
                    )
            rows_logps = torch.zeros(len(inputs), width, device=device)
            rows_mask = torch.zeros(len(inputs), width, device=device)
            for i, key in enumerate(keys):
                if key in slots:
                    s, length = slots[key], len(key[1])
                    rows_logps[i, :length] = slot_logps[s, :length].float()
                    rows_mask[i, :length] = 1.0
            return rows_logps, rows_mask

        # ---------------------------------------------------------------- the loss

        def _token_weights(self, inputs, per_token_logps, old_logps, advantages, mask, entropy_mask):
            """TRL's per-token factors on the policy-gradient term, or None."""
            w = None

            def times(x):
                x = x.detach().float()
                return x if w is None else w * x

            if self.off_policy_mask_threshold is not None:
                w = times(
                    self.get_off_policy_mask(
                        advantages=advantages[:, None],
                        per_token_logps=per_token_logps,
                        sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logps),
                        mask=mask,
                        off_policy_threshold=self.off_policy_mask_threshold,
                    ).expand_as(mask)
                )
            if entropy_mask is not None:
                w = times(entropy_mask)
            if self.use_vllm and self.vllm_importance_sampling_correction:
                w = times(inputs["importance_sampling_ratio"].expand_as(mask))
            return None if w is None else w.contiguous()

        def _compute_loss(self, model, inputs):
            mode = "train" if self.model.training else "eval"
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{key: inputs.get(key) for key in self._MULTIMODAL},
            )
            entropy_mask = None
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            advantages = inputs["advantages"]
            if advantages.dim() != 1:
                raise ValueError(
                    f"calibrl: `advantages` has shape {tuple(advantages.shape)}; CalibRL takes one outcome-level "
                    "advantage per row"
                )
            old = inputs.get("old_per_token_logps")
            old = per_token_logps.detach() if old is None else old
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1
            agg, t_norm, normalizers = normalization(
                self.loss_type,
                rows=mask.shape[0],
                tokens=float(mask.sum()),
                grad_accum=ga,
                num_items_in_batch=float(inputs["num_items_in_batch"]),
                num_processes=self.accelerator.num_processes,
                steps_per_generation=self.args.steps_per_generation if mode == "train" else 1,
                max_completion_length=self.max_completion_length,
            )
            cfg = config_from_trl(self.args, agg, t_norm)
            adv = advantages.detach().float()
            expert = inputs.get(EXPERT_LOGPS)
            expert_mask = inputs.get(EXPERT_MASK)
            index = None
            if expert is not None:
                has = expert_mask.bool().any(-1)
                index = torch.where(has, torch.arange(len(has), device=has.device), -1)
            ref = inputs.get("ref_per_token_logps")
            correct = inputs.get(CORRECT)
            signs = torch.where(adv > 0, 1.0, -1.0) if correct is None else correct.float() * 2 - 1
            loss, m = calibrl_loss(
                per_token_logps,
                LossInputs(
                    advantages=adv,
                    weights=adv.abs() if cfg["rarity_weighting"] else torch.ones_like(adv),
                    signs=signs,
                    mask=mask.bool(),
                    old_logprobs=old.detach().float(),
                    ref_logprobs=None if ref is None else ref.detach().float(),  # the ref_policy baseline (β > 0)
                    expert_logprobs=expert,
                    expert_mask=expert_mask,
                    expert_index=index,
                    normalizers=normalizers,
                    token_weights=self._token_weights(inputs, per_token_logps, old, adv, mask, entropy_mask),
                ),
                cfg,
            )
            loss = loss.to(per_token_logps.dtype)
            if self.beta != 0.0:
                per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1  # TRL's k3
                if self.args.use_bias_correction_kl:
                    per_token_kl = per_token_kl * torch.exp(per_token_logps - old)
                loss = loss + self.beta * aggregate(per_token_kl, mask, agg, t_norm, normalizers)
                self._metrics[mode]["kl"].append(self._global_mean(per_token_kl, mask))
            if self._entropy_bonus_enabled:  # TRL's static entropy bonus, as TRL computes it
                eff = mask if entropy_mask is None else mask * entropy_mask
                loss = loss - self.entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0) / ga
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["entropy"].append(self._global_mean(entropies, mask))
            for name in ("clipfrac", "clipfrac_lower", "pg_loss", "explore_loss", "mean_delta", "frac_correct"):
                self._metrics[mode][f"calibrl/{name}"].append(m[name])
            return loss

        def _global_mean(self, x, mask) -> float:
            m = mask.to(x.dtype)
            totals = self.accelerator.reduce(torch.stack([(x.detach() * m).sum(), m.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()
