"""verl drop-in (verl 0.9.1): CalibRL as the registered policy loss ``"calibrl"``.

Fitted to verl 0.9.1's own code (see integration/verl/README.md):

* :func:`compute_policy_loss_calibrl` — registered with ``register_policy_loss("calibrl")``;
  verl's policy-loss signature and return value ``(pg_loss, metrics_dict)``; normalises by
  ``config.global_batch_info`` exactly as verl's ``agg_loss`` (``dp_size``,
  ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``); ``rollout_is_weights``
  become the library's ``token_weights``; verl's Clip-Cov/KL-Cov keys are honoured.
* :func:`ppo_loss` — verl's engine loss function (``verl.workers.utils.losses.ppo_loss``) with
  the micro-batch's ``calibrl_*`` tensors made visible to the policy loss (verl's policy-loss
  call carries no expert data). ``CalibRLActorRolloutRefWorker`` installs it.
* Per-row expert data: ``calibrl_expert_log_probs [B, S*]`` (+ ``calibrl_expert_mask``) holds
  each rollout row's own expert response log-probs, so any split, shuffle or DP dispatch of the
  batch keeps rows and baselines together. The expert pass (one no-grad forward with verl's
  ``compute_log_prob``) is :func:`attach_expert_log_probs_tq` on the V1 trainer's
  TransferQueue batch and :func:`attach_expert_log_probs` on a ``DataProto``.
* verl's default V1 trainer: :func:`trainer_class` (the actor roles on CalibRL's worker, the
  expert pass in ``_update_actor``), ``CalibRLTaskRunnerV1`` and :func:`main` (what
  ``python -m calibrl.integrations.verl_main`` runs).

verl's classes are built on first use (module ``__getattr__``): a missing optional package of
verl is an ``ImportError`` there, naming the package and the install command.

Configuration (Hydra overrides verl accepts)::

    actor_rollout_ref.actor.policy_loss._target_=calibrl.integrations.verl.CalibRLPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=calibrl
    +actor_rollout_ref.actor.policy_loss.calibrl={preset:paper,lambda:0.1,alpha:0.5}
    algorithm.adv_estimator=grpo
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch

from ..autograd import calibrl_loss
from ._common import needs_expert
from ..config import Config
from ..ops import LossInputs

LOSS_NAME = "calibrl"
SUPPORTED_VERL = ("0.9.1",)

# Per-row batch keys (batch dimension B = the rollout rows).
EXPERT_RESPONSES = "calibrl_expert_responses"  # [B, S*] expert response token ids (input)
EXPERT_LOG_PROBS = "calibrl_expert_log_probs"  # [B, S*] the row's expert response log-probs
EXPERT_MASK = "calibrl_expert_mask"  # [B, S*] expert token mask
CORRECT = "calibrl_correct"  # [B] 1 = correct rollout
SCORES = "token_level_scores"  # verl's rewards [B, S]: correctness when CORRECT is absent
V1_SCORES = "rm_scores"  # the same rewards as the V1 trainer keeps them (TransferQueue)
KEYS = (EXPERT_LOG_PROBS, EXPERT_MASK, CORRECT, SCORES, V1_SCORES)

# verl owns these; the calibrl block must not contradict them.
_VERL_OWNED = {
    "clip_low": "actor_rollout_ref.actor.clip_ratio_low",
    "clip_high": "actor_rollout_ref.actor.clip_ratio_high",
    "dual_clip": "actor_rollout_ref.actor.clip_ratio_c",
    "agg": "actor_rollout_ref.actor.loss_agg_mode",
    "t_norm": "actor_rollout_ref.actor.loss_scale_factor",
    "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
    "kl_coef": "actor_rollout_ref.actor.use_kl_loss / kl_loss_coef",
}

# verl's entropy-control keys (``policy_loss.*``) and the library's keys they set; a key given
# in the calibrl block wins over verl's.
VERL_ENTROPY_KEYS = {
    "clip_cov_ratio": "clip_cov_ratio",
    "clip_cov_lb": "clip_cov_lb",
    "clip_cov_ub": "clip_cov_ub",
    "kl_cov_ratio": "kl_cov_ratio",
    "kl_cov_coef": "ppo_kl_coef",
}

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("calibrl_verl_micro_batch", default=None)


# ------------------------------------------------------------------------------ configuration

def _get(obj, key: str, default=None):
    if obj is None:
        return default
    try:
        value = obj.get(key, default)  # dict, DictConfig, verl's BaseConfig
    except (AttributeError, TypeError):
        value = getattr(obj, key, default)
    return default if value is None else value


def _block(config) -> dict:
    block = _get(_get(config, "policy_loss"), "calibrl")
    if block is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(block, DictConfig):
            return dict(OmegaConf.to_container(block, resolve=True))
    except ImportError:
        pass
    return dict(block)


def config_from_verl(config, loss_agg_mode: str, horizon: int | None = None, seq_count: float = 1.0) -> Config:
    """The CalibRL configuration for verl's actor ``config`` (ActorConfig or a mapping).

    ``policy_loss.calibrl`` gives CalibRL's own keys; verl's ``clip_ratio``/``clip_ratio_low``/
    ``clip_ratio_high``/``clip_ratio_c``/``loss_agg_mode``/``loss_scale_factor`` give the rest.
    verl's entropy-control keys (``policy_loss.clip_cov_ratio``, ``clip_cov_lb``,
    ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``) are used where the block does not set
    the library's twin; the block's key wins when both are given.
    verl's ``seq-mean-token-sum-norm`` divides the token sum by the sequence count *and* by
    ``loss_scale_factor`` (else the padded length ``horizon``): CalibRL's ``t_norm`` is their
    product (``seq_count``: the normaliser's sequence count).
    """
    keys = _block(config)
    for ours, verl_key in _VERL_OWNED.items():
        if ours in keys:
            raise ValueError(
                f"calibrl: `policy_loss.calibrl.{ours}` is set by verl's `{verl_key}`; remove it from the block"
            )
    preset = keys.pop("preset", "paper")
    clip = _get(config, "clip_ratio", 0.2)
    keys["clip_low"] = float(_get(config, "clip_ratio_low", clip))
    keys["clip_high"] = float(_get(config, "clip_ratio_high", clip))
    keys["dual_clip"] = float(_get(config, "clip_ratio_c", 3.0))
    keys["agg"] = loss_agg_mode
    policy_loss = _get(config, "policy_loss")
    for ours, verl_key in VERL_ENTROPY_KEYS.items():
        value = _get(policy_loss, verl_key)
        if ours not in keys and value is not None:
            keys[ours] = float(value)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        # verl's agg_loss: loss_scale_factor, else the padded response length.
        info = _get(config, "global_batch_info", {})
        scale = _get(info, "loss_scale_factor") or _get(config, "loss_scale_factor") or horizon
        keys["t_norm"] = float(scale) * float(seq_count)
    return Config(preset, **keys)


# ------------------------------------------------------------------------------ the policy loss


def _normalizers(config, response_mask: torch.Tensor, loss_agg_mode: str):
    """``(normalizers, dp_size)`` that reproduce verl's agg_loss: the global mini-batch's counts
    (all ranks), by which the library divides; the caller multiplies the loss by dp_size, as
    agg_loss does (DDP/FSDP average the gradients; ``token-sum``: the local sum times dp_size).
    One scale for every term keeps CalibRL's own terms right too (the paper's seq-mean
    ``L_explore`` under any ``loss_agg_mode``)."""
    info = _get(config, "global_batch_info", {}) or {}
    dp = int(_get(info, "dp_size", 1))
    tokens = _get(info, "batch_num_tokens")
    seqs = _get(info, "global_batch_size")
    if tokens is None and seqs is None:
        if dp > 1 and loss_agg_mode != "token-sum":
            raise ValueError("calibrl: `global_batch_info` needs batch_num_tokens and global_batch_size when dp_size > 1")
        return None, dp  # this micro-batch's own counts, as agg_loss
    if loss_agg_mode == "token-mean" and tokens is None:
        raise ValueError("calibrl: `global_batch_info.batch_num_tokens` is required for token-mean")
    if loss_agg_mode.startswith("seq-mean") and seqs is None:
        raise ValueError("calibrl: `global_batch_info.global_batch_size` is required for " + loss_agg_mode)
    # A count verl does not give (one the mode does not use) is estimated from this rank's.
    token_count = float(tokens) if tokens is not None else float(response_mask.sum()) * dp
    seq_count = float(seqs) if seqs is not None else float((response_mask.sum(-1) > 0).sum()) * dp
    return (token_count, seq_count), dp


def _row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CalibRL's advantages are outcome-level: one value per row. Token-varying ones (GAE,
    per-token rewards) would be silently averaged, so they are an error."""
    m = mask.bool()
    big = torch.finfo(advantages.dtype).max
    hi = torch.where(m, advantages, -big).amax(-1)
    lo = torch.where(m, advantages, big).amin(-1)
    has = m.any(-1)
    spread = torch.where(has, hi - lo, torch.zeros_like(hi))
    scale = torch.where(has, hi.abs().maximum(lo.abs()), torch.zeros_like(hi))
    bad = spread > 1e-6 * (1 + scale)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"calibrl: `advantages` vary across the tokens of row {row} (spread {float(spread[row]):.3g}); CalibRL "
            "takes outcome-level advantages (e.g. algorithm.adv_estimator=grpo), not per-token ones"
        )
    return torch.where(has, hi, torch.zeros_like(hi)).detach()


