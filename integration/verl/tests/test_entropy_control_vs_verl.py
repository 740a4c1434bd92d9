"""Clip-Cov and KL-Cov (SPEC §4.6) against verl 0.9.1's own ``compute_policy_loss_clip_cov`` and
``compute_policy_loss_kl_cov`` (the installed package, float64, CPU): loss and gradient with
respect to the log-probs, on random padded batches and on the all-equal-advantage case.

Two places where verl leaves the choice open, and how the comparison pins them:

- Clip-Cov draws its subset with ``torch.randperm`` (the global torch RNG); the library draws
  it from a seeded hash of the positions, so the two subsets differ in general. Compared
  (a) where the selection is forced: ``clip_cov_ratio = 1`` selects every candidate on both
  sides (this also shows the candidate sets are equal), and (b) given the same selection: the
  library's subset is read off its gradient and ``torch.randperm`` is replaced, for verl's call,
  by a permutation that puts those candidates first.
- KL-Cov takes ``torch.topk``, whose order among equal covariances is unspecified (PyTorch
  documents it as not stable; on CPU it returns arbitrary tied indices). SPEC §4.6 breaks ties
  by position. ``torch.topk`` is replaced, for verl's call, by a stable top-k (descending value,
  then position): on distinct covariances it returns what ``torch.topk`` returns (checked), on
  ties it is the SPEC's order. The wrapper records verl's covariances, so the all-equal case
  can check that verl's covariances do all tie there.

Not compared: verl's metrics other than the Clip-Cov selected fraction (its KL-Cov ``ppo_kl`` is
the mean of |ℓ − ℓold|, the library's ``ppo_kl`` the mean of ℓold − ℓ).
"""

import contextlib

import numpy as np
import pytest
import torch

import calibrl
import verl.workers.config as verl_config
from verl.trainer.ppo import core_algos

F64 = torch.float64


def actor_config(loss_mode: str, **policy_loss) -> verl_config.FSDPActorConfig:
    """verl's actor config with the given policy loss (PPO clip ratios 0.2/0.2, its defaults)."""
    return verl_config.FSDPActorConfig(
        strategy="fsdp",
        policy_loss=verl_config.PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=4,
        use_dynamic_bsz=False,
        rollout_n=1,
    )


def batch(seed: int, rows: int = 12, length: int = 20, equal_adv: float | None = None):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lens[:, None]).astype(np.float64)
    logp = rng.uniform(-4.0, -0.01, size=(rows, length))
    old = logp + rng.normal(0.0, 0.3, size=(rows, length))
    adv = rng.uniform(-2.0, 2.0, size=rows) if equal_adv is None else np.full(rows, equal_adv)
    return logp, old, adv, mask


def verl_call(fn, config, logp, old, adv, mask, agg="token-mean"):
    lp = torch.tensor(logp, dtype=F64, requires_grad=True)
    a = torch.tensor(adv, dtype=F64)[:, None].expand(lp.shape).contiguous()
    loss, metrics = fn(
        old_log_prob=torch.tensor(old, dtype=F64),
        log_prob=lp,
        advantages=a,
        response_mask=torch.tensor(mask, dtype=F64),
        loss_agg_mode=agg,
        config=config,
    )
    loss.backward()
    return float(loss), lp.grad.numpy(), metrics


def library_call(control, logp, old, adv, mask, agg="token-mean", **keys):
    cfg = {"preset": "grpo", "entropy_control": control, "agg": agg, **keys}
    r = calibrl.loss(
        cfg,
        logp,
        mask=mask.astype(np.uint8),
        old_logprobs=old,
        advantages=adv,
        weights=np.abs(adv),
        signs=np.where(adv > 0, 1.0, -1.0),
    )
    return r.loss, np.asarray(r.grad_logprobs), r.metrics


@contextlib.contextmanager
def stable_topk(recorded: list):
    """``torch.topk`` replaced by a stable top-k (descending, ties by position) that records
    its input and checks, where the input has no tie at the cut, that it agrees with torch's."""
    original = torch.topk

    def topk(x, k, largest=True, **kw):
        assert largest and x.dim() == 1 and not kw
        recorded.append(x.clone())
        order = torch.sort(x, descending=True, stable=True).indices[:k]
        if k < x.numel() and x[order[-1]] != x[torch.sort(x, descending=True, stable=True).indices[k]]:
            assert set(original(x, k).indices.tolist()) == set(order.tolist())
        return torch.return_types.topk((x[order], order))

    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = original


