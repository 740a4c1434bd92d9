"""Group advantages (SPEC §3) and the loss (SPEC §4) through the bindings, NumPy and PyTorch-CPU,
against the float64 autograd implementation in spec_reference.py."""

import dataclasses

import numpy as np
import pytest
import torch

import calibrl
import spec_reference as ref
from conftest import needs_loss

pytestmark = needs_loss
F64 = torch.float64


# ------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("rewards", [[0, 1, 1, 1], [1, 0, 0, 0]])
def test_paper_worked_example(rewards):
    a, w, c = calibrl.group_advantages(np.array(rewards, np.float32), np.zeros(4, np.int64))
    np.testing.assert_allclose(w, [0.75, 0.25, 0.25, 0.25], rtol=1e-6)
    assert a.dtype == np.float32


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_by_std": True}, {"rarity_weighting": False}, {"correct_threshold": 0.5}, {"adv_eps": 1e-3, "norm_by_std": True}],
)
@pytest.mark.parametrize("explicit", [False, True])
def test_group_advantages_match_spec(overrides, explicit):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(11, generator=g, dtype=F64) * 1.4 - 0.2  # format bonus may leave [0,1]
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3])  # group 2 has one rollout
    is_expert = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    correct = (torch.rand(11, generator=g) > 0.5) if explicit else None
    cfg = calibrl.Config(**overrides)
    a, w, c = calibrl.group_advantages(rewards, gid, 4, config=cfg, correct=correct, is_expert=is_expert)
    ea, ew, ec = ref.advantages(cfg.to_dict(), rewards, gid, 4, correct, is_expert)
    assert a.dtype == F64
    torch.testing.assert_close(a, ea, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, ew, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c, ec, atol=0, rtol=0)


def test_group_of_one_rollout_uses_mean_0_std_1():
    a, w, _ = calibrl.group_advantages(torch.tensor([0.7]), torch.tensor([0]), config={"norm_by_std": True})
    torch.testing.assert_close(a, torch.tensor([0.7 / (1 + 1e-6)]))


def test_advantage_errors_write_nothing():
    out = [torch.full((3,), 5.0) for _ in range(3)]
    with pytest.raises(calibrl.NonFiniteError, match="`rewards`"):
        calibrl.group_advantages(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([0, 0, 0]),
                                 advantages=out[0], weights=out[1], signs=out[2])
    with pytest.raises(calibrl.InvalidArgumentError, match="`group_ids`"):
        calibrl.group_advantages(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 3]), 2,
                                 advantages=out[0], weights=out[1], signs=out[2])
    with pytest.raises(calibrl.ShapeError, match="`group_ids`"):
        calibrl.group_advantages(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0]), 1,
                                 advantages=out[0], weights=out[1], signs=out[2])
    for t in out:
        assert torch.all(t == 5.0)


# ------------------------------------------------------------------------------ the loss


