"""Borrowed DLPack descriptors built directly from NumPy arrays, PyTorch tensors (CPU and CUDA,
bf16 included) and any object exposing ``__dlpack__``. The descriptor points at the caller's
memory, and a :class:`View` keeps the source object alive for the call.

One rule for layouts and plain Python sequences, the same for every argument:

- inputs may have any strides: one that is not contiguous is copied into a contiguous one first
  (the library reads token tensors densely), except the rows of ``logits [N, V]``, whose spacing
  the library takes as it is (only a vocabulary dimension with stride ≠ 1 is copied);
- outputs are written in place, so they must be contiguous (the library refuses others, naming
  the argument);
- an input may be a list or tuple: it becomes ``numpy.asarray(value)``, as float32 for a float
  argument (``rewards=[1, 0, 0, 1]``; pass an array for another dtype); an output may not.
"""

from __future__ import annotations

import ctypes
import sys
from ctypes import c_int64

import numpy as np

from ._abi import (
    DL_CPU,
    DL_CUDA,
    DL_CUDA_MANAGED,
    DLDataType,
    DLDevice,
    DLTensor,
)
from ._errors import DeviceError

# (DLPack type code, bits): 0 int, 1 uint, 2 float, 4 bfloat, 6 bool
_NUMPY_DTYPES = {
    np.dtype(np.float16): (2, 16),
    np.dtype(np.float32): (2, 32),
    np.dtype(np.float64): (2, 64),
    np.dtype(np.int8): (0, 8),
    np.dtype(np.int32): (0, 32),
    np.dtype(np.int64): (0, 64),
    np.dtype(np.uint8): (1, 8),
    np.dtype(np.bool_): (6, 8),
}


def _torch():
    """PyTorch if it has been imported (a torch tensor can only exist if it has)."""
    return sys.modules.get("torch")


def _torch_dtypes(torch):
    return {
        torch.float16: (2, 16),
        torch.bfloat16: (4, 16),
        torch.float32: (2, 32),
        torch.float64: (2, 64),
        torch.int8: (0, 8),
        torch.int32: (0, 32),
        torch.int64: (0, 64),
        torch.uint8: (1, 8),
        torch.bool: (6, 8),
    }


# Arguments whose values are floats: a list given for one becomes float32.
_FLOAT_ARGS = {
    "logits", "rewards", "logprobs", "old_logprobs", "ref_logprobs", "entropy", "advantages",
    "weights", "signs", "expert_logprobs", "lse", "stats", "grad_logprobs", "grad_entropy",
}


def _from_sequence(obj, name: str):
    """A list or tuple as a NumPy array (see the module's rule)."""
    a = np.asarray(obj)
    if a.dtype.kind in "iuf" and name in _FLOAT_ARGS:
        a = a.astype(np.float32)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"`{name}`: a {type(obj).__name__} of numbers was expected, got elements of type {a.dtype}")
    return a


def _dense(obj, rows_may_stride: bool):
    """``obj`` itself when the library can read its layout, else a contiguous copy of it."""
    torch = _torch()
    if isinstance(obj, np.ndarray):
        item = obj.dtype.itemsize
        if obj.flags.c_contiguous:
            return obj
        if rows_may_stride and obj.ndim == 2 and (obj.shape[1] <= 1 or obj.strides[1] == item) \
                and obj.strides[0] >= obj.shape[1] * item:
            return obj
        return np.ascontiguousarray(obj)
    if torch is not None and isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        if obj.is_contiguous():
            return obj
        if rows_may_stride and obj.dim() == 2 and (obj.shape[1] <= 1 or obj.stride(1) == 1) \
                and obj.stride(0) >= obj.shape[1]:
            return obj
        return obj.contiguous()
    return obj


