"""torch.compile(fullgraph=True) captures the loss and the fused logits path (custom ops,
calibrl.custom_ops) without graph breaks, and gives the eager autograd path's loss, metrics and
gradients."""

import pytest

torch = pytest.importorskip("torch")
if not hasattr(torch.library, "custom_op"):  # pragma: no cover
    pytest.skip("torch.library.custom_op needs torch >= 2.4", allow_module_level=True)

import calibrl  # noqa: E402
from calibrl.custom_ops import CompiledCalibRLLoss, CompiledFusedLogitsCalibRL  # noqa: E402

CONFIG = {"preset": "grpo", "entropy_coef": 0.01}
B, S, V = 4, 5, 11


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv, w, c = calibrl.group_advantages(rewards, torch.tensor([0, 0, 1, 1]), 2, config=calibrl.Config(**CONFIG))
    mask = (torch.rand(B, S, generator=g) > 0.2).to(dtype)
    mask[:, 0] = 1
    old = -torch.rand(B, S, generator=g, dtype=dtype)
    inputs = calibrl.LossInputs(advantages=adv.to(dtype), weights=w.to(dtype), signs=c.to(dtype), mask=mask, old_logprobs=old)
    return inputs, g


def eager_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_loss_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    inputs, g = batch()
    lp = (-torch.rand(B, S, generator=g) - 0.1).requires_grad_()
    ent = torch.rand(B, S, generator=g).requires_grad_()
    loss_e, metrics_e = calibrl.calibrl_loss(lp, inputs, CONFIG, entropy=ent)
    gl_e, gh_e = torch.autograd.grad(loss_e, (lp, ent))

    module = CompiledCalibRLLoss(CONFIG)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    loss_c, metrics_c = compiled(lp, inputs, ent)
    gl_c, gh_c = torch.autograd.grad(loss_c, (lp, ent))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gl_c, gl_e, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gh_c, gh_e, rtol=1e-6, atol=1e-8)
    got = calibrl.metrics_dict(metrics_c)
    for k, v in metrics_e.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert loss_e.item() != 0.0 and gh_e.abs().sum() > 0
    torch._dynamo.reset()
    assert eager_breaks(module, lp, inputs, ent) == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_logits_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    inputs, g = batch()
    logits0 = torch.randn(B * S, V, generator=g)
    labels = torch.randint(0, V, (B * S,), generator=g)
    labels[3] = -1  # an ignored row

    x = logits0.clone().requires_grad_()
    loss_e, metrics_e = calibrl.fused_logits_calibrl_loss(x * 1.0, labels, inputs, CONFIG, inplace=False)
    (grad_e,) = torch.autograd.grad(loss_e, x)

    module = CompiledFusedLogitsCalibRL(CONFIG)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    y = logits0.clone().requires_grad_()
    loss_c, metrics_c = compiled(y * 1.0, labels, inputs)
    (grad_c,) = torch.autograd.grad(loss_c, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-8)
    got = calibrl.metrics_dict(metrics_c)
    for k, v in metrics_e.items():
        if k != "mean_token_entropy":
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert grad_e.abs().sum() > 0
    torch._dynamo.reset()
    assert eager_breaks(module, y * 1.0, labels, inputs) == 0