def batch(seed=0, B=6, S=5, P=2, Sx=6, experts=True):
    """A padded batch: two groups of three rollouts, varied lengths, behaviour/reference
    log-probs off the current ones (so clipping and dual clip happen), one row without expert."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g, dtype=F64) * 2 - 0.05
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])[:B]
    mask = (torch.arange(S)[None] < lengths[:, None]).to(F64)
    old = lp + torch.randn(B, S, generator=g, dtype=F64) * 0.4
    refl = lp + torch.randn(B, S, generator=g, dtype=F64) * 0.3
    ent = torch.rand(B, S, generator=g, dtype=F64) * 2
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])[:B]
    gid = torch.tensor([0, 0, 0, 1, 1, 1])[:B]
    a, w, c = ref.advantages(calibrl.Config().to_dict(), rewards, gid, 2)
    out = dict(lp=lp, mask=mask, old=old, ref=refl, ent=ent, adv=a, w=w, c=c)
    if experts:
        out["expert_lp"] = -torch.rand(P, Sx, generator=g, dtype=F64) * 1.5
        out["expert_mask"] = (torch.arange(Sx)[None] < torch.tensor([6, 4])[:, None]).to(F64)
        out["expert_index"] = torch.tensor([0, 0, 0, 1, 1, -1])[:B]
    return out


def inputs_of(b, *, old=True, ref_lp=False, is_expert=None, normalizers=None, experts=True):
    return calibrl.LossInputs(
        advantages=b["adv"], weights=b["w"], signs=b["c"], mask=b["mask"],
        old_logprobs=b["old"] if old else None,
        ref_logprobs=b["ref"] if ref_lp else None,
        is_expert=is_expert,
        expert_logprobs=b.get("expert_lp") if experts else None,
        expert_mask=b.get("expert_mask") if experts else None,
        expert_index=b.get("expert_index") if experts else None,
        normalizers=normalizers,
    )


def reference(cfg, b, *, old=True, ref_lp=False, with_entropy=False, is_expert=None, normalizers=None, experts=True):
    lp = b["lp"].clone().requires_grad_()
    ent = b["ent"].clone().requires_grad_() if with_entropy else None
    total, parts = ref.loss(
        cfg.to_dict(), lp, b["mask"], b["adv"], b["w"], b["c"],
        old=b["old"] if old else None, ref=b["ref"] if ref_lp else None, ent=ent, is_expert=is_expert,
        expert_lp=b.get("expert_lp") if experts else None,
        expert_mask=b.get("expert_mask") if experts else None,
        expert_index=b.get("expert_index") if experts else None,
        normalizers=normalizers,
    )
    total.backward()
    return parts, lp.grad, (ent.grad if ent is not None else None)


METRICS_CHECKED = ["loss", "pg_loss", "explore_loss", "entropy_loss", "kl_loss", "clipfrac",
                   "clipfrac_lower", "ppo_kl", "mean_delta", "num_tokens", "num_seqs", "cov_selected_frac"]


def check(res, parts, g_lp, g_ent=None):
    for k in METRICS_CHECKED:
        assert res.metrics[k] == pytest.approx(parts[k], abs=1e-10, rel=1e-9), k
    torch.testing.assert_close(torch.as_tensor(res.grad_logprobs), g_lp, atol=1e-12, rtol=1e-9)
    if g_ent is not None:
        torch.testing.assert_close(torch.as_tensor(res.grad_entropy), g_ent, atol=1e-12, rtol=1e-9)


CONFIGS = [
    ("paper", {}),
    ("reference", {}),
    ("grpo", {}),
    ("paper", {"activation": "relu"}),
    ("paper", {"activation": "tanh"}),
    ("paper", {"activation": "sigmoid"}),
    ("paper", {"activation": "huber"}),
    ("reference", {"activation": "tanh"}),
    ("paper", {"alpha": 0.3, "lambda": 0.5}),
    ("paper", {"alpha": 0.8, "lambda": 0.01}),
    ("paper", {"length_normalize": True}),
    ("paper", {"clip_high": 0.28}),
    ("paper", {"dual_clip": 1.0}),
    ("paper", {"agg": "seq-mean-token-sum"}),
    ("paper", {"agg": "seq-mean-token-mean"}),
    ("paper", {"agg": "seq-mean-token-sum-norm", "t_norm": 7.0}),
    ("reference", {"agg": "seq-mean-token-mean"}),
    ("reference", {"agg": "seq-mean-token-sum"}),
    ("paper", {"agg": "token-sum", "length_normalize": True}),
    ("reference", {"agg": "token-sum"}),
    ("paper", {"entropy_control": "clip_cov", "clip_cov_ratio": 0.2, "clip_cov_lb": -0.5, "clip_cov_ub": 0.5}),
    ("grpo", {"entropy_control": "clip_cov", "clip_cov_ratio": 0.5, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0,
              "cov_seed": 9}),
    ("paper", {"entropy_control": "kl_cov", "kl_cov_ratio": 0.2}),
    ("reference", {"entropy_control": "kl_cov", "kl_cov_ratio": 0.3, "kl_cov_coef": 0.5,
                   "cov_adv_mean": 0.1, "cov_logprob_mean": -1.0, "cov_token_count": 40.0}),
]


@pytest.mark.parametrize("preset, overrides", CONFIGS, ids=[f"{p}-{o}" for p, o in CONFIGS])
def test_loss_matches_spec(preset, overrides):
    cfg = calibrl.Config(preset, **overrides)
    b = batch(1)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b))
    assert res.grad_logprobs.dtype == F64 and res.grad_entropy is None
    check(res, *reference(cfg, b)[:2])
    assert res.loss == res.metrics["loss"]
    # masked tokens get no gradient
    assert torch.all(res.grad_logprobs[b["mask"] == 0] == 0)


TOKEN_WEIGHT_CONFIGS = [
    ("paper", {}),
    ("grpo", {"agg": "seq-mean-token-mean"}),
    ("reference", {"agg": "seq-mean-token-sum"}),
    ("paper", {"loss": "luffy"}),
]


@pytest.mark.parametrize("preset, overrides", TOKEN_WEIGHT_CONFIGS, ids=[f"{p}-{o}" for p, o in TOKEN_WEIGHT_CONFIGS])
def test_token_weights_match_spec(preset, overrides):
    """token_weights ρ multiplies each token's policy-gradient term (verl's rollout_is_weights)."""
    cfg = calibrl.Config(preset, **overrides)
    b = batch(21)
    g = torch.Generator().manual_seed(5)
    rho = torch.rand(b["mask"].shape, generator=g, dtype=F64) * 2
    luffy = overrides.get("loss") == "luffy"  # trains an expert row; no expert baseline
    is_expert = torch.tensor([False, False, True, False, False, False]) if luffy else None
    inputs = inputs_of(b, is_expert=is_expert, experts=not luffy)
    inputs.token_weights = rho
    res = calibrl.loss(cfg, b["lp"], inputs)
    lp = b["lp"].clone().requires_grad_()
    total, parts = ref.loss(cfg.to_dict(), lp, b["mask"], b["adv"], b["w"], b["c"], old=b["old"],
                            is_expert=is_expert, expert_lp=None if luffy else b["expert_lp"],
                            expert_mask=None if luffy else b["expert_mask"],
                            expert_index=None if luffy else b["expert_index"], token_weights=rho)
    total.backward()
    check(res, parts, lp.grad)
    # the weights matter, and all-ones weights are the unweighted loss
    unweighted = calibrl.loss(cfg, b["lp"], inputs_of(b, is_expert=is_expert, experts=not luffy))
    assert abs(unweighted.metrics["pg_loss"] - res.metrics["pg_loss"]) > 1e-6
    inputs.token_weights = torch.ones_like(rho)
    ones = calibrl.loss(cfg, b["lp"], inputs)
    assert ones.metrics["loss"] == unweighted.metrics["loss"]
    torch.testing.assert_close(ones.grad_logprobs, unweighted.grad_logprobs, rtol=0, atol=0)


def test_token_weights_gradient_by_finite_differences():
    cfg = calibrl.Config("paper", clip_high=0.28)
    b = batch(22)
    rho = torch.rand(b["mask"].shape, generator=torch.Generator().manual_seed(6), dtype=F64) * 1.5
    inputs = inputs_of(b)
    inputs.token_weights = rho
    res = calibrl.loss(cfg, b["lp"], inputs)
    h = 1e-6
    for i, j in [(0, 0), (0, 4), (2, 1), (4, 3), (5, 1)]:
        plus, minus = b["lp"].clone(), b["lp"].clone()
        plus[i, j] += h
        minus[i, j] -= h
        fd = (calibrl.loss(cfg, plus, inputs).loss - calibrl.loss(cfg, minus, inputs).loss) / (2 * h)
        assert res.grad_logprobs[i, j].item() == pytest.approx(fd, abs=1e-7, rel=1e-5), (i, j)


def test_on_policy_without_old_logprobs():
    cfg = calibrl.Config()
    b = batch(2)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b, old=False))
    parts, g, _ = reference(cfg, b, old=False)
    check(res, parts, g)
    assert res.metrics["clipfrac"] == 0


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "mse", "low_var_kl"])
def test_kl_kinds(kind):
    cfg = calibrl.Config(kl_coef=0.1, kl_kind=kind)
    b = batch(3)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b, ref_lp=True))
    check(res, *reference(cfg, b, ref_lp=True)[:2])
    assert res.metrics["kl_loss"] != 0


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_entropy_bonus_and_its_gradient(preset):
    cfg = calibrl.Config(preset, entropy_coef=0.05)
    b = batch(4)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b), entropy=b["ent"])
    check(res, *reference(cfg, b, with_entropy=True))
    assert res.grad_entropy is not None and res.grad_entropy.abs().sum() > 0


def test_ref_policy_baseline():
    for normalize in (False, True):
        cfg = calibrl.Config(baseline="ref_policy", length_normalize=normalize)
        b = batch(5)
        res = calibrl.loss(cfg, b["lp"], inputs_of(b, ref_lp=True, experts=False))
        check(res, *reference(cfg, b, ref_lp=True, experts=False)[:2])


@pytest.mark.parametrize("kind", ["luffy", "rlplus"])
def test_luffy_and_rlplus_train_the_expert_rows(kind):
    cfg = calibrl.Config(loss=kind)
    b = batch(6, experts=False)
    is_expert = torch.tensor([0, 0, 1, 0, 0, 1], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    b["adv"], b["w"], b["c"] = calibrl.group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), 2,
                                                        is_expert=is_expert, config=cfg)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b, is_expert=is_expert, experts=False))
    parts, g, _ = reference(cfg, b, is_expert=is_expert, experts=False)
    check(res, parts, g)
    assert torch.all(res.grad_logprobs[2][b["mask"][2] > 0] != 0)  # the expert row is trained


def test_calibrl_masks_expert_rows_of_the_authors_layout():
    cfg = calibrl.Config()
    b = batch(7)
    is_expert = torch.tensor([0, 0, 0, 0, 0, 1], dtype=torch.bool)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b, is_expert=is_expert))
    check(res, *reference(cfg, b, is_expert=is_expert)[:2])
    assert torch.all(res.grad_logprobs[5] == 0) and res.metrics["num_seqs"] == 5


def pack(b):
    """The padded batch as packed [T] + offsets (masked tail tokens dropped)."""
    lengths = b["mask"].sum(1).long()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    keep = b["mask"] > 0
    return offsets, {k: b[k][keep] for k in ("lp", "old", "ref", "ent")}


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_packed_layout_equals_padded(preset):
    cfg = calibrl.Config(preset, entropy_coef=0.01)
    b = batch(8)
    padded = calibrl.loss(cfg, b["lp"], inputs_of(b), entropy=b["ent"])
    offsets, p = pack(b)
    e_lengths = b["expert_mask"].sum(1).long()
    e_offsets = torch.cat([torch.zeros(1, dtype=torch.long), e_lengths.cumsum(0)])
    packed = calibrl.loss(
        cfg, p["lp"], entropy=p["ent"], advantages=b["adv"], weights=b["w"], signs=b["c"],
        seq_offsets=offsets.int(), old_logprobs=p["old"],
        expert_logprobs=b["expert_lp"][b["expert_mask"] > 0], expert_offsets=e_offsets,
        expert_index=b["expert_index"].int(),
    )
    for k in METRICS_CHECKED:
        assert packed.metrics[k] == pytest.approx(padded.metrics[k], abs=1e-12, rel=1e-10), k
    keep = b["mask"] > 0
    torch.testing.assert_close(packed.grad_logprobs, padded.grad_logprobs[keep], atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(packed.grad_entropy, padded.grad_entropy[keep], atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_slices_with_global_normalizers_add_up(agg, preset):
    cfg = calibrl.Config(preset, agg=agg, kl_coef=0.02)
    b = batch(9)
    whole = calibrl.loss(cfg, b["lp"], inputs_of(b, ref_lp=True))
    norm = (b["mask"].sum().item(), 6.0)
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: (v[rows] if k not in ("expert_lp", "expert_mask") else v) for k, v in b.items()}
        r = calibrl.loss(cfg, part["lp"], inputs_of(part, ref_lp=True, normalizers=norm))
        total += r.loss
        grads.append(r.grad_logprobs)
    assert total == pytest.approx(whole.loss, abs=1e-12, rel=1e-10)
    torch.testing.assert_close(torch.cat(grads), whole.grad_logprobs, atol=1e-14, rtol=1e-10)


def test_numpy_path_equals_torch_path():
    cfg = calibrl.Config("reference", kl_coef=0.1)
    b = batch(10)
    t = calibrl.loss(cfg, b["lp"], inputs_of(b, ref_lp=True))
    nb = {k: v.numpy() for k, v in b.items()}
    nb["lp"] = nb["lp"].astype(np.float32)  # mixed float dtypes are accepted on the CPU
    n = calibrl.loss(cfg, nb["lp"], inputs_of(nb, ref_lp=True))
    assert isinstance(n.grad_logprobs, np.ndarray) and n.grad_logprobs.dtype == np.float32
    assert n.metrics["loss"] == pytest.approx(t.metrics["loss"], rel=1e-5)
    np.testing.assert_allclose(n.grad_logprobs, t.grad_logprobs.numpy(), rtol=1e-4, atol=1e-7)
    assert isinstance(n.metrics_tensor, np.ndarray)
    assert n.metrics == calibrl.metrics_dict(n.metrics_tensor)


# ------------------------------------------------------------------------------ autograd


def test_autograd_module_from_logprobs():
    cfg = calibrl.Config(entropy_coef=0.02)
    b = batch(11)
    lp = b["lp"].float().requires_grad_()
    ent = b["ent"].float().requires_grad_()
    module = calibrl.CalibRLLoss(cfg)
    loss, metrics = module(lp, inputs_of(b), entropy=ent)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    (3.0 * loss).backward()
    parts, g, h = reference(cfg, b, with_entropy=True)
    assert loss.item() == pytest.approx(parts["loss"], rel=1e-5)
    assert metrics["explore_loss"] == pytest.approx(parts["explore_loss"], rel=1e-5)
    torch.testing.assert_close(lp.grad.double(), 3.0 * g, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ent.grad.double(), 3.0 * h, atol=1e-6, rtol=1e-4)


def test_autograd_through_a_model():
    """ℓ from a tiny model: the library's ∂L/∂ℓ flows into the parameters like autograd's."""
    cfg = calibrl.Config()
    b = batch(12)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1).double()
    x = torch.randn(6, 5, 4, dtype=F64)
    lp = torch.nn.functional.logsigmoid(layer(x)[..., 0])
    loss, _ = calibrl.calibrl_loss(lp, inputs_of(b), cfg)
    loss.backward()
    got = layer.weight.grad.clone()
    layer.zero_grad()
    lp = torch.nn.functional.logsigmoid(layer(x)[..., 0])
    total, _ = ref.loss(cfg.to_dict(), lp, b["mask"], b["adv"], b["w"], b["c"], old=b["old"],
                        expert_lp=b["expert_lp"], expert_mask=b["expert_mask"], expert_index=b["expert_index"])
    total.backward()
    torch.testing.assert_close(got, layer.weight.grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset, temperature, entropy_coef", [("paper", 1.0, 0.0), ("reference", 0.8, 0.03)])
def test_fused_logits_path(dtype, preset, temperature, entropy_coef):
    cfg = calibrl.Config(preset, entropy_coef=entropy_coef)
    b = batch(13)
    B, S, V = 6, 5, 37
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B * S, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B * S,), generator=g)
    labels[(b["mask"] == 0).reshape(-1)] = -1  # padding: not computed

    # Reference: float64 logits → ℓ, H → SPEC loss, all by autograd.
    z64 = logits.double().requires_grad_()
    lp, ent, _ = ref.logits_outputs(z64, labels, temperature)
    b_old = dict(b, old=lp.detach().view(B, S) + 0.1 * b["old"].sub(b["lp"]))
    total, parts = ref.loss(cfg.to_dict(), lp.view(B, S), b["mask"], b["adv"], b["w"], b["c"],
                            old=b_old["old"], ent=ent.view(B, S),
                            expert_lp=b["expert_lp"], expert_mask=b["expert_mask"], expert_index=b["expert_index"])
    total.backward()

    z = logits.clone().requires_grad_()
    module = calibrl.FusedLogitsCalibRL(cfg, temperature=temperature)
    loss, metrics = module(z, labels, inputs_of(b_old), token_shape=(B, S))
    loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert loss.item() == pytest.approx(parts["loss"], rel=tol, abs=tol)
    assert metrics["entropy_loss"] == pytest.approx(parts["entropy_loss"], rel=tol)
    grad_tol = 2e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=grad_tol, rtol=1e-2)
    # In place: the gradient lives in the logits' own buffer.
    assert z.grad.data_ptr() == z.data_ptr()


def test_fused_logits_not_in_place_keeps_the_logits():
    cfg = calibrl.Config()
    b = batch(14)
    logits = torch.randn(30, 11)
    labels = torch.randint(0, 11, (30,))
    z = logits.clone().requires_grad_()
    loss, _ = calibrl.fused_logits_calibrl_loss(z, labels, inputs_of(b, old=False), cfg, token_shape=(6, 5), inplace=False)
    loss.backward()
    assert torch.equal(z.detach(), logits) and z.grad.data_ptr() != z.data_ptr()


def zloss_model(seed=21):
    """A linear LM head: logits = h @ W over a padded batch, for the z-loss cases."""
    g = torch.Generator().manual_seed(seed)
    B, S, V, D = 6, 5, 11, 4
    h = torch.randn(B * S, D, generator=g)
    w = torch.randn(D, V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B * S,), generator=g)
    return h, w, labels, inputs_of(batch(seed), old=False)


def zloss_grad(order, inplace):
    """dW of fused loss + z-loss 1e-2·Σ logits², the z-loss recorded before or after."""
    h, w, labels, inputs = zloss_model()
    logits = h @ w
    if order == "zloss first":
        z = 1e-2 * (logits ** 2).sum()
        loss, _ = calibrl.fused_logits_calibrl_loss(logits, labels, inputs, token_shape=(6, 5), inplace=inplace)
    else:
        loss, _ = calibrl.fused_logits_calibrl_loss(logits, labels, inputs, token_shape=(6, 5), inplace=inplace)
        z = 1e-2 * (logits ** 2).sum()
    (loss + z).backward()
    return w.grad


def test_in_place_d_logits_over_logits_saved_by_an_earlier_op_raise():
    """The issue's case: a z-loss recorded before the fused loss saved the logits; the in-place
    backward overwrites them. That must fail loudly, not give wrong gradients silently."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        zloss_grad("zloss first", inplace=True)