def kl_cov(logp, old, adv, mask, agg="token-mean", ratio=0.05, coef=0.1):
    recorded = []
    with stable_topk(recorded):
        want = verl_call(
            core_algos.compute_policy_loss_kl_cov,
            actor_config("kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef),
            logp, old, adv, mask, agg,
        )
    got = library_call("kl_cov", logp, old, adv, mask, agg, kl_cov_ratio=ratio, kl_cov_coef=coef)
    return got, want, recorded


def test_defaults_are_verls():
    verl = verl_config.PolicyLossConfig()
    lib = calibrl.Config("grpo").to_dict()
    assert lib["clip_cov_ratio"] == verl.clip_cov_ratio
    assert lib["clip_cov_lb"] == verl.clip_cov_lb
    assert lib["clip_cov_ub"] == verl.clip_cov_ub
    assert lib["kl_cov_ratio"] == verl.kl_cov_ratio
    assert lib["kl_cov_coef"] == verl.ppo_kl_coef


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", range(8))
def test_kl_cov_equals_verl(seed, agg):
    logp, old, adv, mask = batch(seed)
    (loss, grad, _), (want, want_grad, _), recorded = kl_cov(logp, old, adv, mask, agg)
    # n = ⌊0.05·N⌋ ≥ 3 tokens get β·|ℓ − ℓold|: the selection shows in the loss.
    assert int(0.05 * mask.sum()) >= 3
    assert len(recorded) == 1 and recorded[0].unique().numel() == recorded[0].numel()
    assert loss == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, want_grad * mask, rtol=1e-12, atol=1e-14)
    # The penalty changed the loss (the comparison can see a wrong selection).
    plain, _, _ = library_call("kl_cov", logp, old, adv, mask, agg, kl_cov_ratio=0.05, kl_cov_coef=0.0)
    assert abs(plain - loss) > 1e-4


@pytest.mark.parametrize("a", [0.5, -1.0, 0.25])
def test_kl_cov_all_equal_advantages_ties_by_position(a):
    # 16 rows × 8 tokens, no padding: N = 128, and the mean of 128 equal binary fractions is
    # exact in verl too, so every one of verl's covariances is 0 (a tie, as SPEC §4.6 says).
    logp, old, adv, mask = batch(40, rows=16, length=8, equal_adv=a)
    mask[:] = 1.0
    (loss, grad, _), (want, want_grad, _), recorded = kl_cov(logp, old, adv, mask, ratio=0.05)
    assert torch.all(recorded[0] == 0), "verl's covariances all tie"
    assert loss == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-14)
    # The first n = 6 positions carry the penalty's gradient β·sign(ℓ − ℓold) / N.
    d = np.sign(logp - old).ravel()
    extra = (grad.ravel() - (-a * np.exp(logp - old)).ravel() / 128) * 128 / 0.1
    np.testing.assert_allclose(extra[:6], d[:6], atol=1e-9)
    np.testing.assert_allclose(extra[6:], 0.0, atol=1e-9)


def no_dual_clip_batch():
    # One token, A = −1, ratio e^1.5 = 4.4817 (issue 29): no dual clip under either control.
    logp = np.array([[-0.5]])
    return logp, logp - 1.5, np.array([-1.0]), np.ones((1, 1))


def test_no_dual_clip_under_either_control():
    logp, old, adv, mask = no_dual_clip_batch()
    (loss, _, _), (want, _, _), _ = kl_cov(logp, old, adv, mask)
    assert loss == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx(np.exp(1.5) + 0.1 * 1.5, rel=1e-14)
    got = library_call("clip_cov", logp, old, adv, mask)[0]
    want = verl_call(core_algos.compute_policy_loss_clip_cov, actor_config("clip_cov"), logp, old, adv, mask)[0]
    assert got == pytest.approx(want, rel=1e-14) and want == pytest.approx(np.exp(1.5), rel=1e-14)


def covariances(logp, adv, mask):
    """The test's own view of the covariances (only to keep clear of the bounds: verl's means
    divide by N + 1e-8, the library's by N)."""
    a = np.broadcast_to(adv[:, None], logp.shape)
    n = mask.sum()
    return (a - (a * mask).sum() / n) * (logp - (logp * mask).sum() / n)


