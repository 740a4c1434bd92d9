"""Megatron-Core drop-in: a ``loss_func`` for an RL step on vocabulary-parallel logits, and the
forward-only log-prob step of the no-grad pass.

In ``forward_step`` call the model without labels (so it returns the logits shard
``[B, S, V/tp]`` instead of a cross-entropy) and return::

    return output_tensor, functools.partial(calibrl.integrations.megatron.loss_func,
                                            labels, inputs, config=cfg)

``loss_func`` returns Megatron's 3-tuple ``(loss, num_tokens, report)``: the schedule and
Megatron-LM's ``train_step`` then reduce the gradient and the logged metrics over micro-batches
and data-parallel (× context-parallel) ranks to the global mini-batch values. Tensor
parallelism: the phase-1 softmax statistics ``[N, 4]`` are all-gathered over the TP group and
the backward writes this rank's slice of ∂L/∂logits. Context parallelism: the per-sequence sums
that sequence Δ needs are all-reduced over the CP group. See integration/megatron/README.md.

Without the logits: :func:`skip_output_layer` makes the model's output layer (a
``ColumnParallelLinear``) hand back its input, and :func:`linear_loss_func` computes the loss
from those hidden states ``[B, S, H]`` and the layer's weight shard ``[V/tp, H]`` through the
fused linear path (chunks of tokens through a GEMM, the same ``[N, 4]`` statistics exchange over
the TP group); gradients flow to the hidden states and to the weight shard.
"""

from __future__ import annotations

import torch

from .. import ops
from .. import linear
from ..autograd import _all_gather_stats, _entropy_coef, _masked_mean, calibrl_loss, vocab_parallel_calibrl_loss
from ..config import Config
from ..linear import DEFAULT_CHUNK
from ..linear_autograd import vocab_parallel_fused_linear_logprobs
from ..ops import LossInputs
from ._common import check_inputs, masked_labels, per_row_expert

__all__ = [
    "loss_func",
    "logprobs_func",
    "vocab_parallel_logprobs",
    "linear_loss_func",
    "linear_logprobs_func",
    "vocab_parallel_linear_logprobs",
    "skip_output_layer",
    "output_layer_weight",
    "sequence_sums",
    "per_row_expert",
    "tensor_parallel_group",
    "context_parallel_group",
    "REPORTED",
]

#: The metrics ``loss_func`` reports (as ``calibrl/<name>``), each a ``[numerator, denominator]``
#: pair that Megatron-LM sums over micro-batches and data-parallel ranks before dividing.
REPORTED = (
    "loss", "pg_loss", "explore_loss", "entropy_loss", "kl_loss",
    "clipfrac", "clipfrac_lower", "ppo_kl", "mean_token_entropy",
    "mean_delta", "mean_response_length", "frac_correct", "mean_rarity_weight",
)


def _parallel_state():
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    return parallel_state if parallel_state.model_parallel_is_initialized() else None