def test_z_loss_gradients_with_the_fused_loss_are_right_where_allowed():
    """Not in place, the z-loss case is right: dW equals the float64 reference's. In place, the
    normal case (nothing else saved the logits) is unaffected: the same dW."""
    h, w, labels, inputs = zloss_model()
    w64 = w.detach().double().requires_grad_()
    logits = h.double() @ w64
    lp, _, _ = ref.logits_outputs(logits, labels, 1.0)
    b = batch(21)
    total, _ = ref.loss(calibrl.Config().to_dict(), lp.view(6, 5), b["mask"], b["adv"], b["w"], b["c"],
                        expert_lp=b["expert_lp"], expert_mask=b["expert_mask"], expert_index=b["expert_index"])
    (total + 1e-2 * (logits ** 2).sum()).backward()
    for order in ("zloss first", "zloss after"):
        torch.testing.assert_close(zloss_grad(order, inplace=False).double(), w64.grad, atol=1e-5, rtol=1e-5)

    h, w, labels, inputs = zloss_model()
    loss, _ = calibrl.fused_logits_calibrl_loss(h @ w, labels, inputs, token_shape=(6, 5))
    loss.backward()
    in_place = w.grad.clone()
    h, w, labels, inputs = zloss_model()
    loss, _ = calibrl.fused_logits_calibrl_loss(h @ w, labels, inputs, token_shape=(6, 5), inplace=False)
    loss.backward()
    torch.testing.assert_close(in_place, w.grad, atol=0, rtol=0)


