"""Array-level fused linear path: log-probs, entropy and lse per token (and the gradients of
the hidden states and the LM head) from ``hidden [N, H]`` and ``weight [V, H]`` without an
``[N, V]`` logits tensor. Tokens go through in chunks of ``chunk_size`` via a workspace of
``chunk_size × V`` float32 (allocated here unless passed). Inputs as :mod:`calibrl.ops`
(NumPy arrays, PyTorch tensors, ``__dlpack__`` objects); outputs of the input's kind.
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import _abi, _lib
from ._dlpack import as_array, ptr, stream_for, view
from .ops import _new, _shape

#: Tokens per GEMM when the caller does not say: a workspace of 256·V float32 (31 MB at
#: V = 32000) is small next to the logits of a micro-batch and large enough for fast GEMMs.
DEFAULT_CHUNK = 256


def workspace_size(hidden, weight, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Bytes of workspace for chunks of ``chunk_size`` tokens of ``hidden`` against ``weight``."""
    hv, wv = view(as_array(hidden, "hidden"), "hidden", rows_may_stride=True), view(
        as_array(weight, "weight"), "weight", rows_may_stride=True
    )
    out = ctypes.c_size_t(0)
    _lib.call("calibrl_fused_linear_workspace_size", ptr(hv), ptr(wv), int(chunk_size), ctypes.byref(out))
    return int(out.value)


class _Call:
    """The views and ``calibrl_linear_input`` of one call (kept alive while it runs)."""

    def __init__(self, hidden, weight, labels, temperature, bias, vocab_start, chunk_size, workspace):
        hidden, weight = as_array(hidden, "hidden"), as_array(weight, "weight")
        n = _shape(hidden)[0] if len(_shape(hidden)) else 0
        chunk = max(1, min(int(chunk_size), max(n, 1)))
        if workspace is None:
            workspace = _new(hidden, (workspace_size(hidden, weight, chunk),), "uint8", zeros=False)
        self.n = n
        self.like = hidden
        self.views = [
            view(hidden, "hidden", rows_may_stride=True),
            view(weight, "weight", rows_may_stride=True),
            view(bias, "bias"),
            view(labels, "labels"),
            view(workspace, "workspace", writable=True),
        ]
        self.args = _abi.LinearInput(
            hidden=ptr(self.views[0]),
            weight=ptr(self.views[1]),
            bias=ptr(self.views[2]),
            labels=ptr(self.views[3]),
            temperature=float(temperature),
            vocab_start=int(vocab_start),
            chunk_size=chunk,
            workspace=ptr(self.views[4]),
        )

    def run(self, name: str, *tensors, accumulate: bool | None = None):
        views = [v for v in tensors]
        extra = [] if accumulate is None else [int(bool(accumulate))]
        _lib.call(name, ctypes.byref(self.args), *[ptr(v) for v in views], *extra,
                  stream_for(self.views + views))


def _rows(call: _Call, t, name: str, writable: bool = True):
    return view(_new(call.like, (call.n,)) if t is None else t, name, writable=writable)


def forward(hidden, weight, labels, temperature: float = 1.0, *, bias=None, chunk_size: int = DEFAULT_CHUNK,
            entropy=True, logprobs=None, lse=None, workspace=None):
    """``(logprobs, entropy, lse)``, float32 ``[N]`` each (entropy ``None`` with
    ``entropy=False``), of the logits ``hidden·weightᵀ + bias`` at ``labels``."""
    call = _Call(hidden, weight, labels, temperature, bias, 0, chunk_size, workspace)
    logprobs = _new(call.like, (call.n,)) if logprobs is None else logprobs
    entropy = _new(call.like, (call.n,)) if entropy is True else (None if entropy is False else entropy)
    lse = _new(call.like, (call.n,)) if lse is None else lse
    call.run("calibrl_fused_linear_forward", view(logprobs, "logprobs", writable=True),
             view(entropy, "entropy", writable=True), view(lse, "lse", writable=True))
    return logprobs, entropy, lse