def tensor_parallel_group():
    """Megatron-Core's tensor-parallel group (``parallel_state`` must be initialised)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def context_parallel_group():
    """Megatron-Core's context-parallel group, or ``None`` when ``parallel_state`` is not
    initialised (no context parallelism)."""
    ps = _parallel_state()
    return ps.get_context_parallel_group() if ps is not None else None


def _group_size(group) -> int:
    import torch.distributed as dist

    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# Context parallelism


class _ContextParallel:
    """Makes one CP rank's loss call exact when every CP rank holds a slice of each sequence
    (Megatron's ``get_batch_on_this_cp_rank`` layout; row tensors whole, token tensors sliced).

    Token-level terms (token-mean / seq-mean-token-sum aggregation, token-aligned Δ with the
    expert carried per row and sliced like the batch) need nothing: with the global normalisers
    the CP slices' partial losses add up. Sequence Δ needs S_i = Σ_t m·ℓ and E_i over the whole
    sequence: they are all-reduced over the CP group, and the library is given, per row, the
    baseline ``E_i − (S_i − S_i^local)`` so that its local Δ is the sequence's Δ (gradient
    exact on the local tokens). The library leaves out of the exploration value a row with no
    counted token in this slice (SPEC §4.5: it reads it as an empty rollout), so the value is
    replaced by the whole mini-batch slice's exploration value (one library call on a one-token
    row per sequence that carries its Δ) divided by the CP size.
    """

    def __init__(self, group, cfg: Config, inputs: LossInputs, token_shape):
        d = cfg.to_dict()
        # The whole-sequence exploration call needs no regulariser inputs.
        self.explore_cfg = Config("paper", **{**d, "entropy_coef": 0.0, "kl_coef": 0.0})
        self.group, self.size = group, _group_size(group)
        self.lam = float(d["lambda"]) if d["loss"] == "calibrl" else 0.0
        self.sequence = self.lam != 0.0 and d["delta_mode"] == "sequence"
        if inputs.normalizers is None:
            raise ValueError(
                "`inputs.normalizers` is missing: with context parallelism each CP rank holds part of every "
                "sequence, so the loss needs the global (token_count, seq_count) of the mini-batch"
            )
        if d["agg"] == "seq-mean-token-mean":
            raise ValueError(
                "`config.agg` = 'seq-mean-token-mean' cannot be reduced over a context-parallel group "
                "(each sequence's own token mean needs its whole length); use token-mean or seq-mean-token-sum"
            )
        if self.sequence and d["length_normalize"]:
            raise ValueError(
                "`config.length_normalize` cannot be reduced over a context-parallel group (sequence Δ "
                "divided by each sequence's whole length); use context_parallel_size 1 or no length normalisation"
            )
        if self.sequence and d["baseline"] == "ref_policy":
            raise ValueError(
                "`config.baseline` = 'ref_policy' with sequence Δ cannot be reduced over a context-parallel "
                "group; carry the reference model's sequence sums as a per-row expert instead"
            )
        if self.lam != 0.0 and d["baseline"] == "expert" and inputs.expert_logprobs is not None:
            e = inputs.expert_logprobs
            if tuple(e.shape) != tuple(token_shape) or inputs.expert_offsets is not None:
                raise ValueError(
                    f"`inputs.expert_logprobs` has shape {tuple(e.shape)}: with context parallelism carry the "
                    f"expert per row in the rollouts' layout {tuple(token_shape)} (calibrl.integrations."
                    "megatron.per_row_expert) and slice it with the batch (get_batch_on_this_cp_rank)"
                )
        index = inputs.expert_index
        if self.sequence and index is not None and bool(((index >= 0) & (index != torch.arange(index.numel()))).any()):
            raise ValueError(
                "`inputs.expert_index`: with context parallelism the expert is carried per row, so row i's slot "
                "must be i (or −1 for none)"
            )
        self._check_rows(token_shape[0])

    def _check_rows(self, rows: int):
        """Every CP rank must hold the same rows (one collective, so all ranks raise together)."""
        import torch.distributed as dist

        t = torch.tensor([rows, -rows], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != -int(t[1]):
            raise ValueError(
                f"`labels`: this context-parallel rank holds {rows} rows but others hold between {-int(t[1])} "
                f"and {int(t[0])}; every CP rank must hold a slice of the same sequences"
            )

    def __call__(self, lp: torch.Tensor, inputs: LossInputs):
        """Called with this call's log-probs ``[B, S_local]``: the inputs for the library call and
        the correction of its value and metrics."""
        if not self.sequence:
            return inputs, None
        mask = inputs.mask.double() if inputs.mask is not None else torch.ones_like(lp, dtype=torch.float64)
        s_local = (lp.double() * mask).sum(1)
        e = inputs.expert_logprobs
        em = inputs.expert_mask.double() if inputs.expert_mask is not None else torch.ones_like(e, dtype=torch.float64)
        both = torch.stack([s_local, (e.double() * em).sum(1), mask.sum(1)])
        import torch.distributed as dist

        dist.all_reduce(both, group=self.group)
        s_global, e_global, n_global = both[0], both[1], both[2]
        baseline = (e_global - (s_global - s_local)).to(lp.device)
        adjusted = LossInputs(**{**inputs.__dict__, "expert_logprobs": baseline[:, None].contiguous(), "expert_mask": None})
        self.row_tokens = n_global
        self._whole = self._whole_explore(s_global, e_global, n_global, inputs)
        return adjusted, self._finish

    def _whole_explore(self, s_global, e_global, n_global, inputs: LossInputs) -> dict:
        """L_explore of the whole sequences: each row one token ℓ = 0 (counted when the sequence
        has a counted token) against the baseline E_i − S_i, so that its Δ is the sequence's."""
        cpu = lambda t: None if t is None else t.detach().to("cpu")  # noqa: E731
        b = s_global.numel()
        whole = LossInputs(
            advantages=torch.zeros(b, dtype=torch.float64),
            weights=cpu(inputs.weights).double(),
            signs=cpu(inputs.signs).double(),
            mask=(n_global > 0).to(torch.float64)[:, None].cpu(),
            is_expert=cpu(inputs.is_expert),
            expert_logprobs=(e_global - s_global).cpu()[:, None].contiguous(),
            expert_index=cpu(inputs.expert_index),
            normalizers=inputs.normalizers,
        )
        return ops.loss(self.explore_cfg, torch.zeros(b, 1, dtype=torch.float64), whole).metrics

    def _finish(self, value, metrics: dict):
        # Every CP rank reports an equal share of the whole exploration value.
        correction = self._whole["explore_loss"] / self.size - metrics["explore_loss"]
        metrics["explore_loss"] += correction
        metrics["mean_delta"] = self._whole["mean_delta"]  # over the whole sequences
        metrics["loss"] += self.lam * correction
        return value + self.lam * correction


