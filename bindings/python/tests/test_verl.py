"""verl: CalibRL as a registered policy loss, run by a minimal verl-style actor update.
Uses the real verl when importable, else the stand-in registry with verl's signature."""

import importlib
import sys

import pytest
import torch

import calibrl
import spec_reference as ref
from conftest import HERE, REPO, needs_loss

pytestmark = needs_loss

try:
    importlib.import_module("verl.trainer.ppo.core_algos")
    REAL_VERL = True
except Exception:
    REAL_VERL = False
    sys.path.insert(0, str(HERE / "standins"))
sys.path.insert(0, str(REPO / "integration" / "verl"))

from verl.trainer.ppo import core_algos  # noqa: E402

import calibrl.integrations.verl as calibrl_verl  # noqa: E402
import example_actor  # noqa: E402

B, S = 4, 6


def micro_batch(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (B, S + 1), generator=g)
    lengths = torch.tensor([6, 4, 5, 2])
    mask = (torch.arange(S)[None] < lengths[:, None]).float()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, _, _ = calibrl.group_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    return {
        "input_ids": tokens,
        "response_mask": mask,
        "old_log_probs": -torch.rand(B, S, generator=g) * 3,
        "advantages": adv[:, None] * mask,  # verl's token-level layout
        "calibrl_rewards": rewards,
        "calibrl_expert_log_probs": -torch.rand(2, S, generator=g) * 2,
        "calibrl_expert_index": torch.tensor([0, 0, 1, 1]),
    }


CONFIG = {
    "policy_loss": {"loss_mode": "calibrl", "calibrl": {"preset": "paper", "lambda": 0.3, "alpha": 0.5}},
    "clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
    "loss_agg_mode": "token-mean",
}


def test_registered_under_calibrl():
    assert core_algos.get_policy_loss_fn("calibrl") is calibrl_verl.compute_policy_loss_calibrl


def test_config_keys_map_onto_calibrl():
    cfg = calibrl_verl.config_from_verl(CONFIG, "seq-mean-token-mean").to_dict()
    assert (cfg["lambda"], cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["agg"]) == (
        0.3, 0.2, 0.28, 3.0, "seq-mean-token-mean")
    with pytest.raises(calibrl.ConfigError, match="lamda"):
        calibrl_verl.config_from_verl({"calibrl": {"lamda": 1}}, "token-mean")


def test_actor_step_matches_spec_and_trains():
    actor = example_actor.TinyPolicy()
    before = [p.detach().clone() for p in actor.parameters()]
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.1)
    batches = [micro_batch(0), micro_batch(1)]
    metrics = example_actor.update_policy(actor, optimizer, CONFIG, batches)
    assert any(not torch.equal(a, b) for a, b in zip(before, actor.parameters()))

    # The reported pg_loss is the SPEC loss of that micro-batch (weights before the step).
    cfg = calibrl_verl.config_from_verl(CONFIG, "token-mean").to_dict()
    fresh = example_actor.TinyPolicy()
    for mb, m in zip(batches, metrics):
        lp = fresh.log_prob(mb["input_ids"]).double()
        a = (mb["advantages"].sum(1) / mb["response_mask"].sum(1)).double()
        c = torch.where(mb["calibrl_rewards"] > 0.1, 1.0, -1.0).double()
        total, parts = ref.loss(cfg, lp, mb["response_mask"], a, a.abs(), c, old=mb["old_log_probs"].double(),
                                expert_lp=mb["calibrl_expert_log_probs"].double(),
                                expert_index=mb["calibrl_expert_index"])
        assert m["actor/pg_loss"] == pytest.approx(parts["loss"], rel=1e-4)
        assert m["actor/pg_clipfrac"] == pytest.approx(parts["clipfrac"], abs=1e-6)
        assert m["actor/ppo_kl"] == pytest.approx(parts["ppo_kl"], rel=1e-4)
        assert parts["explore_loss"] != 0


def test_missing_expert_data_is_a_clear_error():
    mb = micro_batch(2)
    fn = core_algos.get_policy_loss_fn("calibrl")
    with pytest.raises(ValueError, match="micro_batch"):
        fn(mb["old_log_probs"], mb["old_log_probs"].clone().requires_grad_(), mb["advantages"], mb["response_mask"],
           "token-mean", CONFIG)
    # the grpo preset needs no expert
    loss, *_ = fn(mb["old_log_probs"], mb["old_log_probs"].clone().requires_grad_(), mb["advantages"],
                  mb["response_mask"], "token-mean", {"calibrl": {"preset": "grpo"}})
    assert loss.requires_grad
