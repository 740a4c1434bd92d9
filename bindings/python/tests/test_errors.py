"""Bad input from Python raises a clear exception and writes nothing."""

import numpy as np
import pytest
import torch

import calibrl
from calibrl import _abi, _dlpack

SENTINEL = 123.0


def outputs(n):
    return {k: torch.full((n,), SENTINEL) for k in ("logprobs", "entropy", "lse")}


def assert_untouched(*tensors):
    for t in tensors:
        assert torch.all(t == SENTINEL), "an output was written by a failed call"


def good(n=4, v=10):
    return torch.randn(n, v), torch.tensor([1, 2, 3, 4])[:n]


def test_wrong_dtype():
    z, y = good()
    out = outputs(4)
    with pytest.raises(calibrl.DtypeError, match="`logits`.*float64") as e:
        calibrl.logits_forward(z.double(), y, **out)
    assert isinstance(e.value, TypeError) and e.value.status == 4
    with pytest.raises(calibrl.DtypeError, match="`labels`"):
        calibrl.logits_forward(z, y.float(), **out)
    assert_untouched(*out.values())


def test_wrong_shape():
    z, y = good()
    out = outputs(4)
    with pytest.raises(calibrl.ShapeError, match="`labels`"):
        calibrl.logits_forward(z, torch.tensor([1, 2, 3]), **out)
    with pytest.raises(calibrl.ShapeError, match="`logits`"):
        calibrl.logits_forward(z[None], y, **out)
    bad = outputs(3)
    with pytest.raises(calibrl.ShapeError, match="`logprobs`"):
        calibrl.logits_forward(z, y, logprobs=bad["logprobs"], entropy=out["entropy"], lse=out["lse"])
    assert_untouched(*out.values(), *bad.values())


def test_label_out_of_vocabulary():
    z, _ = good()
    out = outputs(4)
    with pytest.raises(calibrl.InvalidArgumentError, match="label 10"):
        calibrl.logits_forward(z, torch.tensor([1, 2, 10, 0]), **out)
    assert_untouched(*out.values())


def test_strided_inputs_are_read_and_strided_outputs_refused():
    """One rule for every argument: an input may have any strides (copied when the library
    needs a dense layout), an output is written in place and must be contiguous."""
    z, y = good(v=20)
    strided_labels = torch.tensor([[1, 9], [2, 9], [3, 9], [4, 9]])[:, 0]
    assert not z[:, ::2].is_contiguous() and not strided_labels.is_contiguous()
    want = calibrl.logits_forward(z[:, ::2].contiguous(), y)
    for got in (calibrl.logits_forward(z[:, ::2], strided_labels),
                calibrl.logits_forward(z[:, ::2].numpy(), strided_labels.numpy())):
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.as_tensor(a), b, atol=0, rtol=0)
    out = outputs(4)
    strided_out = torch.full((4, 2), SENTINEL)[:, 0]
    with pytest.raises(calibrl.LayoutError, match="`logprobs`.*contiguous"):
        calibrl.logits_forward(z, y, logprobs=strided_out, entropy=out["entropy"], lse=out["lse"])
    assert_untouched(strided_out, *out.values())


def test_lists_are_accepted_as_inputs_but_not_as_outputs():
    z, y = good()
    want = calibrl.logits_forward(z.numpy(), y.numpy())
    got = calibrl.logits_forward(z.tolist(), y.tolist())
    assert isinstance(got[0], np.ndarray)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="`logprobs`: an output is written in place"):
        calibrl.logits_forward(z, y, logprobs=[0.0] * 4)
    with pytest.raises(TypeError, match="`labels`: a list of numbers"):
        calibrl.logits_forward(z, ["a", "b", "c", "d"])


def test_nan_logits():
    z, y = good()
    z[1, 3] = float("nan")
    out = outputs(4)
    with pytest.raises(calibrl.NonFiniteError, match="row 1"):
        calibrl.logits_forward(z, y, **out)
    assert_untouched(*out.values())


def test_nan_in_backward_leaves_logits_untouched_in_place():
    z, y = good()
    lp, ent, lse = calibrl.logits_forward(z, y)
    before = z.clone()
    z[0, 0] = float("nan")
    before[0, 0] = float("nan")
    with pytest.raises(calibrl.NonFiniteError):
        calibrl.logits_backward(z, y, lse, torch.ones(4), out=z)
    torch.testing.assert_close(z, before, equal_nan=True, atol=0, rtol=0)


def test_unsupported_torch_device():
    z, y = good()
    with pytest.raises(calibrl.DeviceError, match="meta"):
        calibrl.logits_forward(z.to("meta"), y)


def test_mixed_devices_are_refused_by_the_library(monkeypatch):
    """A descriptor claiming CUDA memory next to CPU tensors: refused before any access."""
    z, y = good()
    real = _dlpack.View._from_torch

    def as_cuda(self, t, torch_mod):
        real(self, t, torch_mod)
        if self.name == "labels":
            self.device_type, self.device_id = _abi.DL_CUDA, 0

    monkeypatch.setattr(_dlpack.View, "_from_torch", as_cuda)
    out = outputs(4)
    with pytest.raises(calibrl.DeviceError, match="cuda:0") as e:
        calibrl.logits_forward(z, y, **out)
    assert e.value.status == 5
    assert_untouched(*out.values())


def test_bad_temperature():
    z, y = good()
    with pytest.raises(calibrl.InvalidArgumentError, match="temperature"):
        calibrl.logits_forward(z, y, 0.0)


# ------------------------------------------------------------------------------ first use


def test_config_accepts_lambda_underscore():
    """``lambda`` is a Python keyword: ``lambda_=`` is the keyword-argument spelling."""
    assert calibrl.Config("paper", lambda_=0.3)["lambda"] == 0.3
    assert calibrl.Config("paper", **{"lambda": 0.3})["lambda"] == 0.3
    assert calibrl.Config("paper").replace(lambda_=0.2)["lambda"] == 0.2


@pytest.mark.parametrize("key, guess", [("lamda", "lambda"), ("alhpa", "alpha"), ("entropy_coeff", "entropy_coef")])
def test_unknown_config_key_suggests_the_nearest(key, guess):
    with pytest.raises(calibrl.ConfigError, match=f'`{key}`: unknown key; did you mean "{guess}"'):
        calibrl.Config("paper", **{key: 0.1})


def test_unknown_config_key_far_from_every_key_only_lists_them():
    with pytest.raises(calibrl.ConfigError) as e:
        calibrl.Config("paper", learning_rate=0.1)
    assert "did you mean" not in str(e.value) and "known keys: preset, " in str(e.value)
