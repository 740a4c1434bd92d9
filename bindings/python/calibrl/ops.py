"""Array-level API: each function takes NumPy arrays, PyTorch tensors or ``__dlpack__`` objects,
passes borrowed DLPack descriptors to the library (no copies) and returns outputs of the input's
kind (NumPy in, NumPy out; a PyTorch tensor in, tensors on its device out).

Output buffers may be passed in (``out=`` style keyword arguments); the library writes them only
when the call succeeds, so a failed call leaves them untouched.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from . import _abi, _lib
from ._abi import METRICS_LEN, METRICS_NAMES, Metrics, Normalizers
from ._dlpack import as_array, ptr, stream_for, view
from .config import Config


def _is_torch(x) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _new(like, shape, dtype: str = "float32", zeros: bool = True):
    """A new array of ``like``'s kind (and device, for tensors)."""
    if _is_torch(like):
        import torch

        fn = torch.zeros if zeros else torch.empty
        return fn(tuple(shape), dtype=getattr(torch, dtype), device=like.device)
    return (np.zeros if zeros else np.empty)(tuple(shape), dtype=dtype)


def _float_dtype(x) -> str:
    """``x``'s dtype name when it is float32/float64, else float32 (the output default)."""
    name = str(x.dtype).replace("torch.", "")
    return name if name in ("float32", "float64") else "float32"


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _normalizers(n) -> Normalizers | None:
    if n is None:
        return None
    if isinstance(n, Normalizers):
        return n
    if isinstance(n, dict):
        unknown = set(n) - {f for f, _ in Normalizers._fields_}
        if unknown:
            raise ValueError(f"`normalizers`: unknown keys {sorted(unknown)}")
        return Normalizers(
            float(n["token_count"]),
            float(n["seq_count"]),
            float(n.get("all_token_count", 0.0)),
            float(n.get("all_seq_count", 0.0)),
        )
    values = [float(v) for v in n]
    if len(values) not in (2, 4):
        raise ValueError(
            "`normalizers`: expected (token_count, seq_count) or (token_count, seq_count, "
            f"all_token_count, all_seq_count), got {len(values)} values"
        )
    return Normalizers(*values)


def _num_groups(group_ids) -> int:
    if _is_torch(group_ids):
        return int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    a = np.asarray(group_ids)
    return int(a.max()) + 1 if a.size else 0


# --------------------------------------------------------------------------------------------
# SPEC §3