def shard_stats(hidden, weight, labels, temperature: float = 1.0, *, vocab_start: int, bias=None,
                chunk_size: int = DEFAULT_CHUNK, stats=None, workspace=None):
    """Phase 1 of the vocabulary-parallel forward for this rank's ``weight`` shard: ``[N, 4]``
    float32 statistics; all-gather to ``[R, N, 4]`` and finish with
    :func:`calibrl.logits_shard_finish`."""
    call = _Call(hidden, weight, labels, temperature, bias, vocab_start, chunk_size, workspace)
    stats = _new(call.like, (call.n, 4)) if stats is None else stats
    call.run("calibrl_fused_linear_shard_stats", view(stats, "stats", writable=True))
    return stats


def _grads(call: _Call, weight, bias, d_hidden, d_weight, d_bias, hidden_dtype: str):
    weight = as_array(weight, "weight")
    if d_hidden is None:
        d_hidden = _new(call.like, _shape(call.like), hidden_dtype, zeros=False)
    if d_weight is None:
        d_weight = _new(call.like, _shape(weight), "float32", zeros=False)
    if d_bias is None and bias is not None:
        d_bias = _new(call.like, (_shape(weight)[0],), "float32", zeros=False)
    return d_hidden, d_weight, d_bias


def _dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def backward(hidden, weight, labels, lse, grad_logprobs, temperature: float = 1.0, *, bias=None,
             entropy=None, grad_entropy=None, vocab_start: int = 0, chunk_size: int = DEFAULT_CHUNK,
             d_hidden=None, d_weight=None, d_bias=None, accumulate: bool = False, workspace=None):
    """``(d_hidden, d_weight, d_bias)`` from ``∂L/∂logprobs`` (and ``∂L/∂entropy``, which needs
    the saved ``entropy``) with the saved ``lse``, recomputing the logits chunk by chunk.
    ``d_hidden`` has ``hidden``'s dtype unless passed; ``d_weight``/``d_bias`` are float32 and,
    with ``accumulate=True``, added to. With a shard, ``d_hidden`` is this shard's part."""
    call = _Call(hidden, weight, labels, temperature, bias, vocab_start, chunk_size, workspace)
    d_hidden, d_weight, d_bias = _grads(call, weight, bias, d_hidden, d_weight, d_bias,
                                        _dtype_name(call.like))
    call.run(
        "calibrl_fused_linear_backward",
        view(lse, "lse"), view(entropy, "entropy"), view(grad_logprobs, "grad_logprobs"),
        view(grad_entropy, "grad_entropy"), view(d_hidden, "d_hidden", writable=True),
        view(d_weight, "d_weight", writable=True), view(d_bias, "d_bias", writable=True),
        accumulate=accumulate,
    )
    return d_hidden, d_weight, d_bias


def forward_backward(hidden, weight, labels, grad_logprobs, temperature: float = 1.0, *, bias=None,
                     grad_entropy=None, chunk_size: int = DEFAULT_CHUNK, entropy=True, d_hidden=None,
                     d_weight=None, d_bias=None, accumulate: bool = False, workspace=None) -> dict[str, Any]:
    """Forward and backward in one pass, for ``∂L/∂logprobs`` (and ``∂L/∂entropy``) known per
    token before the call. Returns a dict with ``logprobs``, ``entropy``, ``lse``,
    ``d_hidden``, ``d_weight``, ``d_bias``."""
    call = _Call(hidden, weight, labels, temperature, bias, 0, chunk_size, workspace)
    d_hidden, d_weight, d_bias = _grads(call, weight, bias, d_hidden, d_weight, d_bias,
                                        _dtype_name(call.like))
    logprobs, lse = _new(call.like, (call.n,)), _new(call.like, (call.n,))
    entropy = _new(call.like, (call.n,)) if entropy else None
    call.run(
        "calibrl_fused_linear_forward_backward",
        view(grad_logprobs, "grad_logprobs"), view(grad_entropy, "grad_entropy"),
        view(logprobs, "logprobs", writable=True), view(entropy, "entropy", writable=True),
        view(lse, "lse", writable=True), view(d_hidden, "d_hidden", writable=True),
        view(d_weight, "d_weight", writable=True), view(d_bias, "d_bias", writable=True),
        accumulate=accumulate,
    )
    return dict(logprobs=logprobs, entropy=entropy, lse=lse, d_hidden=d_hidden, d_weight=d_weight, d_bias=d_bias)