def compute_policy_loss_calibrl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl 0.9.1 policy loss: returns ``(pg_loss, metrics)``.

    ``pg_loss`` is CalibRL's ``L_pg + λ·L_explore`` with the gradient computed by libcalibrl,
    normalised as verl's ``agg_loss``; verl adds its own entropy and KL terms around it.
    """
    if config is None:
        raise ValueError("calibrl: `config` (verl's actor config) is required")
    mask = response_mask.bool()
    normalizers, dp_size = _normalizers(config, mask, loss_agg_mode)
    seq_count = normalizers[1] if normalizers is not None else float(mask.any(-1).sum())
    cfg = config_from_verl(config, loss_agg_mode, horizon=mask.shape[-1], seq_count=seq_count)
    extra = _current.get() or {}
    row_adv = _row_advantages(advantages, mask).float()
    weights = row_adv.abs() if cfg["rarity_weighting"] else torch.ones_like(row_adv)
    correct = extra.get(CORRECT)
    scores = extra.get(SCORES) if extra.get(SCORES) is not None else extra.get(V1_SCORES)
    if correct is None and scores is not None:
        # verl's outcome reward, summed over the row (it sits on the last token) > τ.
        correct = scores.sum(-1) > cfg["correct_threshold"]
    if correct is not None:
        if correct.shape != row_adv.shape:
            raise ValueError(f"calibrl: `{CORRECT}` has shape {tuple(correct.shape)}, expected ({row_adv.shape[0]},)")
        signs = torch.where(correct.to(row_adv.device).bool(), 1.0, -1.0)
    else:
        signs = torch.where(row_adv > 0, 1.0, -1.0)  # no rewards in the batch: above the group mean
    expert_lp = extra.get(EXPERT_LOG_PROBS)
    expert_mask = extra.get(EXPERT_MASK)
    if expert_lp is None and needs_expert(cfg):
        raise ValueError(
            f"calibrl: the `{cfg['loss']}` loss with λ={cfg['lambda']} needs `{EXPERT_LOG_PROBS}` in the batch "
            "(attach it with calibrl.integrations.verl.attach_expert_log_probs and run the actor with "
            "CalibRLActorRolloutRefWorker), or use the `grpo` preset"
        )
    index = None
    if expert_lp is not None:
        if expert_lp.dim() != 2 or expert_lp.shape[0] != row_adv.shape[0]:
            raise ValueError(
                f"calibrl: `{EXPERT_LOG_PROBS}` has shape {tuple(expert_lp.shape)}, expected "
                f"({row_adv.shape[0]}, S*): one expert row per rollout row"
            )
        if expert_mask is not None and expert_mask.shape != expert_lp.shape:
            raise ValueError(
                f"calibrl: `{EXPERT_MASK}` has shape {tuple(expert_mask.shape)}, expected {tuple(expert_lp.shape)}"
            )
        # Row i's expert is expert row i; a row whose expert mask is empty has none.
        has = expert_mask.bool().any(-1) if expert_mask is not None else torch.ones_like(mask[:, 0])
        index = torch.where(has, torch.arange(len(has), device=has.device), -1)
    inputs = LossInputs(
        advantages=row_adv,
        weights=weights.float(),
        signs=signs.float(),
        mask=mask,
        old_logprobs=old_log_prob.detach(),
        expert_logprobs=None if expert_lp is None else expert_lp.detach(),
        expert_mask=expert_mask,
        expert_index=index,
        normalizers=normalizers,
        token_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
    )
    loss, m = calibrl_loss(log_prob, inputs, cfg)
    loss = loss * dp_size  # verl's agg_loss: global normalisers times dp_size (DP averages gradients)
    metrics = {
        "actor/pg_clipfrac": m["clipfrac"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": m["clipfrac_lower"],
        "actor/calibrl_pg_loss": m["pg_loss"],
        "actor/calibrl_explore_loss": m["explore_loss"],
        "actor/calibrl_mean_delta": m["mean_delta"],
        "actor/calibrl_frac_correct": m["frac_correct"],
    }
    control = cfg["entropy_control"]
    if control == "kl_cov":
        # verl's KL-Cov reports mean |ℓ − ℓold| over the micro-batch's tokens as ppo_kl.
        kl = (log_prob.detach() - old_log_prob.detach()).abs()
        metrics["actor/ppo_kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
    if control != "none":
        metrics["actor/cov_selected_frac"] = m["cov_selected_frac"]
    return loss, metrics


# ------------------------------------------------------------------------------ engine loss


@contextlib.contextmanager
def micro_batch(data):
    """Makes a micro-batch's ``calibrl_*`` tensors (padded) visible to the policy loss."""
    extra = {}
    for key in KEYS:
        value = data.get(key, None) if key in data.keys() else None
        if value is not None and getattr(value, "is_nested", False):
            value = value.to_padded_tensor(0.0)
        extra[key] = value
    token = _current.set(extra)
    try:
        yield
    finally:
        _current.reset(token)


