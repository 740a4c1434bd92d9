"""Loading ``libcalibrl.so``: the version check, every C signature, and error translation.

Everything that touches ctypes function objects lives here. The rest of the package calls
``call(name, *args)``, which raises a :class:`CalibrlError` subclass carrying the library's
message whenever a function returns a non-zero ``calibrl_status``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import (
    POINTER,
    c_bool,
    c_char_p,
    c_double,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

from ._dlpack import DLTensor

#: The ABI version these bindings are written against (``CALIBRL_ABI_VERSION`` in the header).
EXPECTED_ABI_VERSION = 3

#: Environment variable naming the library file to load instead of the packaged one.
LIBRARY_ENV = "CALIBRL_LIBRARY"

METRICS_NAMES = (
    "loss",
    "pg_loss",
    "explore_loss",
    "entropy_loss",
    "kl_loss",
    "clipfrac",
    "clipfrac_lower",
    "ppo_kl",
    "mean_delta",
    "mean_expert_logprob",
    "mean_response_length",
    "frac_correct",
    "mean_rarity_weight",
    "num_tokens",
    "num_seqs",
    "cov_selected_frac",
)
METRICS_LEN = len(METRICS_NAMES)


# --------------------------------------------------------------------------------------------
# Errors


class CalibrlError(RuntimeError):
    """A calibrl call failed. ``status`` is the library's ``calibrl_status`` number,
    ``status_name`` its name, and the message is the library's ``calibrl_last_error_message()``."""

    status: int = -1

    def __init__(self, message: str, status: int | None = None, status_name: str = ""):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.status_name = status_name
        self.message = message


class NullArgumentError(CalibrlError, ValueError):
    status = 1


class InvalidArgumentError(CalibrlError, ValueError):
    status = 2


class ShapeError(CalibrlError, ValueError):
    status = 3


class DtypeError(CalibrlError, TypeError):
    status = 4


class DeviceError(CalibrlError, ValueError):
    status = 5


class NonFiniteError(CalibrlError, ValueError):
    status = 6


class ConfigError(CalibrlError, ValueError):
    status = 7


class CudaUnavailableError(CalibrlError):
    status = 8


class CudaError(CalibrlError):
    status = 9


class PanicError(CalibrlError):
    """The library caught an internal panic (a calibrl bug: please report it)."""

    status = 10


class BufferTooSmallError(CalibrlError):
    status = 11


class LayoutError(CalibrlError, ValueError):
    """A tensor's strides are not supported by the operation (e.g. non-contiguous)."""

    status = 12


_ERRORS = {
    cls.status: cls
    for cls in (
        NullArgumentError,
        InvalidArgumentError,
        ShapeError,
        DtypeError,
        DeviceError,
        NonFiniteError,
        ConfigError,
        CudaUnavailableError,
        CudaError,
        PanicError,
        BufferTooSmallError,
        LayoutError,
    )
}


class LibraryNotFoundError(CalibrlError, OSError):
    pass


class AbiMismatchError(CalibrlError, ImportError):
    pass


class MissingSymbolError(CalibrlError, NotImplementedError):
    """The loaded library does not export a function these bindings know about."""


# --------------------------------------------------------------------------------------------
# C structs of docs/abi.md (the DLPack ones are in _dlpack.py)

_T = POINTER(DLTensor)


class Normalizers(ctypes.Structure):
    """``calibrl_normalizers``: global counts of the mini-batch (all ranks, all micro-batches)."""

    _fields_ = [("token_count", c_double), ("seq_count", c_double)]


class Metrics(ctypes.Structure):
    """``calibrl_metrics``: every field is a double, in ``METRICS_NAMES`` order."""

    _fields_ = [(name, c_double) for name in METRICS_NAMES]

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in METRICS_NAMES}


class AdvantageArgs(ctypes.Structure):
    """``calibrl_advantage_args`` (SPEC §3)."""

    _fields_ = [
        ("rewards", _T),
        ("group_ids", _T),
        ("num_groups", c_int64),
        ("correct", _T),
        ("is_expert", _T),
        ("advantages", _T),
        ("weights", _T),
        ("signs", _T),
    ]


class LossArgs(ctypes.Structure):
    """``calibrl_loss_args`` (SPEC §4). NULL is "absent" for every optional field."""

    _fields_ = [
        ("logprobs", _T),
        ("seq_offsets", _T),
        ("mask", _T),
        ("old_logprobs", _T),
        ("ref_logprobs", _T),
        ("entropy", _T),
        ("advantages", _T),
        ("weights", _T),
        ("signs", _T),
        ("is_expert", _T),
        ("expert_logprobs", _T),
        ("expert_offsets", _T),
        ("expert_mask", _T),
        ("expert_index", _T),
        ("normalizers", POINTER(Normalizers)),
        ("grad_logprobs", _T),
        ("grad_entropy", _T),
        ("metrics", _T),
        ("token_weights", _T),
    ]