# --------------------------------------------------------------------------------------------
# The loss


def loss_func(
    labels: torch.Tensor,
    inputs: LossInputs,
    output_tensor: torch.Tensor,
    *,
    config=None,
    tp_group=None,
    cp_group=None,
    calculate_per_token_loss: bool = True,
    num_microbatches: int | None = None,
    dp_cp_size: int | None = None,
    temperature: float = 1.0,
    inplace: bool = True,
):
    """CalibRL loss of one micro-batch from Megatron's vocabulary-parallel logits.

    Args:
        labels: ``[B, S]`` global token ids of the next tokens (Megatron's ``labels``), this
            context-parallel rank's slice.
        inputs: the micro-batch's :class:`calibrl.LossInputs` in the padded ``[B, S]`` layout
            (token tensors sliced like ``labels``, row tensors whole); ``inputs.mask`` is the
            response mask; ``inputs.normalizers`` the global ``(token_count, seq_count)`` of the
            mini-batch (all micro-batches, all DP ranks).
        output_tensor: the logits shard ``[B, S, V/tp]``.
        config: a :class:`calibrl.Config`, a dict or a preset name.
        tp_group, cp_group: default Megatron's tensor- and context-parallel groups.
        calculate_per_token_loss: the model config's flag of that name. ``True`` (recommended):
            the loss is returned times the global token count K with ``num_tokens`` this rank's
            counted tokens; Megatron divides the summed gradient by Σ num_tokens = K.
            ``False``: Megatron divides by ``num_tokens`` and ``num_microbatches`` and averages
            over the ``dp_cp_size`` ranks, so both must be given and are multiplied back.

    Returns ``(loss, num_tokens, report)``: ``report["calibrl/<name>"]`` is a ``[sum, count]``
    float64 pair for every name of :data:`REPORTED`; Megatron-LM's ``train_step`` sums the
    pairs over micro-batches and DP × CP ranks and logs ``sum / count``, the mini-batch value.
    """
    if output_tensor.dim() != 3 or tuple(output_tensor.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"`output_tensor` must be [B, S, V/tp] matching labels {tuple(labels.shape)}, "
            f"got {tuple(output_tensor.shape)}"
        )
    cfg, group, cp, hook = _prepare(labels, inputs, config, tp_group, cp_group, calculate_per_token_loss,
                                    num_microbatches, dp_cp_size)
    n, v_local = labels.numel(), output_tensor.shape[-1]
    loss, metrics = vocab_parallel_calibrl_loss(
        output_tensor.reshape(n, v_local),
        masked_labels(labels, inputs),
        inputs,
        cfg,
        group=group,
        token_shape=tuple(labels.shape),
        temperature=temperature,
        inplace=inplace,
        inputs_hook=hook,
    )
    return _megatron_result(loss, metrics, inputs, cfg, cp, hook, calculate_per_token_loss, num_microbatches,
                            dp_cp_size)