def test_wrong_or_missing_token_shape_is_named():
    b = batch(22)
    logits, labels = torch.randn(30, 11), torch.randint(0, 11, (30,))
    for bad in [(4, 6), (30, 1, 1), (31,)]:
        with pytest.raises(ValueError, match=r"`token_shape`: .* does not fit the 30 logits rows"):
            calibrl.fused_logits_calibrl_loss(logits, labels, inputs_of(b), token_shape=bad)
    with pytest.raises(TypeError, match="`token_shape`"):
        calibrl.fused_logits_calibrl_loss(logits, labels, inputs_of(b), token_shape=30)
    no_mask = dataclasses.replace(inputs_of(b), mask=None)
    with pytest.raises(ValueError, match="`token_shape`: not given") as e:
        calibrl.fused_logits_calibrl_loss(logits, labels, no_mask)
    assert "seq_offsets [B+1] for packed" in str(e.value)


def test_token_shape_defaults_to_the_mask_shape():
    b = batch(23)
    logits, labels = torch.randn(30, 11), torch.randint(0, 11, (30,))
    explicit, _ = calibrl.fused_logits_calibrl_loss(logits, labels, inputs_of(b), token_shape=(6, 5), inplace=False)
    implied, _ = calibrl.fused_logits_calibrl_loss(logits, labels, inputs_of(b), inplace=False)
    assert implied.item() == explicit.item()