class View:
    """A ``DLTensor`` over an array's memory, as it is. ``pointer`` is what the C functions take.
    (:func:`view` applies the module's rule for layouts and lists first.)"""

    def __init__(self, obj, name: str, *, writable: bool = False):
        self.name = name
        self.source = obj  # keeps the memory alive for the call
        torch = _torch()
        if isinstance(obj, np.ndarray):
            self._from_numpy(obj, writable)
        elif torch is not None and isinstance(obj, torch.Tensor):
            self._from_torch(obj, torch)
        elif hasattr(obj, "__dlpack__"):
            converted = _import_dlpack(obj, name)
            self.source = (obj, converted)
            if isinstance(converted, np.ndarray):
                self._from_numpy(converted, writable)
            else:
                self._from_torch(converted, _torch())
        else:
            raise TypeError(
                f"`{name}`: expected a NumPy array, a PyTorch tensor, a list or an object with "
                f"__dlpack__, got {type(obj).__name__}"
            )
        self.desc = DLTensor(
            data=self._data,
            device=DLDevice(self.device_type, self.device_id),
            ndim=len(self.shape),
            dtype=DLDataType(self._code, self._bits, 1),
            shape=self._shape_arr,
            strides=self._strides_arr,
            byte_offset=0,
        )
        self.pointer = ctypes.pointer(self.desc)

    @property
    def is_cuda(self) -> bool:
        return self.device_type in (DL_CUDA, DL_CUDA_MANAGED)

    def _set_layout(self, shape, strides):
        self.shape = tuple(int(s) for s in shape)
        if 0 in self.shape:
            # No element, no layout: NumPy reports strides (0, 0) for a (0, 5) array; pass
            # row-major ones (the library ignores an empty tensor's strides too).
            strides = [1] * len(self.shape)
            for d in range(len(self.shape) - 2, -1, -1):
                strides[d] = strides[d + 1] * max(self.shape[d + 1], 1)
        self.strides = tuple(int(s) for s in strides)
        n = len(self.shape)
        self._shape_arr = (c_int64 * max(n, 1))(*self.shape)
        self._strides_arr = (c_int64 * max(n, 1))(*self.strides)

    def _from_numpy(self, a: np.ndarray, writable: bool):
        code_bits = _NUMPY_DTYPES.get(a.dtype)
        if code_bits is None:
            raise TypeError(
                f"`{self.name}`: NumPy dtype {a.dtype} is not supported "
                f"(float16/32/64, int8/32/64, uint8, bool)"
            )
        if writable and not a.flags.writeable:
            raise ValueError(f"`{self.name}`: the output array is read-only")
        item = a.dtype.itemsize
        if any(s % item for s in a.strides):
            raise ValueError(f"`{self.name}`: strides {a.strides} are not a multiple of the item size {item}")
        self._code, self._bits = code_bits
        self.device_type, self.device_id = DL_CPU, 0
        self._data = a.ctypes.data
        self._set_layout(a.shape, [s // item for s in a.strides])
        self.dtype = str(a.dtype)

    def _from_torch(self, t, torch):
        code_bits = _torch_dtypes(torch).get(t.dtype)
        if code_bits is None:
            raise TypeError(f"`{self.name}`: PyTorch dtype {t.dtype} is not supported")
        if t.device.type == "cpu":
            self.device_type, self.device_id = DL_CPU, 0
        elif t.device.type == "cuda":
            self.device_type, self.device_id = DL_CUDA, t.device.index or 0
        else:

            raise DeviceError(
                f"`{self.name}`: tensors on device {t.device} are not supported (use CPU or CUDA)",
                status=5,
                status_name="CALIBRL_STATUS_DEVICE_MISMATCH",
            )
        if t.is_sparse or t.layout != torch.strided:
            raise ValueError(f"`{self.name}`: only strided (dense) tensors are supported")
        self._code, self._bits = code_bits
        self._data = t.data_ptr()  # includes the storage offset
        self._set_layout(t.shape, t.stride())
        self.dtype = str(t.dtype).replace("torch.", "")


def _import_dlpack(obj, name: str):
    """Imports a foreign ``__dlpack__`` object without copying: through PyTorch when it is
    available (it understands CUDA), else through NumPy (host memory only)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        return torch.from_dlpack(obj)
    if hasattr(np, "from_dlpack"):
        return np.from_dlpack(obj)
    raise TypeError(f"`{name}`: importing a __dlpack__ object needs PyTorch or NumPy >= 1.22")


def as_array(obj, name: str):
    """``obj`` as a NumPy array or PyTorch tensor (``None`` stays ``None``): foreign
    ``__dlpack__`` objects are imported without a copy, lists and tuples converted (see the
    module's rule), anything else is refused."""
    if obj is None or isinstance(obj, np.ndarray):
        return obj
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        return _from_sequence(obj, name)
    if hasattr(obj, "__dlpack__"):
        return _import_dlpack(obj, name)
    raise TypeError(
        f"`{name}`: expected a NumPy array, a PyTorch tensor, a list or an object with "
        f"__dlpack__, got {type(obj).__name__}"
    )


def view(obj, name: str, *, writable: bool = False, rows_may_stride: bool = False) -> View | None:
    """``View`` of argument ``obj`` after the module's rule (an input list becomes an array, a
    strided input a contiguous copy), or ``None`` for ``None`` (an absent optional argument).
    ``writable``: an output (never copied). ``rows_may_stride``: a ``[N, V]`` logits input whose
    row spacing the library takes as it is."""
    if obj is None:
        return None
    if isinstance(obj, (list, tuple)):
        if writable:
            raise TypeError(
                f"`{name}`: an output is written in place, so it must be a NumPy array or a "
                f"PyTorch tensor, got {type(obj).__name__}"
            )
        obj = _from_sequence(obj, name)
    if not writable:
        obj = _dense(as_array(obj, name), rows_may_stride)
    return View(obj, name, writable=writable)


def ptr(v: View | None):
    """The ``DLTensor*`` of a view, or NULL."""
    return None if v is None else v.pointer


def stream_for(views) -> int | None:
    """PyTorch's current CUDA stream for the device of the call's CUDA tensors, else NULL."""
    for v in views:
        if v is not None and v.is_cuda:
            torch = _torch()
            if torch is None or not torch.cuda.is_available():
                return None
            return torch.cuda.current_stream(v.device_id).cuda_stream
    return None