def _prepare(labels, inputs, config, tp_group, cp_group, calculate_per_token_loss, num_microbatches, dp_cp_size):
    """What both loss paths check and set up: ``(cfg, tp_group, cp_group, cp_hook or None)``."""
    cfg = Config.coerce(config)
    token_shape = tuple(labels.shape)
    check_inputs(inputs, token_shape, cfg)
    if not calculate_per_token_loss and (num_microbatches is None or dp_cp_size is None):
        raise ValueError(
            "`num_microbatches` and `dp_cp_size` are needed with calculate_per_token_loss=False "
            "(Megatron divides each loss by both; the drop-in multiplies them back)"
        )
    group = tp_group if tp_group is not None else tensor_parallel_group()
    cp = cp_group if cp_group is not None else context_parallel_group()
    hook = _ContextParallel(cp, cfg, inputs, token_shape) if _group_size(cp) > 1 else None
    return cfg, group, cp, hook


def _megatron_result(loss, metrics, inputs, cfg, cp, hook, calculate_per_token_loss, num_microbatches, dp_cp_size):
    """Megatron's ``(loss, num_tokens, report)`` from the mini-batch-normalised loss."""
    local_tokens = metrics["num_tokens"]
    # K: the global token count (Megatron's Σ num_tokens over micro-batches and DP × CP ranks)
    k = ops._normalizers(inputs.normalizers).token_count if inputs.normalizers is not None else local_tokens
    if calculate_per_token_loss:
        out = loss * k
    else:
        out = loss * (num_microbatches * dp_cp_size * max(local_tokens, 1.0))
    num_tokens = torch.tensor(int(round(local_tokens)), dtype=torch.int, device=loss.device)
    row_tokens = hook.row_tokens if hook is not None and hook.sequence else None
    first_cp_rank = _group_size(cp) == 1 or _group_rank(cp) == 0
    report = _report(metrics, inputs, cfg, k, first_cp_rank=first_cp_rank, device=loss.device, row_tokens=row_tokens)
    return out, num_tokens, report


def _report(metrics: dict, inputs: LossInputs, cfg: Config, k: float, *, first_cp_rank: bool, device,
            row_tokens=None) -> dict:
    """``[sum, count]`` pairs whose totals over every micro-batch and rank give the mini-batch
    value. Per-row quantities are counted on the first CP rank only (every CP rank holds every
    row); per-token ones on every rank (each holds its own tokens). ``row_tokens``: each row's
    counted tokens over the CP group (default: this slice's)."""
    mask = inputs.mask if inputs.mask is not None else torch.ones(1)
    rollout = torch.ones(inputs.advantages.shape[0], dtype=torch.bool)
    if inputs.is_expert is not None:
        rollout = inputs.is_expert == 0
    rollout = rollout.to(mask.device)
    rows = float(rollout.sum()) if first_cp_rank else 0.0
    tokens = float((mask.double() * rollout[:, None]).sum())  # the rollout tokens of this rank
    labelled = float((mask != 0).sum())
    with_expert = rollout & (inputs.expert_index >= 0).to(mask.device) if inputs.expert_index is not None else rollout & False
    if cfg["delta_mode"] == "sequence":
        # An empty rollout has no Δ (SPEC §4.5).
        n_row = (mask.double().sum(1) if mask.dim() == 2 else torch.ones(1)) if row_tokens is None else row_tokens
        with_expert = with_expert & (n_row.to(with_expert.device) > 0)
        delta_n = float(with_expert.sum()) if first_cp_rank else 0.0
    else:
        delta_n = float((mask.double() * with_expert[:, None]).sum())
    pairs = {
        "loss": (metrics["loss"] * k, metrics["num_tokens"]),
        "pg_loss": (metrics["pg_loss"] * k, metrics["num_tokens"]),
        "explore_loss": (metrics["explore_loss"] * k, metrics["num_tokens"]),
        "entropy_loss": (metrics["entropy_loss"] * k, metrics["num_tokens"]),
        "kl_loss": (metrics["kl_loss"] * k, metrics["num_tokens"]),
        "clipfrac": (metrics["clipfrac"] * tokens, tokens),
        "clipfrac_lower": (metrics["clipfrac_lower"] * tokens, tokens),
        "ppo_kl": (metrics["ppo_kl"] * tokens, tokens),
        "mean_token_entropy": (metrics["mean_token_entropy"] * labelled, labelled),
        "mean_delta": (metrics["mean_delta"] * delta_n, delta_n),
        # each CP rank adds its part of every length; the rows are counted once
        "mean_response_length": (metrics["mean_response_length"] * float(rollout.sum()), rows),
        "frac_correct": (metrics["frac_correct"] * rows, rows),
        "mean_rarity_weight": (metrics["mean_rarity_weight"] * rows, rows),
    }
    return {f"calibrl/{name}": torch.tensor(pairs[name], dtype=torch.float64, device=device) for name in REPORTED}


