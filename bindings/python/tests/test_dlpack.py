"""DLPack descriptors: built without copies from NumPy, PyTorch and __dlpack__ objects."""

import numpy as np
import pytest
import torch

import calibrl
from calibrl._abi import DL_CPU, DL_CUDA
from calibrl._dlpack import View
from conftest import needs_cuda


def test_torch_descriptor_points_at_the_tensor_memory():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    t = base[1:, 2:]  # storage offset and row stride
    v = View(t, "x")
    assert v.desc.data == t.data_ptr() == base.data_ptr() + (10 + 2) * 4
    assert v.shape == (5, 8) and v.strides == (10, 1)
    assert (v.desc.dtype.code, v.desc.dtype.bits, v.desc.dtype.lanes) == (2, 32, 1)
    assert v.desc.device.device_type == DL_CPU and v.desc.ndim == 2


def test_bf16_and_integer_dtype_codes():
    cases = {torch.bfloat16: (4, 16), torch.float16: (2, 16), torch.float64: (2, 64),
             torch.int32: (0, 32), torch.int64: (0, 64), torch.uint8: (1, 8), torch.bool: (6, 8)}
    for dtype, code in cases.items():
        d = View(torch.zeros(3, dtype=dtype), "x").desc.dtype
        assert (d.code, d.bits) == code, dtype


def test_numpy_descriptor_converts_byte_strides_to_elements():
    a = np.zeros((4, 6), dtype=np.float64)[:, ::2]
    v = View(a, "x")
    assert v.desc.data == a.ctypes.data and v.strides == (6, 2) and v.shape == (4, 3)


def test_read_only_numpy_output_is_refused():
    z = np.zeros((2, 3), np.float32)
    out = np.zeros(2, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        calibrl.logits_forward(z, np.zeros(2, np.int64), logprobs=out)


class Foreign:
    """Some other library's array: only the DLPack protocol."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None, **kwargs):
        return self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_dlpack_object_is_imported_without_a_copy():
    z = torch.randn(4, 9)
    y = torch.tensor([0, 3, 8, 1])
    v = View(Foreign(z), "logits")
    assert v.desc.data == z.data_ptr()
    lp, _, _ = calibrl.logits_forward(Foreign(z), Foreign(y))
    torch.testing.assert_close(lp, calibrl.logits_forward(z, y)[0], atol=0, rtol=0)


def test_unknown_objects_are_rejected():
    """Arrays, tensors, __dlpack__ objects and lists are arguments; anything else is named."""
    for bad in (object(), "logits", {0: 1.0}):
        with pytest.raises(TypeError, match="`logits`: expected a NumPy array, a PyTorch tensor, a list"):
            calibrl.logits_forward(bad, [0])


@needs_cuda
def test_cuda_descriptor_and_current_stream():
    z = torch.randn(4, 9, device="cuda", dtype=torch.bfloat16)
    v = View(z, "logits")
    assert v.desc.device.device_type == DL_CUDA and v.desc.data == z.data_ptr()
    y = torch.tensor([0, 3, 8, -1], device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        lp, ent, lse = calibrl.logits_forward(z, y)
    s.synchronize()
    exp = calibrl.logits_forward(z.cpu(), y.cpu())
    torch.testing.assert_close(lp.cpu(), exp[0], atol=1e-4, rtol=1e-4)