def ppo_loss(config, model_output, data, dp_group=None):
    """verl's engine loss (``verl.workers.utils.losses.ppo_loss``) with CalibRL's per-row
    tensors of this micro-batch handed to the registered policy loss."""
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    with micro_batch(data):
        return verl_ppo_loss(config, model_output, data, dp_group)


def install(worker) -> None:
    """Points an initialised ``ActorRolloutRefWorker``'s actor at :func:`ppo_loss`."""
    import functools

    loss_fn = worker.loss_fn
    config = loss_fn.keywords["config"]
    worker.loss_fn = functools.partial(ppo_loss, config=config)
    worker.actor.set_loss_fn(worker.loss_fn)


# ------------------------------------------------------------------------------ expert pass


def expert_batch(batch, responses: torch.Tensor, response_mask: torch.Tensor):
    """A DataProto of each row's prompt followed by its expert response (``[B, S*]`` ids and
    mask), in verl's left/right-padded layout, for ``compute_log_prob``."""
    from verl import DataProto

    prompts = batch.batch["prompts"]
    lp = prompts.shape[1]
    prompt_mask = batch.batch["attention_mask"][:, :lp]
    if responses.shape[0] != prompts.shape[0] or response_mask.shape != responses.shape:
        raise ValueError(
            f"calibrl: `{EXPERT_RESPONSES}` {tuple(responses.shape)} / mask {tuple(response_mask.shape)} "
            f"do not match the batch ({prompts.shape[0]} rows)"
        )
    rmask = response_mask.to(prompt_mask.dtype)
    attention = torch.cat([prompt_mask, rmask], 1)
    position = (attention.cumsum(1) - 1).clamp(min=0)
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention,
            "position_ids": position,
            "response_mask": rmask,
        },
        meta_info=dict(batch.meta_info),
    )