# --------------------------------------------------------------------------------------------
# The no-grad pass


@torch.no_grad()
def vocab_parallel_logprobs(logits_shard: torch.Tensor, labels: torch.Tensor, *, tp_group=None, mask=None,
                            temperature: float = 1.0, entropy: bool = False):
    """Log-probs ``[B, S]`` (float32) of ``labels`` from the logits shard ``[B, S, V/tp]``, the
    statistics all-gathered over the tensor-parallel group; 0 where ``mask`` is 0. With
    ``entropy=True`` returns ``(logprobs, entropy)``."""
    import torch.distributed as dist

    if logits_shard.dim() != 3 or tuple(logits_shard.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"`output_tensor` must be [B, S, V/tp] matching labels {tuple(labels.shape)}, got {tuple(logits_shard.shape)}"
        )
    group = tp_group if tp_group is not None else tensor_parallel_group()
    n, v_local = labels.numel(), logits_shard.shape[-1]
    flat = labels.reshape(n).long()
    if mask is not None:
        flat = torch.where(mask.reshape(n) != 0, flat, torch.full_like(flat, -1))
    z = logits_shard.reshape(n, v_local).contiguous()
    stats = ops.logits_shard_stats(z, flat, temperature, vocab_start=dist.get_rank(group) * v_local)
    lp, ent, _ = ops.logits_shard_finish(_all_gather_stats(stats, group), flat, entropy=entropy)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if entropy else lp


def logprobs_func(labels: torch.Tensor, output_tensor: torch.Tensor, *, mask=None, tp_group=None,
                  temperature: float = 1.0, non_loss_data: bool = False):
    """``loss_func`` of the forward-only pass (``forward_backward_func(..., forward_only=True)``):
    the micro-batch's log-probs land in the schedule's returned list as
    ``{"logprobs": [B, S]}`` (or, with ``collect_non_loss_data=True``, as the dict itself)."""
    lp = vocab_parallel_logprobs(output_tensor, labels, tp_group=tp_group, mask=mask, temperature=temperature)
    if non_loss_data:
        return {"logprobs": lp}
    return torch.zeros((), device=lp.device), {"logprobs": lp}


def sequence_sums(logprobs: torch.Tensor, mask=None, *, cp_group=None) -> torch.Tensor:
    """Σ_t m·ℓ per row ``[B]`` (float64) over the whole sequence, all-reduced over the
    context-parallel group (each CP rank holds a slice): e.g. the expert's ``E_g``."""
    s = (logprobs.double() * (mask.double() if mask is not None else 1.0)).sum(-1)
    cp = cp_group if cp_group is not None else context_parallel_group()
    if _group_size(cp) > 1:
        import torch.distributed as dist

        dist.all_reduce(s, group=cp)
    return s


# --------------------------------------------------------------------------------------------
# Without the logits: the loss from the output layer's input and its weight shard


