"""verl's own entropy-control keys (``policy_loss.clip_cov_ratio``, ``clip_cov_lb``,
``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``) reach the registered loss: the loss with
verl's key set equals the library called with the equivalent calibrl configuration, and a key
of the calibrl block wins over verl's. (The library's Clip-Cov/KL-Cov against verl's own
functions: test_entropy_control_vs_verl.py.)"""

import pytest
import torch

import calibrl
import calibrl.integrations.verl as cv
from verl_harness import TinyPolicy, make_batch
from verl_harness import actor_config as cached_config
from verl.trainer.ppo import core_algos

GRPO = "actor_rollout_ref.actor.policy_loss.calibrl.preset=grpo"
PL = "actor_rollout_ref.actor.policy_loss."


def actor_config(*overrides):
    """verl's actor config with the README's overrides and these, with no global batch info
    (verl's ppo_loss writes it into the config object; the harness caches config objects)."""
    import copy

    config = copy.deepcopy(cached_config(*overrides))
    config.global_batch_info.clear()
    return config


def _inputs(seed=21):
    """A micro-batch as verl's ppo_loss hands it to the policy loss (padded [B, S])."""
    model = TinyPolicy()
    data = make_batch(model, seed=seed, expert=False)
    b = data.batch
    mask = b["response_mask"].bool()
    log_prob = model.response_log_probs(data).float()
    # spread the log-probs so that the covariances fall on both sides of verl's bounds
    log_prob = (log_prob + 0.8 * torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(seed))) * mask
    return b["old_log_probs"].float(), log_prob.detach().requires_grad_(), b["advantages"].float(), mask


def _registered(config, agg="token-mean"):
    old, lp, adv, mask = _inputs()
    loss, metrics = cv.compute_policy_loss_calibrl(old, lp, adv, mask, agg, config)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, metrics


def _library(agg="token-mean", **keys):
    """The library called directly with the calibrl configuration."""
    old, lp, adv, mask = _inputs()
    row_adv = adv[:, 0]  # GRPO: one advantage per row (every row has a first response token)
    cfg = calibrl.Config("grpo", clip_low=0.2, clip_high=0.2, dual_clip=3.0, agg=agg, alpha=0.5, **{"lambda": 0.1},
                         **keys)
    weights = row_adv.abs() if cfg["rarity_weighting"] else torch.ones_like(row_adv)
    inputs = calibrl.LossInputs(advantages=row_adv, weights=weights, signs=torch.where(row_adv > 0, 1.0, -1.0),
                                mask=mask, old_logprobs=old.detach())
    loss, metrics = calibrl.calibrl_loss(lp, inputs, cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, metrics


def _same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-9)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-9)


def _differ(a, b):
    assert abs(a[0] - b[0]) > 1e-5 or (a[1] - b[1]).abs().max() > 1e-5


def test_verl_kl_cov_keys_reach_the_loss():
    ours = _registered(actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=kl_cov",
                                    PL + "kl_cov_ratio=0.1", PL + "ppo_kl_coef=0.7"))
    _same(ours, _library(entropy_control="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7))
    _differ(ours, _library(entropy_control="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.1))  # the coefficient acts
    _differ(ours, _library(entropy_control="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.7))  # the ratio acts


def test_verl_defaults_are_used_when_no_key_is_set():
    """verl's actor.yaml defaults (kl_cov_ratio 2e-4, ppo_kl_coef 0.1, clip_cov 2e-4 / 1 / 5) are
    what the loss gets from verl's config when neither side sets a key."""
    config = actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=kl_cov")
    d = cv.config_from_verl(config, "token-mean").to_dict()
    assert (d["kl_cov_ratio"], d["kl_cov_coef"], d["clip_cov_ratio"], d["clip_cov_lb"], d["clip_cov_ub"]) == (
        2e-4, 0.1, 2e-4, 1.0, 5.0)
    _same(_registered(config), _library(entropy_control="kl_cov", kl_cov_ratio=2e-4, kl_cov_coef=0.1))


def test_verl_clip_cov_keys_reach_the_loss():
    ours = _registered(actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=clip_cov",
                                    PL + "clip_cov_ratio=0.2", PL + "clip_cov_lb=-5", PL + "clip_cov_ub=5"))
    want = _library(entropy_control="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0)
    _same(ours, want)
    assert ours[2]["actor/cov_selected_frac"] == want[2]["cov_selected_frac"] > 0
    _differ(ours, _library(entropy_control="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=1.0, clip_cov_ub=5.0))


def test_the_calibrl_blocks_key_wins_over_verls():
    config = actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=kl_cov",
                          "+actor_rollout_ref.actor.policy_loss.calibrl.kl_cov_ratio=0.3",
                          "+actor_rollout_ref.actor.policy_loss.calibrl.kl_cov_coef=0.5",
                          PL + "kl_cov_ratio=0.1", PL + "ppo_kl_coef=0.7")
    _same(_registered(config), _library(entropy_control="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.5))
    config = actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=clip_cov",
                          "+actor_rollout_ref.actor.policy_loss.calibrl.clip_cov_lb=-5",
                          PL + "clip_cov_ratio=0.2", PL + "clip_cov_lb=0.5", PL + "clip_cov_ub=5")
    _same(_registered(config), _library(entropy_control="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-5.0,
                                        clip_cov_ub=5.0))


def test_ppo_kl_under_kl_cov_is_reported_like_verl():
    """verl's KL-Cov reports ppo_kl = mean |ℓ − ℓold|; the drop-in reports the same figure, and
    the selected fraction as ``actor/cov_selected_frac``."""
    config = actor_config(GRPO, "+actor_rollout_ref.actor.policy_loss.calibrl.entropy_control=kl_cov",
                          PL + "kl_cov_ratio=0.1")
    _, _, metrics = _registered(config)
    old, lp, adv, mask = _inputs()
    _, verl_metrics = core_algos.compute_policy_loss_kl_cov(old, lp.detach(), adv, mask, "token-mean", config)
    assert metrics["actor/ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"], rel=1e-6)
    assert metrics["actor/ppo_kl"] > 0
    n = int(mask.sum())
    assert metrics["actor/cov_selected_frac"] == pytest.approx(max(int(0.1 * n), 1) / n)
    # without an entropy control: the library's ppo_kl (mean ℓold − ℓ, verl's vanilla figure), no cov metric
    _, _, plain = _registered(actor_config(GRPO))
    _, vanilla = core_algos.compute_policy_loss_vanilla(old, lp.detach(), adv, mask, "token-mean",
                                                        actor_config(PL + "loss_mode=vanilla"))
    assert plain["actor/ppo_kl"] == pytest.approx(vanilla["actor/ppo_kl"], rel=1e-5)
    assert "actor/cov_selected_frac" not in plain
