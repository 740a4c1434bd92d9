"""The fused linear path from Python: values and gradients (hidden, weight, bias) against
PyTorch's materialised path (``hidden @ weight.T + bias``, log-softmax, autograd), the no-grad
helper, the array-level calls (combined forward+backward, accumulate, vocabulary shards
finished by ``logits_shard_finish``), bad input, and torch.compile(fullgraph=True)."""

import datetime
import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import calibrl  # noqa: E402
from calibrl import linear  # noqa: E402


def problem(n=13, h=17, v=41, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    b = (0.5 * torch.randn(v, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -1
    return hidden, weight, b, labels


def materialised(hidden, weight, bias, labels, temperature):
    """PyTorch's path in float64: logits, log-softmax, gather, entropy (0 at ignored rows)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z / temperature, dim=-1)
    keep = labels >= 0
    lp = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * keep
    ent = -(logp.exp() * logp).sum(-1) * keep
    return lp, ent


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_values_and_gradients_match_the_materialised_path(dtype, chunk):
    hidden, weight, bias, labels = problem(dtype=dtype)
    temperature = 0.8
    hid = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    lp, ent = calibrl.fused_linear_logprobs(hid, w, labels, bias=b, temperature=temperature, chunk_size=chunk)
    # The reference on the same (dtype-rounded) inputs, in float64.
    hid64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    lp_r, ent_r = materialised(hid64, w64, b64, labels, temperature)
    tol = TOL[dtype]
    torch.testing.assert_close(lp.double(), lp_r, rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ent_r, rtol=tol, atol=tol)
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(lp.shape, generator=gen), 0.3 * torch.randn(lp.shape, generator=gen)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    ((lp_r * g_lp.double()).sum() + (ent_r * g_ent.double()).sum()).backward()
    assert hid.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    # Gradients come back in the parameters' dtype: compare at its precision.
    gtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(hid.grad.double(), hid64.grad, rtol=gtol, atol=gtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=gtol, atol=gtol)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=gtol, atol=gtol)
    assert hid.grad[2].abs().sum() == 0  # the ignored row


def test_leading_dims_module_and_nograd_helper():
    hidden, weight, _, labels = problem(n=12, bias=False)
    h3, l2 = hidden.view(3, 4, -1), labels.view(3, 4)
    module = calibrl.FusedLinearLogprobs(temperature=1.3, chunk_size=5)
    lp, ent = module(h3, weight, l2)
    assert lp.shape == (3, 4)
    lp_r, ent_r = materialised(hidden, weight, None, labels, 1.3)
    torch.testing.assert_close(lp.reshape(-1).double(), lp_r, rtol=1e-5, atol=1e-5)
    lp_n, ent_n = calibrl.fused_linear_logprobs_nograd(h3, weight.requires_grad_(), l2, temperature=1.3)
    assert not lp_n.requires_grad
    torch.testing.assert_close(lp_n, lp.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_n, ent.detach(), rtol=1e-6, atol=1e-6)
    lp_only, none = calibrl.fused_linear_logprobs_nograd(h3, weight, l2, temperature=1.3, entropy=False)
    assert none is None
    torch.testing.assert_close(lp_only, lp_n)


def test_array_level_forward_backward_accumulate_and_shards():
    hidden, weight, bias, labels = problem(n=9, h=6, v=23)
    x, w, b, y = hidden.numpy(), weight.numpy(), bias.numpy(), labels.numpy()
    g = np.linspace(-1, 1, 9).astype(np.float32)
    gh = np.linspace(0.5, -0.5, 9).astype(np.float32)
    lp, ent, lse = linear.forward(x, w, y, 0.9, bias=b, chunk_size=4)
    dh, dw, db = linear.backward(x, w, y, lse, g, 0.9, bias=b, entropy=ent, grad_entropy=gh, chunk_size=3)
    both = linear.forward_backward(x, w, y, g, 0.9, bias=b, grad_entropy=gh, chunk_size=2)
    np.testing.assert_allclose(both["logprobs"], lp, rtol=1e-5, atol=1e-6)
    for a, c in [(both["d_hidden"], dh), (both["d_weight"], dw), (both["d_bias"], db)]:
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
    # Accumulate adds onto what is there.
    acc = np.full_like(dw, 0.5)
    linear.backward(x, w, y, lse, g, 0.9, bias=b, entropy=ent, grad_entropy=gh, d_weight=acc, accumulate=True)
    np.testing.assert_allclose(acc, dw + 0.5, rtol=1e-5, atol=1e-6)
    # Two vocabulary shards: statistics, finished by the logits path, then the backward.
    parts = [(0, 10), (10, 23)]
    stats = np.stack([
        linear.shard_stats(x, w[a:e], y, 0.9, vocab_start=a, bias=b[a:e], chunk_size=4) for a, e in parts
    ])
    lp_s, ent_s, lse_s = calibrl.logits_shard_finish(stats, y)
    np.testing.assert_allclose(lp_s, lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_s, ent, rtol=1e-5, atol=1e-5)
    dh_sum = 0
    for a, e in parts:
        dh_k, dw_k, db_k = linear.backward(x, w[a:e], y, lse_s, g, 0.9, bias=b[a:e], entropy=ent_s,
                                           grad_entropy=gh, vocab_start=a)
        dh_sum = dh_sum + dh_k
        np.testing.assert_allclose(dw_k, dw[a:e], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(db_k, db[a:e], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dh_sum, dh, rtol=1e-4, atol=1e-6)


def test_bad_input_raises_named_errors_and_writes_nothing():
    hidden, weight, _, labels = problem(n=5, h=4, v=7, bias=False)
    x, w, y = hidden.numpy(), weight.numpy(), labels.numpy()
    lp = np.full(5, -7.0, np.float32)
    with pytest.raises(calibrl.BufferTooSmallError, match="`workspace`"):
        linear.forward(x, w, y, chunk_size=4, workspace=np.zeros(4 * 7 * 4 - 4, np.uint8), logprobs=lp)
    assert (lp == -7.0).all()
    with pytest.raises(calibrl.ShapeError, match="`weight`"):
        linear.forward(x, w[:, :3], y, logprobs=lp)
    with pytest.raises(calibrl.InvalidArgumentError, match="`chunk_size`"):
        linear.workspace_size(x, w, 0)
    assert linear.workspace_size(x, w, 3) == 3 * 7 * 4
    assert (lp == -7.0).all()


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="needs torch >= 2.4")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    hidden, weight, bias, labels = problem()

    def objective(hid, w, b, y):
        lp, ent = calibrl.fused_linear_logprobs(hid, w, y, bias=b, temperature=0.9, chunk_size=4)
        return (lp * torch.arange(lp.numel())).sum() + 0.1 * ent.sum()

    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    eager = objective(*args, labels)
    grads_e = torch.autograd.grad(eager, args)
    compiled = torch.compile(objective, fullgraph=True, backend=backend)
    args_c = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = compiled(*args_c, labels)
    grads_c = torch.autograd.grad(out, args_c)
    torch.testing.assert_close(out, eager)
    for a, c in zip(grads_c, grads_e):
        torch.testing.assert_close(a, c)
    assert grads_e[1].abs().sum() > 0
    torch._dynamo.reset()
    assert torch._dynamo.explain(objective)(*args, labels).graph_break_count == 0


def _tp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        hidden, weight, bias, labels = problem(n=11, h=9, v=30, dtype=torch.bfloat16)
        v_local = weight.shape[0] // world
        rows = slice(rank * v_local, (rank + 1) * v_local)
        hid = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        b = bias[rows].clone().requires_grad_()
        lp, ent = calibrl.vocab_parallel_fused_linear_logprobs(hid, w, labels, bias_shard=b, temperature=0.8,
                                                               chunk_size=3)
        ((lp * torch.linspace(-1, 1, lp.numel())).sum() + 0.2 * ent.sum()).backward()
        torch.save({"lp": lp.detach(), "ent": ent.detach(), "hidden": hid.grad, "weight": w.grad, "bias": b.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vocabulary_shards_over_two_gloo_ranks(tmp_path):
    """TP = 2 over gloo: every rank gets the full-vocabulary ℓ and H; the summed d_hidden and
    the concatenated d_weight/d_bias equal the single-process fused path's."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    hidden, weight, bias, labels = problem(n=11, h=9, v=30, dtype=torch.bfloat16)
    hid, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = calibrl.fused_linear_logprobs(hid, w, labels, bias=b, temperature=0.8, chunk_size=5)
    ((lp * torch.linspace(-1, 1, lp.numel())).sum() + 0.2 * ent.sum()).backward()
    for r in ranks:
        torch.testing.assert_close(r["lp"], lp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["ent"], ent.detach(), rtol=1e-5, atol=1e-5)
        # bf16 gradients: one rounding of a float32 sum on each side.
        torch.testing.assert_close(r["hidden"].float(), hid.grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.cat([r["weight"] for r in ranks]).float(), w.grad.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(torch.cat([r["bias"] for r in ranks]).float(), b.grad.float(), rtol=1e-2, atol=1e-3)
    assert w.grad.abs().sum() > 0
