"""CUDA end to end through the Python binding (skipped without a GPU): the loss and the fused
logits path on CUDA tensors against PyTorch autograd of the float64 SPEC.md implementation in
spec_reference.py; calls on a non-default PyTorch stream; CUDA graph capture and replay."""

import dataclasses

import pytest
import torch

import calibrl
import spec_reference as ref
from conftest import needs_cuda, needs_loss
from test_loss import CONFIGS, METRICS_CHECKED, batch, inputs_of, reference

pytestmark = [needs_cuda, needs_loss]
F64 = torch.float64


def cuda_inputs(b, **kw):
    return inputs_of(b, **kw).map_tensors(lambda t: torch.as_tensor(t).cuda())


def assert_metrics(res, parts):
    for k in METRICS_CHECKED:
        assert res.metrics[k] == pytest.approx(parts[k], abs=1e-10, rel=1e-9), k


@pytest.mark.parametrize("preset, overrides", CONFIGS, ids=[f"{p}-{o}" for p, o in CONFIGS])
def test_cuda_loss_matches_float64_autograd(preset, overrides):
    cfg = calibrl.Config(preset, **overrides)
    b = batch(seed=3)
    parts, g_lp, _ = reference(cfg, b)
    res = calibrl.loss(cfg, b["lp"].cuda(), cuda_inputs(b))
    assert res.grad_logprobs.is_cuda
    assert_metrics(res, parts)
    torch.testing.assert_close(res.grad_logprobs.cpu(), g_lp, atol=1e-12, rtol=1e-9)
    # The metrics tensor on the device holds the same numbers as the host struct.
    assert res.metrics_tensor.is_cuda
    assert res.metrics_tensor.cpu()[0].item() == pytest.approx(res.metrics["loss"], rel=1e-12, abs=1e-15)


def entropy_control_batch(dtype, packed):
    """Rollouts whose covariances mostly tie: advantages from two values (0.1 is not a binary
    fraction, so A − mean A keeps a rounding residue that only the same summation order gives)
    and log-probs from six values; padded [64, 40] or packed (the same tokens)."""
    g = torch.Generator().manual_seed(11)
    B, S = 64, 40
    lp = (-torch.randint(1, 7, (B, S), generator=g).to(F64) / 3.0).to(dtype)
    old = (lp.to(F64) + 0.1 * (torch.randint(0, 5, (B, S), generator=g) - 2)).to(dtype)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lengths[:, None]).to(F64)
    adv = torch.where(torch.arange(B) % 3 == 0, -0.7, 0.1).to(F64)
    inputs = calibrl.LossInputs(advantages=adv, weights=adv.abs(), signs=torch.sign(adv), mask=mask,
                                old_logprobs=old)
    if packed:
        keep = mask.bool()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        inputs = dataclasses.replace(inputs, mask=None, old_logprobs=old[keep], seq_offsets=offsets)
        lp = lp[keep]
    return lp, inputs


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [
    {"entropy_control": "clip_cov", "clip_cov_ratio": 0.1, "clip_cov_lb": -0.5, "clip_cov_ub": 0.5, "cov_seed": 5},
    {"entropy_control": "kl_cov", "kl_cov_ratio": 0.1},
    {"entropy_control": "kl_cov", "kl_cov_ratio": 0.05, "cov_adv_mean": 0.0, "cov_logprob_mean": -1.0,
     "cov_token_count": 5000.0},
])
def test_cuda_entropy_control_selects_the_cpu_tokens(overrides, dtype, packed):
    """Clip-Cov / KL-Cov on CUDA select the CPU backend's tokens (SPEC §4.6): a token selected on
    one backend only would move its gradient by its whole policy-gradient term or by β/N_tok."""
    cfg = calibrl.Config("grpo", **overrides)
    lp, inputs = entropy_control_batch(dtype, packed)
    cpu = calibrl.loss(cfg, lp, inputs)
    gpu = calibrl.loss(cfg, lp.cuda(), inputs.map_tensors(lambda t: torch.as_tensor(t).cuda()))
    assert cpu.metrics["cov_selected_frac"] > 0
    assert gpu.metrics["cov_selected_frac"] == cpu.metrics["cov_selected_frac"]
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(gpu.grad_logprobs.cpu().to(F64), cpu.grad_logprobs.to(F64), atol=1e-9, rtol=rtol)
    again = calibrl.loss(cfg, lp.cuda(), inputs.map_tensors(lambda t: torch.as_tensor(t).cuda()))
    assert torch.equal(again.grad_logprobs, gpu.grad_logprobs)


