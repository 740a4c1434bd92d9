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
    c_void_p,
)
from pathlib import Path

from ._abi import (
    EXPECTED_ABI_VERSION,
    AdvantageArgs,
    DLTensor,
    LinearInput,
    LossArgs,
    Metrics,
    MinibatchInfo,
    Normalizers,
    PlanInfo,
    PromptDesc,
    SchedulerConfigC,
    SeqInfo,
)
from ._errors import (
    ERRORS as _ERRORS,
    AbiMismatchError,
    CalibrlError,
    LibraryNotFoundError,
    MissingSymbolError,
)

_T = POINTER(DLTensor)

#: Environment variable naming the library file to load instead of the packaged one.
LIBRARY_ENV = "CALIBRL_LIBRARY"

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
    "calibrl_logits_forward_backward": (
        _status, [_T, _T, c_double, _T, _T, _T, _T, _T, _T, _stream]
    ),
    "calibrl_logits_shard_stats": (_status, [_T, _T, c_double, c_int64, _T, _stream]),
    "calibrl_logits_shard_finish": (_status, [_T, _T, _T, _T, _T, _stream]),
    # the fused linear path (docs/abi.md)
    "calibrl_fused_linear_workspace_size": (_status, [_T, _T, c_int64, _sizep]),
    "calibrl_fused_linear_forward": (_status, [POINTER(LinearInput), _T, _T, _T, _stream]),
    "calibrl_fused_linear_shard_stats": (_status, [POINTER(LinearInput), _T, _stream]),
    "calibrl_fused_linear_backward": (
        _status, [POINTER(LinearInput), _T, _T, _T, _T, _T, _T, _T, c_int32, _stream]
    ),
    "calibrl_fused_linear_forward_backward": (
        _status, [POINTER(LinearInput), _T, _T, _T, _T, _T, _T, _T, _T, c_int32, _stream]
    ),
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


# The NVRTC wheels: ``calibrl[cuda13]`` (nvidia-cuda-nvrtc 13) and ``calibrl[cuda12]``
# (nvidia-cuda-nvrtc-cu12), relative to a ``sys.path`` entry.
_NVRTC_WHEELS = (
    ("nvidia", "cu13", "lib", "libnvrtc.so.13"),
    ("nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12"),
)


def _preload_nvrtc() -> None:
    """Opens the NVRTC of each ``nvidia-cuda-nvrtc`` wheel (13 and cu12) on ``sys.path``.

    The library itself looks beside its own directory (``site-packages/nvidia/cu13/lib``,
    ``site-packages/nvidia/cuda_nvrtc/lib``), the CUDA toolkit and the system, and picks the
    NVRTC the driver can run; this covers a wheel installed elsewhere on ``sys.path`` (user site,
    ``--target`` directories): the library sees an already-loaded NVRTC as found. Loading one
    that the driver cannot run costs address space only (each has its own SONAME).
    """
    import sys

    own_site = Path(__file__).resolve().parent.parent
    for parts in _NVRTC_WHEELS:
        for entry in sys.path:
            base = Path(entry or ".")
            candidate = base.joinpath(*parts)
            if candidate.is_file():
                if base.resolve() != own_site:  # the library finds that one itself, lazily
                    try:
                        ctypes.CDLL(str(candidate))
                    except OSError:
                        continue
                break


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
