"""calibrl: the CalibRL objective (hybrid-policy RLVR with controllable exploration).

Python bindings of ``libcalibrl.so`` (C ABI, DLPack tensors, no copies). The array-level API
takes NumPy arrays, PyTorch tensors (CPU/CUDA, bf16 included) or ``__dlpack__`` objects; the
PyTorch autograd API lives in :mod:`calibrl.autograd` (imported here when torch is installed).
"""

from ._abi import EXPECTED_ABI_VERSION, METRICS_NAMES
from ._errors import (
    AbiMismatchError,
    BufferTooSmallError,
    CalibrlError,
    ConfigError,
    CudaError,
    CudaUnavailableError,
    DeviceError,
    DtypeError,
    InvalidArgumentError,
    LayoutError,
    LibraryNotFoundError,
    MissingSymbolError,
    NonFiniteError,
    NullArgumentError,
    PanicError,
    ShapeError,
)
from .config import PRESETS, Config
from .ops import (
    DLPackTensor,
    LossInputs,
    LossResult,
    group_advantages,
    logits_backward,
    logits_forward,
    logits_forward_backward,
    logits_shard_finish,
    logits_shard_stats,
    TensorLike,
    loss,
    metrics_dict,
)
from . import linear
from .plan import Minibatch, Plan, Prompt, SchedulerConfig, SeqKind, SeqRef, plan


def library_version() -> str:
    """The loaded library's version string."""
    from ._lib import lib

    return lib().version


try:  # PyTorch is optional
    import torch as _torch  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    from .autograd import (  # noqa: F401
        CalibRLLoss,
        FusedLogitsCalibRL,
        calibrl_loss,
        fused_logits_calibrl_loss,
        vocab_parallel_calibrl_loss,
    )
    from .linear_autograd import (  # noqa: F401
        FusedLinearLogprobs,
        fused_linear_logprobs,
        fused_linear_logprobs_nograd,
        vocab_parallel_fused_linear_logprobs,
    )

__version__ = "0.1.0"

__all__ = [
    "EXPECTED_ABI_VERSION", "METRICS_NAMES", "PRESETS",
    "AbiMismatchError", "BufferTooSmallError", "CalibrlError", "ConfigError", "CudaError",
    "CudaUnavailableError", "DeviceError", "DtypeError", "InvalidArgumentError", "LayoutError",
    "LibraryNotFoundError", "MissingSymbolError", "NonFiniteError", "NullArgumentError",
    "PanicError", "ShapeError",
    "Config", "DLPackTensor", "LossInputs", "LossResult", "TensorLike",
    "group_advantages", "logits_backward", "logits_forward", "logits_forward_backward",
    "logits_shard_finish",
    "logits_shard_stats", "loss", "metrics_dict", "library_version",
    "linear", "Minibatch", "Plan", "Prompt", "SchedulerConfig", "SeqKind", "SeqRef", "plan",
]
if "_torch" in globals():
    __all__ += [
        "CalibRLLoss", "FusedLogitsCalibRL", "calibrl_loss", "fused_logits_calibrl_loss",
        "vocab_parallel_calibrl_loss", "FusedLinearLogprobs", "fused_linear_logprobs",
        "fused_linear_logprobs_nograd", "vocab_parallel_fused_linear_logprobs",
    ]