@pytest.mark.parametrize("kind", ["luffy", "rlplus"])
def test_cuda_off_policy_kinds_with_entropy_and_kl(kind):
    cfg = calibrl.Config("paper", loss=kind, entropy_coef=0.01, kl_coef=0.05, kl_kind="k3")
    b = batch(seed=4)
    is_expert = torch.tensor([False, False, True, False, False, True])
    # LUFFY / RL-PLUS train the expert rows and take no exploration baseline.
    parts, g_lp, g_ent = reference(cfg, b, ref_lp=True, with_entropy=True, is_expert=is_expert, experts=False)
    inputs = cuda_inputs(b, ref_lp=True, is_expert=is_expert, experts=False)
    res = calibrl.loss(cfg, b["lp"].cuda(), inputs, entropy=b["ent"].cuda())
    assert_metrics(res, parts)
    torch.testing.assert_close(res.grad_logprobs.cpu(), g_lp, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(res.grad_entropy.cpu(), g_ent, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_cuda_fused_logits_loss_matches_float64_autograd(dtype, preset):
    """Loss and ∂L/∂logits of the fused path (entropy bonus on, temperature 0.8) against
    autograd through log-softmax, entropy and the SPEC loss in float64."""
    cfg = calibrl.Config(preset, entropy_coef=0.01)
    b = batch(seed=5)
    B, S = b["lp"].shape
    V, T = 1003, 0.8
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(B * S, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B * S,), generator=g)
    # Reference: the same logits (as rounded to `dtype`) in float64.
    z64 = z.to(F64).requires_grad_()
    lp64, ent64, _ = ref.logits_outputs(z64, labels, T)
    total, parts = ref.loss(cfg.to_dict(), lp64.view(B, S), b["mask"], b["adv"], b["w"], b["c"], old=b["old"],
                            ent=ent64.view(B, S), expert_lp=b["expert_lp"], expert_mask=b["expert_mask"],
                            expert_index=b["expert_index"])
    total.backward()
    zc = z.cuda().requires_grad_()
    loss, metrics = calibrl.fused_logits_calibrl_loss(zc, labels.cuda(), cuda_inputs(b), cfg, token_shape=(B, S),
                                                      temperature=T, inplace=False)
    loss.backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    assert loss.item() == pytest.approx(total.item(), **{"abs": tol["atol"], "rel": tol["rtol"]})
    torch.testing.assert_close(zc.grad.float().cpu(), z64.grad.float(), **tol)


def test_non_default_stream_gives_the_same_bits():
    cfg = calibrl.Config("paper")
    b = batch(seed=8)
    lp, inputs = b["lp"].cuda(), cuda_inputs(b)
    base = calibrl.loss(cfg, lp, inputs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        other = calibrl.loss(cfg, lp, inputs, host_metrics=False)
        z = torch.randn(64, 5000, device="cuda", dtype=torch.bfloat16)
        y = torch.randint(0, 5000, (64,), device="cuda")
        lp1, ent1, lse1 = calibrl.logits_forward(z, y, 1.0)
    s.synchronize()
    lp0, ent0, lse0 = calibrl.logits_forward(z, y, 1.0)
    torch.cuda.synchronize()
    assert torch.equal(base.grad_logprobs, other.grad_logprobs)
    assert torch.equal(base.metrics_tensor, other.metrics_tensor)
    assert torch.equal(lp0, lp1) and torch.equal(ent0, ent1) and torch.equal(lse0, lse1)


def test_cuda_graph_capture_and_replay():
    """Forward, loss and backward captured in one CUDA graph; replays on new inputs written into
    the static buffers equal eager calls on those inputs."""
    cfg = calibrl.Config("paper", entropy_coef=0.01)
    b = batch(seed=9)
    B, S = b["lp"].shape
    N, V = B * S, 777
    dev = "cuda"
    z = torch.randn(N, V, device=dev)
    labels = torch.randint(0, V, (N,), device=dev)
    inputs = cuda_inputs(b)
    lp = torch.empty(N, device=dev)
    ent, lse = torch.empty_like(lp), torch.empty_like(lp)
    g_lp, g_ent = torch.empty(B, S, device=dev), torch.empty(B, S, device=dev)
    metrics = torch.empty(15, device=dev, dtype=F64)
    dz = torch.empty_like(z)

    def step():
        calibrl.logits_forward(z, labels, 1.0, logprobs=lp, entropy=ent, lse=lse)
        calibrl.loss(cfg, lp.view(B, S), inputs, entropy=ent.view(B, S), grad_logprobs=g_lp, grad_entropy=g_ent,
                     metrics=metrics, host_metrics=False)
        calibrl.logits_backward(z, labels, lse, g_lp.view(N), 1.0, entropy=ent, grad_entropy=g_ent.view(N), out=dz)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture: compiles the kernels, allocates the stream's workspace
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        step()
    for seed in range(3):
        torch.manual_seed(seed)
        z.copy_(torch.randn(N, V, device=dev))
        graph.replay()
        torch.cuda.synchronize()
        replayed = (dz.clone(), metrics.clone(), lp.clone())
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed[0], dz) and torch.equal(replayed[1], metrics) and torch.equal(replayed[2], lp)
        assert torch.isfinite(dz).all()