def attach_expert_log_probs(batch, compute_log_prob) -> None:
    """Runs the expert no-grad forward pass and attaches ``calibrl_expert_log_probs`` and
    ``calibrl_expert_mask`` (``[B, S*]``) to ``batch`` (a DataProto).

    ``batch.batch`` holds ``calibrl_expert_responses [B, S*]`` (+ ``calibrl_expert_mask``): each
    row's expert response, repeated over a prompt's rollouts like the prompt itself.
    ``compute_log_prob(expert_dp)`` returns the ``[B, S*]`` response log-probs under the current
    actor: in a RayPPOTrainer ``lambda d: self._compute_old_log_prob(d)[0].batch["old_log_probs"]``
    (verl's own ``compute_log_prob`` on the actor workers).
    """
    if EXPERT_RESPONSES not in batch.batch.keys():
        raise ValueError(f"calibrl: the batch has no `{EXPERT_RESPONSES}` (each row's expert response ids)")
    responses = batch.batch[EXPERT_RESPONSES]
    mask = batch.batch[EXPERT_MASK] if EXPERT_MASK in batch.batch.keys() else torch.ones_like(responses)
    log_probs = compute_log_prob(expert_batch(batch, responses, mask))
    if tuple(log_probs.shape) != tuple(responses.shape):
        raise ValueError(
            f"calibrl: compute_log_prob returned {tuple(log_probs.shape)}, expected {tuple(responses.shape)}"
        )
    batch.batch[EXPERT_LOG_PROBS] = log_probs.detach().float()
    batch.batch[EXPERT_MASK] = mask.to(torch.float32)


