"""The fused logits path (SPEC §6) through the bindings, against float64 autograd."""

import numpy as np
import pytest
import torch

import calibrl
import spec_reference as ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def make(n=7, v=50, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -1  # an ignored row
    return z, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_float64(dtype, temperature):
    z, y = make(dtype=dtype)
    lp, ent, lse = calibrl.logits_forward(z, y, temperature)
    # The reference sees exactly the values the library sees (bf16/f16 rounded once).
    e_lp, e_ent, e_lse = ref.logits_outputs(z, y, temperature)
    for got, exp in [(lp, e_lp), (ent, e_ent), (lse, e_lse)]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-5)
    assert lp[2] == 0 and ent[2] == 0 and lse[2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_backward_matches_autograd(dtype, temperature, with_entropy):
    z, y = make(dtype=dtype, seed=1)
    lp, ent, lse = calibrl.logits_forward(z, y, temperature)
    g = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(5))
    h = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(6)) if with_entropy else None

    z64 = z.double().requires_grad_()
    e_lp, e_ent, _ = ref.logits_outputs(z64, y, temperature)
    objective = (g.double() * e_lp).sum() + ((h.double() * e_ent).sum() if with_entropy else 0)
    objective.backward()

    grad = calibrl.logits_backward(z, y, lse, g, temperature, entropy=ent if with_entropy else None, grad_entropy=h)
    assert grad.dtype == dtype and grad.data_ptr() != z.data_ptr()
    atol = 2e-6 if dtype == torch.float32 else 4e-3  # bf16 output rounding
    torch.testing.assert_close(grad.double(), z64.grad, atol=atol, rtol=1e-2)
    assert torch.all(grad[2] == 0)


def test_backward_in_place_overwrites_the_logits_buffer():
    z, y = make(seed=2)
    lp, ent, lse = calibrl.logits_forward(z, y)
    g, h = torch.randn(z.shape[0]), torch.randn(z.shape[0])
    expected = calibrl.logits_backward(z, y, lse, g, entropy=ent, grad_entropy=h)
    ptr = z.data_ptr()
    out = calibrl.logits_backward(z, y, lse, g, entropy=ent, grad_entropy=h, out=z)
    assert out is z and z.data_ptr() == ptr
    torch.testing.assert_close(z, expected, atol=1e-7, rtol=1e-6)


def test_numpy_path_matches_torch():
    z, y = make(seed=3)
    lp_t, ent_t, lse_t = calibrl.logits_forward(z, y, 0.9)
    lp, ent, lse = calibrl.logits_forward(z.numpy(), y.numpy().astype(np.int32), 0.9)
    assert isinstance(lp, np.ndarray) and lp.dtype == np.float32
    np.testing.assert_array_equal(lp, lp_t.numpy())
    np.testing.assert_array_equal(ent, ent_t.numpy())
    g = np.linspace(-1, 1, z.shape[0]).astype(np.float32)
    grad = calibrl.logits_backward(z.numpy(), y.numpy(), lse, g, 0.9)
    np.testing.assert_array_equal(grad, calibrl.logits_backward(z, y, lse_t, torch.from_numpy(g), 0.9).numpy())


@pytest.mark.parametrize("shards", [2, 3])
def test_shard_stats_and_finish_equal_the_full_vocabulary(shards):
    z, y = make(n=9, v=60, seed=4)
    full = calibrl.logits_forward(z, y, 1.1)
    v_local = z.shape[1] // shards
    stats = torch.stack([
        calibrl.logits_shard_stats(z[:, r * v_local:(r + 1) * v_local], y, 1.1, vocab_start=r * v_local)
        for r in range(shards)
    ])
    lp, ent, lse = calibrl.logits_shard_finish(stats, y)
    for a, b in zip((lp, ent, lse), full):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    # Backward per shard concatenates to the full backward.
    g, h = torch.randn(9), torch.randn(9)
    whole = calibrl.logits_backward(z, y, lse, g, 1.1, entropy=ent, grad_entropy=h)
    parts = [
        calibrl.logits_backward(z[:, r * v_local:(r + 1) * v_local].contiguous(), y, lse, g, 1.1,
                                vocab_start=r * v_local, entropy=ent, grad_entropy=h)
        for r in range(shards)
    ]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-7, rtol=1e-6)


def test_row_strided_logits_are_accepted():
    big, y = make(n=6, v=80, seed=5)
    z = big[:, :50]  # rows strided by 80, unit stride along V
    assert not z.is_contiguous()
    lp, ent, lse = calibrl.logits_forward(z, y.clamp(max=49))
    e_lp, e_ent, _ = ref.logits_outputs(z, y.clamp(max=49), 1.0)
    torch.testing.assert_close(lp.double(), e_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_forward_backward_equals_the_two_calls(dtype, temperature, with_entropy, in_place):
    z, y = make(n=9, v=37, dtype=dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(z.shape[0], generator=gen)
    h = torch.randn(z.shape[0], generator=gen) if with_entropy else None
    lp, ent, lse = calibrl.logits_forward(z, y, temperature, entropy=with_entropy)
    grad = calibrl.logits_backward(z, y, lse, g, temperature, entropy=ent, grad_entropy=h)

    z_in = z.clone()
    got = calibrl.logits_forward_backward(
        z_in, y, g, temperature, grad_entropy=h, out=z_in if in_place else None
    )
    f_lp, f_ent, f_lse, f_grad = got
    assert (f_grad is z_in) == in_place and f_grad.dtype == dtype
    if not in_place:
        assert torch.equal(z_in, z)  # the logits are only read
    assert (f_ent is None) == (not with_entropy)
    # Bit-equal to the two calls (the CPU backend runs them in turn).
    for a, b in [(f_lp, lp), (f_lse, lse), (f_grad, grad)] + ([(f_ent, ent)] if with_entropy else []):
        assert torch.equal(a, b)
    assert f_lp[2] == 0 and torch.all(f_grad[2] == 0)


def test_forward_backward_numpy_and_bad_input_untouched():
    z, y = make(seed=9)
    g = np.linspace(-1, 1, z.shape[0]).astype(np.float32)
    lp, ent, lse, grad = calibrl.logits_forward_backward(z.numpy(), y.numpy(), g, 0.9, entropy=True)
    assert isinstance(grad, np.ndarray) and grad.dtype == np.float32
    want = calibrl.logits_backward(z.numpy(), y.numpy(), lse, g, 0.9)
    np.testing.assert_array_equal(grad, want)
    np.testing.assert_array_equal(lp, calibrl.logits_forward(z.numpy(), y.numpy(), 0.9)[0])
    # A NaN upstream gradient is refused by name; no output is written.
    bad = g.copy()
    bad[3] = np.nan
    outs = [np.full(z.shape[0], -7.0, np.float32) for _ in range(3)]
    d = np.full(z.shape, -7.0, np.float32)
    with pytest.raises(calibrl.NonFiniteError, match="grad_logprobs"):
        calibrl.logits_forward_backward(z.numpy(), y.numpy(), bad, logprobs=outs[0], entropy=outs[1],
                                        lse=outs[2], out=d)
    assert all(np.all(o == -7.0) for o in outs) and np.all(d == -7.0)
    # float16 row outputs are refused (the backward reads them back).
    with pytest.raises(calibrl.DtypeError, match="logprobs"):
        calibrl.logits_forward_backward(z, y, torch.from_numpy(g), logprobs=torch.zeros(z.shape[0], dtype=torch.float16))