CLIP_BOUNDS = [(1.0, 5.0), (0.0, 0.4), (-0.3, 0.6)]


def clip_cov_pair(logp, old, adv, mask, ratio, lb, ub, perm=None):
    """(library, verl) for Clip-Cov; ``perm`` replaces ``torch.randperm`` in verl's call."""
    got = library_call("clip_cov", logp, old, adv, mask, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    config = actor_config("clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    original = torch.randperm
    if perm is not None:
        torch.randperm = lambda n, **kw: perm(n)
    try:
        want = verl_call(core_algos.compute_policy_loss_clip_cov, config, logp, old, adv, mask)
    finally:
        torch.randperm = original
    return got, want


@pytest.mark.parametrize("bounds", CLIP_BOUNDS)
@pytest.mark.parametrize("seed", range(6))
def test_clip_cov_forced_selection_equals_verl(seed, bounds):
    """clip_cov_ratio = 1: n = N ≥ the candidates, so both select every candidate."""
    lb, ub = bounds
    logp, old, adv, mask = batch(100 + seed)
    cov = covariances(logp, adv, mask)[mask > 0]
    assert np.min(np.abs(np.concatenate([cov - lb, cov - ub]))) > 1e-6
    (loss, grad, m), (want, want_grad, wm) = clip_cov_pair(logp, old, adv, mask, 1.0, lb, ub)
    assert m["cov_selected_frac"] > 0.02, "some tokens are candidates"
    assert m["cov_selected_frac"] == pytest.approx(wm["actor/pg_clipfrac"], rel=1e-7)
    assert loss == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, want_grad * mask, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_clip_cov_given_the_same_selection_equals_verl(seed):
    lb, ub = (0.0, 0.4)
    logp, old, adv, mask = batch(200 + seed)
    n_tok = mask.sum()
    # The candidates (every one selected at ratio 1: its gradient is exactly 0, while an
    # unclipped counted token's −A·ρ/N is not), then the library's subset at ratio 0.05.
    (_, all_grad, _), _ = clip_cov_pair(logp, old, adv, mask, 1.0, lb, ub)
    (_, plain_grad, _) = library_call("clip_cov", logp, old, adv, mask, clip_cov_ratio=1.0, clip_cov_lb=50.0,
                                      clip_cov_ub=60.0)  # nothing selected
    live = (mask > 0) & (plain_grad != 0)
    candidates = np.flatnonzero((live & (all_grad == 0)).ravel())  # row-major, as torch.nonzero
    ratio = 0.05
    n = max(int(ratio * n_tok), 1)
    assert len(candidates) > n, "more candidates than selected: the subset is a choice"
    got_loss, got_grad, got_m = library_call("clip_cov", logp, old, adv, mask, clip_cov_ratio=ratio,
                                             clip_cov_lb=lb, clip_cov_ub=ub)
    chosen = np.flatnonzero((live & (got_grad == 0)).ravel())
    assert len(chosen) == n and set(chosen) <= set(candidates)
    # verl's randperm replaced by: the library's chosen candidates first, then the others.
    first = [int(np.searchsorted(candidates, k)) for k in chosen]
    rest = [j for j in range(len(candidates)) if j not in first]

    def perm(count):
        assert count == len(candidates), "verl's candidates are the library's"
        return torch.tensor(first + rest)

    (loss, grad, m), (want, want_grad, wm) = clip_cov_pair(logp, old, adv, mask, ratio, lb, ub, perm)
    assert loss == got_loss
    assert loss == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, want_grad * mask, rtol=1e-12, atol=1e-14)
    assert m["cov_selected_frac"] == pytest.approx(wm["actor/pg_clipfrac"], rel=1e-7)


def test_clip_cov_all_equal_advantages_selects_nothing_like_verl():
    # Every advantage equal: A − mean A = 0 (the library: exactly; verl: to its masked mean's
    # 1e-8), so no covariance lies in (lb, ub) = (1, 5) and nothing is selected.
    logp, old, adv, mask = batch(300, equal_adv=0.7)
    (loss, grad, m), (want, want_grad, wm) = clip_cov_pair(logp, old, adv, mask, 0.0002, 1.0, 5.0)
    assert m["cov_selected_frac"] == 0.0 and wm["actor/pg_clipfrac"] == 0.0
    assert loss == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, want_grad * mask, rtol=1e-12, atol=1e-14)