def test_fused_logits_take_strided_logits_and_list_labels():
    b = batch(24)
    wide = torch.randn(30, 22)
    labels = torch.randint(0, 11, (30,))
    dense = wide[:, ::2].contiguous().requires_grad_()
    loss, _ = calibrl.fused_logits_calibrl_loss(dense, labels, inputs_of(b))
    loss.backward()
    z = wide.clone().requires_grad_()
    loss2, _ = calibrl.fused_logits_calibrl_loss(z[:, ::2], labels.tolist(), inputs_of(b))
    loss2.backward()
    assert loss2.item() == loss.item()
    torch.testing.assert_close(z.grad[:, ::2], dense.grad, atol=0, rtol=0)
    assert torch.all(z.grad[:, 1::2] == 0)


# ------------------------------------------------------------------------------ bad input


def sentinel_outputs(shape):
    return torch.full(shape, 7.0, dtype=F64), torch.full(shape, 7.0, dtype=F64), torch.full((16,), 7.0, dtype=F64)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda b: b.__setitem__("lp", b["lp"].clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"), dtype=F64))),
         calibrl.NonFiniteError, "`logprobs`"),
        (lambda b: b.__setitem__("old", b["old"][:, :4]), calibrl.ShapeError, "`old_logprobs`"),
        (lambda b: b.__setitem__("adv", b["adv"].long()), calibrl.DtypeError, "`advantages`"),
        (lambda b: b.__setitem__("expert_index", torch.tensor([0, 0, 0, 1, 1, 2])), calibrl.InvalidArgumentError, "`expert_index`"),
        (lambda b: b.__setitem__("c", b["c"] * 0.5), calibrl.InvalidArgumentError, "`signs`"),
        (lambda b: b.__setitem__("tw", -torch.ones_like(b["lp"])), calibrl.InvalidArgumentError, "`token_weights`"),
        (lambda b: b.__setitem__("tw", torch.ones(6, 4, dtype=F64)), calibrl.ShapeError, "`token_weights`"),
    ],
    ids=["nan", "shape", "dtype", "expert-slot", "signs", "negative-token-weights", "token-weights-shape"],
)
def test_bad_loss_input_raises_and_writes_nothing(mutate, error, match):
    b = batch(15)
    mutate(b)
    gl, ge, m = sentinel_outputs(b["mask"].shape)
    inputs = inputs_of(b)
    inputs.token_weights = b.get("tw")
    with pytest.raises(error, match=match):
        calibrl.loss(calibrl.Config(), b["lp"], inputs, entropy=b["ent"], grad_logprobs=gl, grad_entropy=ge, metrics=m)
    for t in (gl, ge, m):
        assert torch.all(t == 7.0)