def skip_output_layer(output_layer):
    """Makes Megatron's output layer (a ``ColumnParallelLinear``, e.g. ``GPTModel.output_layer``)
    return its input instead of the logits, so that the model called without ``labels`` returns
    the hidden states ``[B, S, H]`` for :func:`linear_loss_func`. The weight stays a parameter of
    the layer (optimiser, DDP buffers, checkpoints unchanged). With sequence parallelism the
    input is all-gathered over the TP group; its backward only takes this rank's slice, because
    :func:`linear_loss_func` already sums ∂L/∂hidden over the group. Returns the layer."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    def forward(input_, weight=None, runtime_gather_output=None):
        if output_layer.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=output_layer.tp_group)
        return input_, None

    output_layer.forward = forward
    return output_layer


def output_layer_weight(model) -> torch.nn.Parameter:
    """The output layer's weight shard ``[V/tp, H]`` of a ``GPTModel`` (``model.module``
    wrappers are unwrapped): the word embeddings when they are shared with the output layer on
    this pipeline stage, else ``output_layer.weight``."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _check_hidden(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"`weight` must be the output layer's weight shard [V/tp, H], got {_shape_of(weight)}")
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape) or hidden.shape[2] != weight.shape[1]:
        raise ValueError(
            f"`output_tensor` must be the output layer's input [B, S, H] matching labels {tuple(labels.shape)} "
            f"and weight {tuple(weight.shape)}, got {tuple(hidden.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"`bias` must be [V/tp] = [{weight.shape[0]}], got {_shape_of(bias)}")


def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def linear_loss_func(
    labels: torch.Tensor,
    inputs: LossInputs,
    output_tensor: torch.Tensor,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config=None,
    tp_group=None,
    cp_group=None,
    calculate_per_token_loss: bool = True,
    num_microbatches: int | None = None,
    dp_cp_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
):
    """:func:`loss_func` from the output layer's input, without the logits.

    ``output_tensor`` is the hidden states ``[B, S, H]`` the output layer would multiply (the
    model's output after :func:`skip_output_layer`), the same on every rank of the TP group;
    ``weight`` (and ``bias``) this rank's vocabulary shard ``[V/tp, H]`` of the output layer
    (:func:`output_layer_weight`), rows ``r·V/tp ...`` of the vocabulary. The logits are formed
    ``chunk_size`` tokens at a time (a ``chunk_size × V/tp`` float32 workspace), the ``[N, 4]``
    statistics all-gathered over ``tp_group``; the backward recomputes each chunk and gives
    ∂L/∂hidden (summed over the TP group) and this shard's ∂L/∂weight. The other arguments and
    the result are :func:`loss_func`'s.
    """
    _check_hidden(output_tensor, labels, weight, bias)
    cfg, group, cp, hook = _prepare(labels, inputs, config, tp_group, cp_group, calculate_per_token_loss,
                                    num_microbatches, dp_cp_size)
    flat = masked_labels(labels, inputs)
    lp, ent = vocab_parallel_fused_linear_logprobs(
        output_tensor.reshape(flat.numel(), -1), weight, flat, group=group, bias_shard=bias,
        temperature=temperature, chunk_size=chunk_size,
    )
    lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    if _entropy_coef(cfg) == 0.0:
        ent = ent.detach()  # no ∂L/∂H term: the backward skips it
    finish = None
    if hook is not None:
        inputs, finish = hook(lp.detach(), inputs)
    loss, metrics = calibrl_loss(lp, inputs, cfg, entropy=ent)
    if finish is not None:
        loss = finish(loss, metrics)
    metrics["mean_token_entropy"] = _masked_mean(ent.detach().reshape(-1), flat)
    return _megatron_result(loss, metrics, inputs, cfg, cp, hook, calculate_per_token_loss, num_microbatches,
                            dp_cp_size)


@torch.no_grad()
def vocab_parallel_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   bias=None, tp_group=None, mask=None, temperature: float = 1.0,
                                   entropy: bool = False, chunk_size: int = DEFAULT_CHUNK):
    """:func:`vocab_parallel_logprobs` from the output layer's input ``[B, S, H]`` and its
    weight shard ``[V/tp, H]``, without the logits."""
    import torch.distributed as dist

    _check_hidden(hidden, labels, weight, bias)
    group = tp_group if tp_group is not None else tensor_parallel_group()
    n = labels.numel()
    flat = labels.reshape(n).long()
    if mask is not None:
        flat = torch.where(mask.reshape(n) != 0, flat, torch.full_like(flat, -1))
    stats = linear.shard_stats(hidden.reshape(n, -1), weight, flat, temperature, bias=bias, chunk_size=chunk_size,
                               vocab_start=dist.get_rank(group) * weight.shape[0])
    lp, ent, _ = ops.logits_shard_finish(_all_gather_stats(stats, group), flat, entropy=entropy)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if entropy else lp


def linear_logprobs_func(labels: torch.Tensor, output_tensor: torch.Tensor, *, weight: torch.Tensor, bias=None,
                         mask=None, tp_group=None, temperature: float = 1.0, non_loss_data: bool = False,
                         chunk_size: int = DEFAULT_CHUNK):
    """:func:`logprobs_func` from the output layer's input and its weight shard."""
    lp = vocab_parallel_linear_logprobs(output_tensor, weight, labels, bias=bias, tp_group=tp_group, mask=mask,
                                        temperature=temperature, chunk_size=chunk_size)
    if non_loss_data:
        return {"logprobs": lp}
    return torch.zeros((), device=lp.device), {"logprobs": lp}