def _rows(t: torch.Tensor) -> list:
    """A padded ``[B, L]`` or nested ``[B, j]`` tensor as a list of its rows."""
    return list(t.unbind()) if getattr(t, "is_nested", False) else list(t)


def attach_expert_log_probs_tq(batch, compute_log_prob, temperature: float = 1.0) -> None:
    """The expert pass of verl's V1 trainer, whose batch lives in the TransferQueue (``batch``:
    the trainer's ``KVBatchMeta``).

    Reads each row's ``prompts`` and ``calibrl_expert_responses``/``calibrl_expert_mask``
    (``[S*]`` per row, from the dataset) from the queue, puts the expert sequences (the row's
    prompt + its expert response) under temporary keys, runs ``compute_log_prob`` on them (the
    actor workers' no-grad pass: ``trainer.actor_rollout_wg.compute_log_prob``, as the trainer's
    own ``_compute_old_log_prob``), writes ``calibrl_expert_log_probs`` and ``calibrl_expert_mask``
    (``[S*]``) to the rows' keys and clears the temporary keys.
    """
    tq = _require("transfer_queue", "the V1 trainer's expert pass")
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.workers.utils.padding import response_from_nested

    keys, partition = list(batch.keys), batch.partition_id
    fields = ["prompts", EXPERT_RESPONSES, EXPERT_MASK]
    try:
        data = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=fields)
    except Exception as e:  # TransferQueue names no field; say which ones the pass reads
        raise ValueError(
            f"calibrl: the expert pass reads {fields} of every row from the TransferQueue; put "
            f"`{EXPERT_RESPONSES}` and `{EXPERT_MASK}` ([S*] per sample) in your dataset ({e})"
        ) from e
    prompts = _rows(data["prompts"])
    responses, masks = _rows(data[EXPERT_RESPONSES]), _rows(data[EXPERT_MASK])
    seqs, tags, expert = [], [], []
    for prompt, resp, mask in zip(prompts, responses, masks):
        tokens = resp[mask.bool()]
        if len(tokens) == 0:  # no expert for this row: score one placeholder token, masked out below
            tokens = resp[:1]
        expert.append(tokens)
        seqs.append(torch.cat([prompt.to(tokens.dtype), tokens]))
        tags.append({"status": "success", "prompt_len": len(prompt), "response_len": len(tokens),
                     "seq_len": len(prompt) + len(tokens)})

    def nested(rows):
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)

    ones = [torch.ones(len(t), dtype=torch.int64) for t in expert]
    tmp_keys = [f"{k}/calibrl_expert" for k in keys]
    tq.kv_batch_put(
        keys=tmp_keys,
        partition_id=partition,
        fields=TensorDict(
            {
                "prompts": nested(prompts),
                "responses": nested(expert),
                "input_ids": nested(seqs),
                "attention_mask": nested([torch.ones(len(s), dtype=torch.int64) for s in seqs]),
                "position_ids": nested([torch.arange(len(s)) for s in seqs]),
                "response_mask": nested(ones),
                "loss_mask": nested([o.clone() for o in ones]),
            },
            batch_size=len(keys),
        ),
        tags=tags,
    )
    try:
        meta = KVBatchMeta(partition_id=partition, keys=tmp_keys, tags=tags,
                           extra_info={"calculate_entropy": False, "compute_loss": False, "temperature": temperature})
        compute_log_prob(meta)
        out = tq.kv_batch_get(keys=tmp_keys, partition_id=partition, select_fields=["log_probs", "response_mask"])
        scored = _rows(response_from_nested(out["log_probs"], out["response_mask"]))
    finally:
        tq.kv_clear(keys=tmp_keys, partition_id=partition)
    width = max(len(r) for r in responses)
    log_probs = torch.zeros(len(keys), width)
    expert_mask = torch.zeros(len(keys), width)
    for i, (lp, mask) in enumerate(zip(scored, masks)):
        m = mask.bool()
        if m.any():
            log_probs[i, : len(mask)][m] = lp.detach().float()
            expert_mask[i, : len(mask)] = m.float()
    tq.kv_batch_put(
        keys=keys,
        partition_id=partition,
        fields=TensorDict({EXPERT_LOG_PROBS: log_probs, EXPERT_MASK: expert_mask}, batch_size=len(keys)),
    )
    if batch.fields is not None:  # the workers read the fields the batch's metadata lists
        batch.fields = list(dict.fromkeys([*batch.fields, EXPERT_LOG_PROBS, EXPERT_MASK]))