def test_nan_in_autograd_forward_raises():
    b = batch(16)
    lp = b["lp"].clone()
    lp[0, 0] = float("inf")
    with pytest.raises(calibrl.NonFiniteError, match="element 0"):
        calibrl.calibrl_loss(lp.requires_grad_(), inputs_of(b))


def strided(t):
    """The same values in a non-contiguous layout (a column-major copy)."""
    out = t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], 1)[:, 0]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def test_strided_inputs_are_accepted_everywhere():
    """Every input may be strided — log-probs, mask, old log-probs, row tensors, in the array
    API and in autograd alike — and gives the contiguous inputs' result; an output buffer must
    be contiguous (it is written in place)."""
    b = batch(17)
    want = calibrl.loss(calibrl.Config(), b["lp"], inputs_of(b))
    sb = {k: strided(v) if k in ("lp", "mask", "old", "adv", "w", "c") else v for k, v in b.items()}
    got = calibrl.loss(calibrl.Config(), sb["lp"], inputs_of(sb))
    assert got.loss == want.loss
    torch.testing.assert_close(got.grad_logprobs, want.grad_logprobs, atol=0, rtol=0)
    got_np = calibrl.loss(calibrl.Config(), sb["lp"].numpy(), inputs_of(b).map_tensors(lambda t: strided(t).numpy()))
    assert got_np.loss == want.loss

    lp = sb["lp"].clone().t().contiguous().t().requires_grad_()
    loss, _ = calibrl.calibrl_loss(lp, inputs_of(sb))
    loss.backward()
    assert loss.item() == pytest.approx(want.loss, rel=1e-12)
    torch.testing.assert_close(lp.grad, want.grad_logprobs, atol=0, rtol=0)

    out = torch.full((6, 5), 7.0, dtype=F64).t().contiguous().t()
    with pytest.raises(calibrl.LayoutError, match="`grad_logprobs`.*contiguous"):
        calibrl.loss(calibrl.Config(), b["lp"], inputs_of(b), grad_logprobs=out)
    assert torch.all(out == 7.0)