class SchedulerConfigC(ctypes.Structure):
    """``calibrl_scheduler_config`` (SPEC §7); :class:`calibrl.SchedulerConfig` builds it."""

    _fields_ = [
        ("dp_ranks", c_uint32),
        ("minibatch_prompts", c_uint32),
        ("nograd_token_budget", c_uint64),
        ("train_token_budget", c_uint64),
        ("loss_kind", c_uint32),
        ("expert_selection", c_uint32),
        ("seed", c_uint64),
        ("fraction", c_double),
        ("pass_rate_low", c_double),
        ("pass_rate_high", c_double),
        ("reward_threshold", c_double),
        ("quadratic_coef", c_double),
        ("dynamic_sampling", c_uint32),
    ]


class PromptDesc(ctypes.Structure):
    """``calibrl_prompt_desc``: one prompt of the step (``expert_len`` -1: no expert)."""

    _fields_ = [("prompt_len", c_uint32), ("num_rollouts", c_uint32), ("expert_len", c_int64)]


class PlanInfo(ctypes.Structure):
    """``calibrl_plan_info``: the counts of a plan."""

    _fields_ = [
        ("num_prompts", c_uint64),
        ("num_rollouts", c_uint64),
        ("num_expert_slots", c_uint64),
        ("expert_tokens", c_uint64),
        ("dp_ranks", c_uint64),
        ("nograd_microbatches", c_uint64),
        ("num_minibatches", c_uint64),
        ("nograd_oversize", c_uint64),
        ("train_oversize", c_uint64),
        ("dropped_prompts", c_uint64),
    ]


class MinibatchInfo(ctypes.Structure):
    """``calibrl_minibatch_info``: one mini-batch of the training pass."""

    _fields_ = [
        ("first_prompt", c_uint64),
        ("num_prompts", c_uint64),
        ("microbatches", c_uint64),
        ("normalizers", Normalizers),
    ]


class SeqInfo(ctypes.Structure):
    """``calibrl_seq_info``: one sequence of a plan."""

    _fields_ = [
        ("kind", c_uint32),
        ("prompt", c_uint32),
        ("index", c_uint32),
        ("tokens", c_uint32),
        ("response_len", c_uint32),
    ]


# --------------------------------------------------------------------------------------------
# Signatures: every export, in one table. Functions returning calibrl_status are checked.

_status = c_int32
_stream = c_void_p
_cfg = c_void_p
_plan = c_void_p
_i64p = POINTER(c_int64)
_sizep = POINTER(c_size_t)

_SIGNATURES: dict[str, tuple[object, list]] = {
    # library
    "calibrl_abi_version": (c_uint32, []),
    "calibrl_version": (c_char_p, []),
    "calibrl_last_error_message": (c_char_p, []),
    "calibrl_status_name": (c_char_p, [c_int32]),
    "calibrl_config_new": (_status, [c_char_p, POINTER(c_void_p)]),
    "calibrl_config_free": (None, [_cfg]),
    "calibrl_config_to_json": (_status, [_cfg, c_char_p, c_size_t, POINTER(c_size_t)]),
    # SPEC §3, §4
    "calibrl_group_advantages": (_status, [_cfg, POINTER(AdvantageArgs), _stream]),
    "calibrl_loss": (_status, [_cfg, POINTER(LossArgs), POINTER(Metrics), _stream]),
    # SPEC §6
    "calibrl_logits_forward": (_status, [_T, _T, c_double, _T, _T, _T, _stream]),
    "calibrl_logits_backward": (_status, [_T, _T, c_double, c_int64, _T, _T, _T, _T, _T, _stream]),
    "calibrl_logits_shard_stats": (_status, [_T, _T, c_double, c_int64, _T, _stream]),
    "calibrl_logits_shard_finish": (_status, [_T, _T, _T, _T, _T, _stream]),
    # SPEC §7: the scheduler
    "calibrl_scheduler_config_default": (_status, [POINTER(SchedulerConfigC)]),
    "calibrl_plan_new": (
        _status,
        [POINTER(SchedulerConfigC), POINTER(PromptDesc), c_size_t, POINTER(c_uint32), c_size_t,
         POINTER(c_double), POINTER(c_void_p)],
    ),
    "calibrl_plan_free": (None, [_plan]),
    "calibrl_plan_summary": (_status, [_plan, POINTER(PlanInfo)]),
    "calibrl_plan_minibatch": (_status, [_plan, c_size_t, POINTER(MinibatchInfo)]),
    "calibrl_plan_normalizers": (_status, [_plan, c_size_t, POINTER(Normalizers)]),
    "calibrl_plan_nograd_microbatch": (
        _status, [_plan, c_size_t, c_size_t, _i64p, POINTER(c_uint8), c_size_t, _sizep]
    ),
    "calibrl_plan_train_microbatch": (
        _status, [_plan, c_size_t, c_size_t, c_size_t, _i64p, POINTER(c_uint8), c_size_t, _sizep]
    ),
    "calibrl_plan_gather_map": (_status, [_plan, _i64p, c_size_t, _sizep]),
    "calibrl_plan_expert_prompts": (_status, [_plan, _i64p, c_size_t, _sizep]),
    "calibrl_plan_dropped_prompts": (_status, [_plan, _i64p, c_size_t, _sizep]),
    "calibrl_plan_expert_offsets": (_status, [_plan, _i64p, c_size_t, _sizep]),
    "calibrl_plan_oversize": (_status, [_plan, c_uint32, _i64p, c_size_t, _sizep]),
    "calibrl_plan_seq": (_status, [_plan, c_int64, POINTER(SeqInfo)]),
    "calibrl_plan_collect_experts": (_status, [_plan, c_int64, _T, _T, _T, c_bool, _stream]),
}