def attach_correctness(batch, threshold: float = 0.1, key: str = "token_level_scores") -> None:
    """``calibrl_correct [B]``: the row's outcome reward (sum of verl's ``token_level_scores``)
    is above ``threshold`` (CalibRL's τ)."""
    if key not in batch.batch.keys():
        raise ValueError(f"calibrl: the batch has no `{key}` to derive correctness from")
    batch.batch[CORRECT] = (batch.batch[key].sum(-1) > threshold).to(torch.float32)


# ------------------------------------------------------------------------------ verl's classes

# verl and the optional packages of its `verl-core` extra that the classes below import, by
# module name: the pip requirement the error message names (integration/verl/requirements.txt).
_PIP = {
    "verl": "verl==0.9.1",
    "hydra": "hydra-core",
    "transfer_queue": "TransferQueue==0.1.10",
    "cachetools": "cachetools",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "zmq": "pyzmq",
    "msgspec": "msgspec",
}
INSTALL = "pip install -r integration/verl/requirements.txt"


def _missing(what: str, error: ModuleNotFoundError) -> ImportError:
    module = (error.name or "").split(".")[0]
    package = _PIP.get(module, module)
    return ImportError(
        f"calibrl: {what} needs the package `{package}`, which is not installed (import failed: {error}). "
        f"Install the verl drop-in's pinned requirements: `{INSTALL}` (from the calibrl repository), "
        f"or `pip install {package}`"
    )


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise _missing(what, e) from e


def _build_policy_loss_config():
    from verl.workers.config import PolicyLossConfig

    @dataclass
    class CalibRLPolicyLossConfig(PolicyLossConfig):
        """verl's ``PolicyLossConfig`` plus the ``calibrl`` block (any key of calibrl.Config)."""

        calibrl: dict = field(default_factory=dict)

    return CalibRLPolicyLossConfig


def _build_worker():
    from verl.single_controller.base.decorator import Dispatch, register as register_dispatch
    from verl.workers.engine_workers import ActorRolloutRefWorker

    class CalibRLActorRolloutRefWorker(ActorRolloutRefWorker):
        """verl's ActorRolloutRefWorker whose actor update uses :func:`ppo_loss`."""

        @register_dispatch(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self):
            super().init_model()
            if self.actor is not None:
                install(self)

    return CalibRLActorRolloutRefWorker


_trainers: dict = {}