def test_lists_are_accepted_as_inputs():
    """Plain Python lists work wherever arrays do (converted as float32 for float arguments)."""
    rewards, gid = [1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]
    want = calibrl.group_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(gid))
    got = calibrl.group_advantages(rewards, gid)
    for a, w in zip(got, want):
        np.testing.assert_array_equal(a, w.numpy())
    b = batch(18)
    as_lists = inputs_of(b).map_tensors(lambda t: t.float().tolist() if t.is_floating_point() else t.tolist())
    as_f32 = inputs_of(b).map_tensors(lambda t: t.float() if t.is_floating_point() else t)
    lp = b["lp"].float()
    want = calibrl.loss(calibrl.Config(), lp, as_f32)
    assert calibrl.loss(calibrl.Config(), lp.tolist(), as_lists).loss == want.loss
    loss, _ = calibrl.calibrl_loss(lp.clone().requires_grad_(), as_lists)
    assert loss.item() == pytest.approx(want.loss, rel=1e-6)


@pytest.mark.parametrize("overrides", [{"length_normalize": True, "agg": "seq-mean-token-sum"},
                                       {"agg": "token-sum"}])
def test_empty_rollout_adds_nothing(overrides):
    """SPEC §4.5: a rollout without counted tokens adds nothing to any term, also not through φ
    of a length-normalised Δ, and is not counted in N_seq."""
    cfg = calibrl.Config("paper", **overrides)
    b = batch(3)
    b["mask"][1] = 0.0  # row 1 (it has an expert and a weight) counts no token
    res = calibrl.loss(cfg, b["lp"], inputs_of(b))
    check(res, *reference(cfg, b)[:2])
    assert res.metrics["num_seqs"] == 5
    b0 = dict(b, w=b["w"].clone(), adv=b["adv"].clone())
    b0["w"][1] = 0.0
    b0["adv"][1] = 0.0
    res0 = calibrl.loss(cfg, b0["lp"], inputs_of(b0))
    assert b["w"][1] > 0
    assert res.metrics["loss"] == res0.metrics["loss"]
    assert res.metrics["explore_loss"] == res0.metrics["explore_loss"]