#: Functions whose return value is a ``calibrl_status`` to check.
_CHECKED = {name for name, (restype, _) in _SIGNATURES.items() if restype is _status}


class _Library:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.dll = ctypes.CDLL(str(path))
        except OSError as e:
            raise LibraryNotFoundError(f"cannot load {path}: {e}") from e
        self.functions: dict[str, object] = {}
        self.missing: set[str] = set()
        # The version check comes before any other call.
        abi = self._bind("calibrl_abi_version")
        if abi is None:
            raise AbiMismatchError(f"{path} does not export calibrl_abi_version: not a calibrl library")
        found = abi()
        if found != EXPECTED_ABI_VERSION:
            raise AbiMismatchError(
                f"{path} implements calibrl ABI version {found}, these bindings need version "
                f"{EXPECTED_ABI_VERSION}: reinstall the package (pip install ./bindings/python) "
                f"so the library and the bindings match"
            )
        for name in _SIGNATURES:
            if name not in self.functions and self._bind(name) is None:
                self.missing.add(name)
        self.version = self.functions["calibrl_version"]().decode()

    def _bind(self, name: str):
        try:
            fn = getattr(self.dll, name)
        except AttributeError:
            return None
        restype, argtypes = _SIGNATURES[name]
        fn.restype = restype
        fn.argtypes = argtypes
        self.functions[name] = fn
        return fn


_lock = threading.Lock()
_library: _Library | None = None


def library_path() -> Path:
    """The library file to load: ``$CALIBRL_LIBRARY`` or ``libcalibrl.so`` next to this file."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "libcalibrl.so"


def _preload_nvrtc() -> None:
    """Opens NVRTC from an ``nvidia-cuda-nvrtc`` wheel (``calibrl[cuda]``) on ``sys.path``.

    The library itself looks beside its own directory (``site-packages/nvidia/cu13/lib``), the
    CUDA toolkit and the system; this covers a wheel installed elsewhere on ``sys.path`` (user
    site, ``--target`` directories). Once loaded, the library's ``dlopen`` by SONAME finds it.
    """
    import sys

    own_site = Path(__file__).resolve().parent.parent
    for entry in sys.path:
        base = Path(entry or ".")
        candidate = base / "nvidia" / "cu13" / "lib" / "libnvrtc.so.13"
        if candidate.is_file():
            if base.resolve() != own_site:  # the library finds that one itself, lazily
                try:
                    ctypes.CDLL(str(candidate))
                except OSError:
                    continue
            return


def lib() -> _Library:
    """The loaded library (loaded and version-checked on first use)."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                path = library_path()
                if not path.exists():
                    raise LibraryNotFoundError(
                        f"{path} does not exist. Install the package with "
                        f"`pip install ./bindings/python` (it builds the Rust library), or point "
                        f"{LIBRARY_ENV} at a built libcalibrl.so"
                    )
                _preload_nvrtc()
                _library = _Library(path)
    return _library


def has(name: str) -> bool:
    """Whether the loaded library exports ``name``."""
    return name in lib().functions


def function(name: str):
    library = lib()
    fn = library.functions.get(name)
    if fn is None:
        raise MissingSymbolError(
            f"{library.path} (calibrl {library.version}) does not export {name}; "
            f"rebuild the library from a newer source tree"
        )
    return fn


def error_for(status: int) -> CalibrlError:
    """The exception for a failed call, with the calling thread's last error message."""
    fns = lib().functions
    message = (fns["calibrl_last_error_message"]() or b"").decode(errors="replace")
    cls = _ERRORS.get(status, CalibrlError)
    # calibrl_status_name takes the C enum: only pass numbers it defines.
    name = (fns["calibrl_status_name"](status) or b"").decode(errors="replace") if status in _ERRORS else ""
    return cls(f"{message} [{name}]" if message else name or f"status {status}", status, name)


def call(name: str, *args) -> None:
    """Calls a status-returning function and raises on failure."""
    status = function(name)(*args)
    if name in _CHECKED and status != 0:
        raise error_for(status)