class DLPackTensor(Protocol):
    """Anything exchanged through DLPack without a copy: ``numpy.ndarray``, ``torch.Tensor``,
    CuPy/JAX arrays..."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __dlpack_device__(self) -> Any: ...


#: A tensor argument: a DLPack array/tensor, or a (nested) list or tuple of numbers.
TensorLike = Union[DLPackTensor, Sequence[Any]]


def group_advantages(
    rewards: TensorLike,
    group_ids: TensorLike,
    num_groups: int | None = None,
    *,
    config: Any = None,
    correct: TensorLike | None = None,
    is_expert: TensorLike | None = None,
    advantages: DLPackTensor | None = None,
    weights: DLPackTensor | None = None,
    signs: DLPackTensor | None = None,
) -> tuple[Any, Any, Any]:
    """Group-normalised advantages, rarity weights |A| and correctness signs (SPEC §3).

    Returns ``(advantages, weights, signs)``, each ``[B]`` (float32, or float64 for float64
    rewards), unless output buffers are given. ``num_groups`` defaults to ``max(group_ids)+1``.
    """
    cfg = Config.coerce(config)
    rewards, group_ids = as_array(rewards, "rewards"), as_array(group_ids, "group_ids")
    b = _shape(rewards)[0] if len(_shape(rewards)) else 0
    dt = _float_dtype(rewards)
    advantages = _new(rewards, (b,), dt) if advantages is None else advantages
    weights = _new(rewards, (b,), dt) if weights is None else weights
    signs = _new(rewards, (b,), dt) if signs is None else signs
    views = [
        view(rewards, "rewards"),
        view(group_ids, "group_ids"),
        view(correct, "correct"),
        view(is_expert, "is_expert"),
        view(advantages, "advantages", writable=True),
        view(weights, "weights", writable=True),
        view(signs, "signs", writable=True),
    ]
    args = _abi.AdvantageArgs(
        rewards=ptr(views[0]),
        group_ids=ptr(views[1]),
        num_groups=_num_groups(group_ids) if num_groups is None else int(num_groups),
        correct=ptr(views[2]),
        is_expert=ptr(views[3]),
        advantages=ptr(views[4]),
        weights=ptr(views[5]),
        signs=ptr(views[6]),
    )
    _lib.call("calibrl_group_advantages", cfg.handle, ctypes.byref(args), stream_for(views))
    return advantages, weights, signs


# --------------------------------------------------------------------------------------------
# SPEC §4


@dataclass
class LossInputs:
    """Everything the loss takes besides the differentiable ``logprobs`` and ``entropy``.

    Token tensors share ``logprobs``' layout: padded ``[B, S]``, or packed ``[T]`` with
    ``seq_offsets [B+1]``. Row tensors (``advantages``, ``weights``, ``signs``,
    ``is_expert``, ``expert_index``) are ``[B]``. The expert baseline is ``expert_logprobs``
    (padded ``[P, S*]`` with optional ``expert_mask``, or packed ``[T*]`` with
    ``expert_offsets [P+1]``) plus ``expert_index`` (each row's expert slot, −1 for none).
    ``normalizers`` is ``(token_count, seq_count)`` of the global mini-batch's trained rows, or
    ``(token_count, seq_count, all_token_count, all_seq_count)`` adding every row's counts
    (expert rows included: the entropy and KL denominators of the ``authors`` preset; 0 = the
    same), or a dict with those keys, or ``None`` for this call's own counts. ``token_weights`` (layout of ``logprobs``, ≥ 0) multiplies each
    token's policy-gradient term, like verl's ``rollout_is_weights``. See docs/abi.md.
    """

    advantages: TensorLike
    weights: TensorLike
    signs: TensorLike
    mask: Optional[TensorLike] = None
    seq_offsets: Optional[TensorLike] = None
    old_logprobs: Optional[TensorLike] = None
    ref_logprobs: Optional[TensorLike] = None
    is_expert: Optional[TensorLike] = None
    expert_logprobs: Optional[TensorLike] = None
    expert_offsets: Optional[TensorLike] = None
    expert_mask: Optional[TensorLike] = None
    expert_index: Optional[TensorLike] = None
    normalizers: Optional[Tuple[float, ...]] = None
    token_weights: Optional[TensorLike] = None

    def map_tensors(self, fn: Callable[[Any], Any]) -> "LossInputs":
        """A copy with ``fn`` applied to every tensor field (e.g. ``.to(device)``)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = v if v is None or k == "normalizers" else fn(v)
        return LossInputs(**out)


@dataclass
class LossResult:
    loss: float
    metrics: dict[str, float]
    grad_logprobs: Any = None
    grad_entropy: Any = None
    metrics_tensor: Any = field(default=None, repr=False)


def loss(
    config: Any,
    logprobs: TensorLike,
    inputs: LossInputs | None = None,
    *,
    entropy: TensorLike | None = None,
    grad_logprobs: bool | DLPackTensor | None = True,
    grad_entropy: bool | DLPackTensor | None = None,
    metrics: DLPackTensor | None = None,
    host_metrics: bool = True,
    **input_fields: Any,
) -> LossResult:
    """The CalibRL loss (SPEC §4): value, gradients and metrics in one call.

    ``inputs`` is a :class:`LossInputs` or its fields as keyword arguments.
    ``grad_logprobs``/``grad_entropy``: ``True`` allocates the output (float32, or float64 for
    float64 log-probs, like ``logprobs`` otherwise), ``None``/``False`` skips it, or pass a
    buffer. ``grad_entropy`` defaults to ``True`` when ``entropy`` is given.
    ``metrics``: an optional ``[16]`` float buffer on the call's device (always filled).
    ``host_metrics=False`` skips the host metrics struct (on CUDA it synchronises the stream):
    read ``metrics_tensor`` instead.
    """
    if inputs is None:
        inputs = LossInputs(**input_fields)
    elif input_fields:
        raise TypeError("pass either `inputs` or its fields as keyword arguments, not both")
    cfg = Config.coerce(config)
    logprobs = as_array(logprobs, "logprobs")
    shape, dt = _shape(logprobs), _float_dtype(logprobs)
    if grad_logprobs is True:
        grad_logprobs = _new(logprobs, shape, dt)
    elif grad_logprobs is False:
        grad_logprobs = None
    if grad_entropy is None:
        grad_entropy = entropy is not None
    if grad_entropy is True:
        grad_entropy = _new(logprobs, shape, dt)
    elif grad_entropy is False:
        grad_entropy = None
    if metrics is None:
        metrics = _new(logprobs, (METRICS_LEN,), "float64")

    i = inputs
    v = {
        "logprobs": view(logprobs, "logprobs"),
        "seq_offsets": view(i.seq_offsets, "seq_offsets"),
        "mask": view(i.mask, "mask"),
        "old_logprobs": view(i.old_logprobs, "old_logprobs"),
        "ref_logprobs": view(i.ref_logprobs, "ref_logprobs"),
        "entropy": view(entropy, "entropy"),
        "token_weights": view(i.token_weights, "token_weights"),
        "advantages": view(i.advantages, "advantages"),
        "weights": view(i.weights, "weights"),
        "signs": view(i.signs, "signs"),
        "is_expert": view(i.is_expert, "is_expert"),
        "expert_logprobs": view(i.expert_logprobs, "expert_logprobs"),
        "expert_offsets": view(i.expert_offsets, "expert_offsets"),
        "expert_mask": view(i.expert_mask, "expert_mask"),
        "expert_index": view(i.expert_index, "expert_index"),
        "grad_logprobs": view(grad_logprobs, "grad_logprobs", writable=True),
        "grad_entropy": view(grad_entropy, "grad_entropy", writable=True),
        "metrics": view(metrics, "metrics", writable=True),
    }
    norm = _normalizers(i.normalizers)
    args = _abi.LossArgs(
        normalizers=ctypes.pointer(norm) if norm is not None else None,
        **{k: ptr(x) for k, x in v.items()},
    )
    host = Metrics() if host_metrics else None
    _lib.call(
        "calibrl_loss",
        cfg.handle,
        ctypes.byref(args),
        ctypes.byref(host) if host is not None else None,
        stream_for(v.values()),
    )
    values = host.to_dict() if host is not None else {}
    return LossResult(
        loss=values.get("loss", float("nan")),
        metrics=values,
        grad_logprobs=grad_logprobs,
        grad_entropy=grad_entropy,
        metrics_tensor=metrics,
    )


def metrics_dict(metrics_tensor) -> dict[str, float]:
    """The ``[16]`` metrics tensor as a dict (copies to the host)."""
    values = metrics_tensor.tolist() if _is_torch(metrics_tensor) else np.asarray(metrics_tensor).tolist()
    return dict(zip(METRICS_NAMES, values))


# --------------------------------------------------------------------------------------------
# SPEC §6


def _row_outputs(like, n: int, logprobs, entropy, lse):
    """A forward's ``[n]`` outputs: the buffers given, or new float32 ones of ``like``'s kind
    (``entropy=True`` allocates one, ``False`` passes none)."""
    logprobs = _new(like, (n,)) if logprobs is None else logprobs
    if entropy is True:
        entropy = _new(like, (n,))
    elif entropy is False:
        entropy = None
    lse = _new(like, (n,)) if lse is None else lse
    return logprobs, entropy, lse


def logits_forward(logits, labels, temperature: float = 1.0, *, entropy=True, logprobs=None, lse=None):
    """Log-probs, entropy and log-sum-exp of ``[N, V]`` logits at ``labels [N]``.

    Returns ``(logprobs, entropy, lse)`` (float32 ``[N]``; entropy ``None`` when
    ``entropy=False``). Negative labels mark ignored rows (all outputs 0).
    """
    logits = as_array(logits, "logits")
    n = _shape(logits)[0] if len(_shape(logits)) else 0
    logprobs, entropy, lse = _row_outputs(logits, n, logprobs, entropy, lse)
    views = [
        view(logits, "logits", rows_may_stride=True),
        view(labels, "labels"),
        view(logprobs, "logprobs", writable=True),
        view(entropy, "entropy", writable=True),
        view(lse, "lse", writable=True),
    ]
    _lib.call(
        "calibrl_logits_forward",
        ptr(views[0]),
        ptr(views[1]),
        float(temperature),
        ptr(views[2]),
        ptr(views[3]),
        ptr(views[4]),
        stream_for(views),
    )
    return logprobs, entropy, lse


def logits_backward(
    logits,
    labels,
    lse,
    grad_logprobs,
    temperature: float = 1.0,
    *,
    vocab_start: int = 0,
    entropy=None,
    grad_entropy=None,
    out=None,
):
    """``∂L/∂logits`` from ``∂L/∂logprobs`` (and ``∂L/∂entropy``, which needs the saved
    ``entropy``). ``out=None`` allocates; ``out=logits`` overwrites the logits in place. For a
    vocabulary shard pass its ``vocab_start`` and the global ``lse``/``entropy``."""
    logits = as_array(logits, "logits")
    if out is None:
        out = _new(logits, _shape(logits), str(logits.dtype).replace("torch.", ""), zeros=False)
    views = [
        view(logits, "logits", rows_may_stride=True),
        view(labels, "labels"),
        view(lse, "lse"),
        view(entropy, "entropy"),
        view(grad_logprobs, "grad_logprobs"),
        view(grad_entropy, "grad_entropy"),
        view(out, "grad_logits", writable=True),
    ]
    _lib.call(
        "calibrl_logits_backward",
        ptr(views[0]),
        ptr(views[1]),
        float(temperature),
        int(vocab_start),
        ptr(views[2]),
        ptr(views[3]),
        ptr(views[4]),
        ptr(views[5]),
        ptr(views[6]),
        stream_for(views),
    )
    return out


def logits_forward_backward(
    logits,
    labels,
    grad_logprobs,
    temperature: float = 1.0,
    *,
    grad_entropy=None,
    entropy=None,
    logprobs=None,
    lse=None,
    out=None,
):
    """:func:`logits_forward` and :func:`logits_backward` in one call, for losses whose
    ``∂L/∂logprobs`` (and ``∂L/∂entropy``) are known per token before it (token-local losses
    with their normalisers given). Returns ``(logprobs, entropy, lse, grad_logits)``: the same
    values as the two calls. ``logprobs``, ``entropy``, ``lse`` are float32 or float64 ``[N]``
    (float32 allocated); ``entropy`` defaults to an output exactly when ``grad_entropy`` is
    given (``True`` / ``False`` / a buffer otherwise). ``out=None`` allocates d-logits;
    ``out=logits`` overwrites the logits in place. Full vocabulary only; on CUDA sm_90+ one
    kernel reads each logits row once where it fits a thread-block cluster."""
    logits = as_array(logits, "logits")
    n = _shape(logits)[0] if len(_shape(logits)) else 0
    if entropy is None:
        entropy = grad_entropy is not None
    logprobs, entropy, lse = _row_outputs(logits, n, logprobs, entropy, lse)
    if out is None:
        out = _new(logits, _shape(logits), str(logits.dtype).replace("torch.", ""), zeros=False)
    views = [
        view(logits, "logits", rows_may_stride=True),
        view(labels, "labels"),
        view(grad_logprobs, "grad_logprobs"),
        view(grad_entropy, "grad_entropy"),
        view(logprobs, "logprobs", writable=True),
        view(entropy, "entropy", writable=True),
        view(lse, "lse", writable=True),
        view(out, "grad_logits", writable=True),
    ]
    _lib.call(
        "calibrl_logits_forward_backward",
        ptr(views[0]),
        ptr(views[1]),
        float(temperature),
        *[ptr(x) for x in views[2:]],
        stream_for(views),
    )
    return logprobs, entropy, lse, out


def logits_shard_stats(logits, labels, temperature: float = 1.0, *, vocab_start: int = 0, stats=None):
    """Phase 1 of the vocabulary-parallel forward: ``[N, 4]`` float32 statistics of this
    shard (``logits[:, vocab_start : vocab_start + V_local]``); all-gather them to
    ``[R, N, 4]`` and call :func:`logits_shard_finish`."""
    logits = as_array(logits, "logits")
    n = _shape(logits)[0] if len(_shape(logits)) else 0
    stats = _new(logits, (n, 4)) if stats is None else stats
    views = [view(logits, "logits", rows_may_stride=True), view(labels, "labels"), view(stats, "stats", writable=True)]
    _lib.call(
        "calibrl_logits_shard_stats",
        ptr(views[0]),
        ptr(views[1]),
        float(temperature),
        int(vocab_start),
        ptr(views[2]),
        stream_for(views),
    )
    return stats


def logits_shard_finish(stats, labels, *, entropy=True, logprobs=None, lse=None):
    """Phase 2: ``(logprobs, entropy, lse)`` from all-gathered ``[R, N, 4]`` statistics."""
    labels = as_array(labels, "labels")
    n = _shape(labels)[0]
    logprobs, entropy, lse = _row_outputs(labels, n, logprobs, entropy, lse)
    views = [
        view(stats, "stats"),
        view(labels, "labels"),
        view(logprobs, "logprobs", writable=True),
        view(entropy, "entropy", writable=True),
        view(lse, "lse", writable=True),
    ]
    _lib.call(
        "calibrl_logits_shard_finish",
        *[ptr(x) for x in views],
        stream_for(views),
    )
    return logprobs, entropy, lse