def test_all_equal_rewards_give_exact_zeros():
    """SPEC §3: A = 0 exactly for a group whose rewards are all equal."""
    cfg = calibrl.Config("paper", norm_by_std=True)
    rewards = torch.tensor([1.2155] * 8 + [0.0, 1.0], dtype=F64)
    gid = torch.tensor([0] * 8 + [1, 1])
    a, w, _ = calibrl.group_advantages(rewards, gid, 2, config=cfg)
    assert torch.all(a[:8] == 0) and torch.all(w[:8] == 0)
    ra, _, _ = ref.advantages(cfg.to_dict(), rewards, gid, 2)
    torch.testing.assert_close(torch.as_tensor(a), ra, rtol=1e-12, atol=1e-14)


def test_entropy_control_selects_tokens_and_refuses_bad_keys():
    """Clip-Cov zeroes the selected tokens' PG gradient (GRPO: nothing else flows); bad keys are
    refused by name."""
    b = batch(1)
    cfg = calibrl.Config("grpo", entropy_control="clip_cov", clip_cov_ratio=0.5, clip_cov_lb=-1.0,
                         clip_cov_ub=1.0)
    res = calibrl.loss(cfg, b["lp"], inputs_of(b))
    plain = calibrl.loss(calibrl.Config("grpo"), b["lp"], inputs_of(b))
    zeroed = (res.grad_logprobs == 0) & (plain.grad_logprobs != 0)
    assert int(zeroed.sum()) >= 1
    for bad, key in [({"clip_cov_ratio": 0.0}, "clip_cov_ratio"), ({"kl_cov_ratio": 2.0}, "kl_cov_ratio"),
                     ({"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, "clip_cov_lb"),
                     ({"cov_adv_mean": 0.0, "cov_logprob_mean": 0.0}, "cov_token_count")]:
        with pytest.raises(calibrl.CalibrlError, match=key):
            calibrl.Config("paper", **bad)