def trainer_class(base):
    """CalibRL's V1 trainer over verl's V1 trainer class ``base`` (``PPOTrainerSync`` for the
    default ``trainer.v1.trainer_mode=sync``): the actor roles run
    ``CalibRLActorRolloutRefWorker`` (with or without the reference policy, i.e. also when
    ``use_kl_loss=True``), and ``_update_actor`` runs the expert pass first."""
    if getattr(base, "calibrl_trainer", False):
        return base
    if base in _trainers:
        return _trainers[base]

    class CalibRLTrainer(base):
        calibrl_trainer = True

        def _init_resource_pool_mgr(self):
            import ray
            from verl.trainer.ppo.utils import Role

            super()._init_resource_pool_mgr()
            worker = ray.remote(_class("CalibRLActorRolloutRefWorker"))
            for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
                if role in self.role_worker_mapping:
                    self.role_worker_mapping[role] = worker

        def _update_actor(self, batch, metrics):
            actor = self.config.actor_rollout_ref.actor
            if needs_expert(config_from_verl(actor, actor.loss_agg_mode, horizon=1)):
                attach_expert_log_probs_tq(batch, self.actor_rollout_wg.compute_log_prob,
                                           temperature=self.config.actor_rollout_ref.rollout.temperature)
            return super()._update_actor(batch, metrics)

    CalibRLTrainer.__name__ = CalibRLTrainer.__qualname__ = "CalibRL" + base.__name__
    _trainers[base] = CalibRLTrainer
    return CalibRLTrainer


def use_trainer(mode: str) -> type:
    """Makes verl's V1 trainer registry give CalibRL's trainer for ``mode`` in this process (the
    task runner's): ``TaskRunnerV1.run`` looks the trainer up by ``trainer.v1.trainer_mode``,
    and the mode's name also selects verl's behaviour, so it is kept."""
    from verl.trainer.ppo.v1 import trainer_base

    cls = trainer_class(trainer_base.get_trainer_cls(mode))
    trainer_base.TRAINER_REGISTRY[mode] = cls
    return cls


def _build_task_runner():
    import transfer_queue  # noqa: F401  (the runner's trainer needs it: a missing one fails here, not in Ray)
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import trainer_base  # noqa: F401

    class CalibRLTaskRunnerV1(TaskRunnerV1.__ray_metadata__.modified_class.__ray_actor_class__):
        """verl's ``TaskRunnerV1`` (a Ray actor) with CalibRL's trainer for the configured mode."""

        def run(self, config):
            use_trainer(config.trainer.v1.trainer_mode)
            return super().run(config)

    return CalibRLTaskRunnerV1


_BUILDERS = {
    "CalibRLPolicyLossConfig": ("verl's PolicyLossConfig", _build_policy_loss_config),
    "CalibRLActorRolloutRefWorker": ("CalibRLActorRolloutRefWorker", _build_worker),
    "CalibRLTaskRunnerV1": ("the V1 trainer's task runner", _build_task_runner),
}


def _class(name: str):
    what, build = _BUILDERS[name]
    if name not in globals():
        try:
            cls = build()
        except ModuleNotFoundError as e:
            raise _missing(f"`calibrl.integrations.verl.{name}` ({what})", e) from e
        cls.__module__, cls.__qualname__ = __name__, name  # pickled by reference (Ray ships it)
        globals()[name] = cls
    return globals()[name]


def __getattr__(name: str):
    """verl's classes are built on first use, so that a missing optional part of verl is an
    error there, naming the package, not an absent attribute."""
    if name in _BUILDERS:
        return _class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(config) -> None:
    """verl 0.9.1's ``verl.trainer.main_ppo.main`` with CalibRL's trainer (what
    ``python -m calibrl.integrations.verl_main`` runs): the same device and config checks, then
    ``run_ppo`` with :class:`CalibRLTaskRunnerV1`. verl's default V1 trainer only
    (``trainer.use_v1=True``)."""
    import ray

    what = "calibrl.integrations.verl_main"
    try:
        from verl.trainer.main_ppo import run_ppo
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config
        from verl.utils.device import auto_set_device
    except ModuleNotFoundError as e:
        raise _missing(what, e) from e
    if not config.trainer.use_v1:
        raise ValueError(
            f"calibrl: {what} runs verl's default V1 trainer; `trainer.use_v1=False` (main_ppo_v0.py) needs "
            "your own entry module (integration/verl/README.md, 'The deprecated v0 trainer')"
        )
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=ray.remote(_class("CalibRLTaskRunnerV1")))


# ------------------------------------------------------------------------------ registration


def register(core_algos=None):
    """Registers the loss under ``"calibrl"`` in verl's registry (done on import)."""
    if core_algos is None:
        from verl.trainer.ppo import core_algos
    core_algos.register_policy_loss(LOSS_NAME)(compute_policy_loss_calibrl)
    return compute_policy_loss_calibrl


try:
    register()
except ImportError:  # verl is not installed
    pass
