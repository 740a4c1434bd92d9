"""The verl drop-in against the real verl 0.9.1: its registry, Hydra config, batch handling
(DP chunking, shuffle, micro-batches, dynamic batch size) and ``ppo_loss``; the float64
SPEC reference and verl's own ``vanilla`` loss as references."""

import inspect

import numpy as np
import pytest
import torch

import calibrl
import calibrl.integrations.verl as cv
import spec_reference as ref
from verl_harness import F64, TinyPolicy, actor_config, make_batch, update
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding

AGG = {
    "token-mean": [],
    "seq-mean-token-mean": ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"],
    "seq-mean-token-sum": ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"],
    "seq-mean-token-sum-norm": ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
                                "actor_rollout_ref.actor.loss_scale_factor=5"],
    "token-sum": ["actor_rollout_ref.actor.loss_agg_mode=token-sum"],
}


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def reference(model, data, cfg_dict, token_weights=None):
    """SPEC loss of the whole batch in its original order, float64, and its parameter gradient."""
    model.zero_grad()
    lp = model.response_log_probs(data)
    b = data.batch
    mask = b["response_mask"].to(F64)
    adv = (b["advantages"].to(F64) * mask).sum(1) / mask.sum(1)
    c = torch.where(b[cv.CORRECT] > 0, 1.0, -1.0).to(F64)
    has_expert = cv.EXPERT_LOG_PROBS in b.keys()
    total, parts = ref.loss(
        cfg_dict, lp, mask, adv, adv.abs(), c, old=b["old_log_probs"].to(F64),
        expert_lp=b[cv.EXPERT_LOG_PROBS].to(F64) if has_expert else None,
        expert_mask=b[cv.EXPERT_MASK].to(F64) if has_expert else None,
        expert_index=torch.arange(len(data)) if has_expert else None,
        token_weights=token_weights,
    )
    total.backward()
    return total.item(), parts, grads(model).clone()


def run_update(model, data, config, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the gradient, move nothing
    losses, metrics = update(model, opt, data, config, **kw)
    return sum(losses), losses, metrics, grads(model).clone()


def test_registered_with_the_pinned_verl_signature():
    import verl

    assert verl.__version__ in cv.SUPPORTED_VERL
    fn = core_algos.get_policy_loss_fn("calibrl")
    assert fn is cv.compute_policy_loss_calibrl
    ours = inspect.signature(fn).parameters
    verls = inspect.signature(core_algos.compute_policy_loss_vanilla).parameters
    assert list(ours) == list(verls) == ["old_log_prob", "log_prob", "advantages", "response_mask",
                                         "loss_agg_mode", "config", "rollout_is_weights"]


def test_hydra_composes_the_readme_overrides():
    config = actor_config()
    assert type(config.policy_loss) is cv.CalibRLPolicyLossConfig
    assert config.policy_loss.loss_mode == "calibrl"
    cfg = cv.config_from_verl(config, config.loss_agg_mode).to_dict()
    assert (cfg["lambda"], cfg["alpha"], cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["agg"]) == (
        0.1, 0.5, 0.2, 0.2, 3.0, "token-mean")
    clip = actor_config("actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.clip_ratio_c=10")
    assert cv.config_from_verl(clip, "token-mean").to_dict()["clip_high"] == 0.28
    assert cv.config_from_verl(clip, "token-mean").to_dict()["dual_clip"] == 10.0


def test_readme_shows_the_tested_overrides():
    from conftest import REPO
    from verl_harness import README_OVERRIDES

    for readme in (REPO / "integration" / "verl" / "README.md", REPO / "README.md"):
        text = readme.read_text()
        for line in README_OVERRIDES[:3]:
            assert line in text, (readme, line)


def test_without_the_config_class_verl_rejects_the_block():
    """Why the README sets ``_target_``: verl's PolicyLossConfig has no ``calibrl`` field."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[
            "+actor_rollout_ref.actor.policy_loss.calibrl={lambda:0.1}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    with pytest.raises(Exception, match="calibrl"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_block_may_not_contradict_verl_keys():
    with pytest.raises(ValueError, match="clip_ratio_low"):
        cv.config_from_verl({"policy_loss": {"calibrl": {"clip_low": 0.1}}}, "token-mean")
    with pytest.raises(calibrl.ConfigError, match="lamda"):
        cv.config_from_verl({"policy_loss": {"calibrl": {"lamda": 0.1}}}, "token-mean")


@pytest.mark.parametrize("agg", list(AGG))
def test_called_by_verl_ppo_loss_and_matches_the_reference(agg, monkeypatch):
    """verl's ppo_loss looks the loss up and calls it once per micro-batch; after verl's shuffle
    and dynamic-batch-size regrouping the micro-batch losses add up to the float64 SPEC loss of
    the whole batch, and so do the gradients."""
    calls = []
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "calibrl",
                        lambda *a, **k: calls.append(k) or cv.compute_policy_loss_calibrl(*a, **k))
    model = TinyPolicy()
    data = make_batch(model, seed=1)
    config = actor_config(*AGG[agg])
    total, losses, metrics, g = run_update(model, data, config, micro_batch_size=4, dynamic_bsz=True)
    assert len(calls) == len(losses) >= 2
    assert set(calls[0]) == {"old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                             "rollout_is_weights"}
    assert "actor/calibrl_explore_loss" in metrics[0]
    cfg = cv.config_from_verl(config, agg, horizon=5, seq_count=len(data)).to_dict()
    want, parts, g_ref = reference(model, data, cfg)
    assert parts["explore_loss"] != 0
    assert total == pytest.approx(want, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("agg", list(AGG))
def test_micro_batch_losses_add_up_to_the_whole_batch(agg):
    model = TinyPolicy()
    data = make_batch(model, seed=2)
    config = actor_config(*AGG[agg])
    whole, (one,), _, g_whole = run_update(model, data, config, micro_batch_size=len(data), shuffle=False)
    parts, losses, _, g_parts = run_update(model, data, config, micro_batch_size=2)
    assert len(losses) == len(data) // 2
    assert parts == pytest.approx(whole, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("agg", list(AGG))
def test_grpo_preset_equals_verl_vanilla_with_rollout_is_weights(agg):
    """With λ = 0 CalibRL is GRPO: the library's loss (token_weights = verl's rollout_is_weights)
    equals verl's own vanilla loss, value and gradient."""
    model = TinyPolicy()
    data = make_batch(model, seed=3, expert=False)
    g = torch.Generator().manual_seed(9)
    data.batch["rollout_is_weights"] = torch.rand(data.batch["old_log_probs"].shape, generator=g) * 2
    ours = actor_config("actor_rollout_ref.actor.policy_loss.calibrl.preset=grpo", *AGG[agg])
    vanilla = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", *AGG[agg])
    a, la, _, ga = run_update(model, data, ours, micro_batch_size=4)
    b, lb, _, gb = run_update(model, data, vanilla, micro_batch_size=4)
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-9)  # verl's loss is float32
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
    # the weights are used: without them the loss differs
    del data.batch["rollout_is_weights"]
    c, *_ = run_update(model, data, ours, micro_batch_size=4)
    assert abs(c - a) > 1e-4


def test_correctness_comes_from_verl_rewards_without_user_code():
    """Without ``calibrl_correct`` the loss reads verl's ``token_level_scores`` (reward > τ):
    the same loss as with it. Control: wrong correctness changes the loss."""
    model = TinyPolicy()
    data = make_batch(model, seed=11)
    config = actor_config()
    with_key, *_ = run_update(model, data, config, micro_batch_size=4, shuffle=False)
    right = data.batch[cv.CORRECT].clone()
    data.batch[cv.CORRECT] = 1 - right
    wrong, *_ = run_update(model, data, config, micro_batch_size=4, shuffle=False)
    assert abs(wrong - with_key) > 1e-6
    del data.batch[cv.CORRECT]
    without, *_ = run_update(model, data, config, micro_batch_size=4, shuffle=False)
    assert without == with_key


def test_token_weights_against_the_reference():
    model = TinyPolicy()
    data = make_batch(model, seed=4)
    rho = torch.rand(data.batch["old_log_probs"].shape, generator=torch.Generator().manual_seed(3)) * 2
    data.batch["rollout_is_weights"] = rho
    config = actor_config()
    total, _, _, g = run_update(model, data, config, micro_batch_size=4)
    want, _, g_ref = reference(model, data, cv.config_from_verl(config, "token-mean").to_dict(),
                               token_weights=rho.to(F64))
    assert total == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_expert_baseline_follows_its_rows_through_reorder_chunk_and_shuffle():
    model = TinyPolicy()
    data = make_batch(model, seed=5)
    config = actor_config()
    want, _, g_ref = reference(model, data, cv.config_from_verl(config, "token-mean").to_dict())
    # verl reorders (balance), chunks (DP dispatch) and shuffles (mini-batch iterator): per-row
    # expert data moves with its row.
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    moved = data.select(deepcopy=True)
    moved.reorder(perm)
    chunks = moved.chunk(2)
    assert torch.equal(chunks[1].batch[cv.EXPERT_LOG_PROBS], data.batch[cv.EXPERT_LOG_PROBS][perm[8:]])
    from verl import DataProto

    total, *_ = run_update(model, DataProto.concat(chunks), config, micro_batch_size=2, dynamic_bsz=True)
    assert total == pytest.approx(want, rel=1e-9)
    # control: the same batch with the expert rows shifted by one prompt gives another loss
    shifted = data.select(deepcopy=True)
    for key in (cv.EXPERT_LOG_PROBS, cv.EXPERT_MASK):
        shifted.batch[key] = torch.roll(shifted.batch[key], 4, 0)
    other, *_ = run_update(model, shifted, config, micro_batch_size=2)
    assert abs(other - want) > 1e-6


def test_expert_pass_scores_each_rows_prompt_and_expert_response():
    """attach_expert_log_probs (through verl's compute_log_prob layout conversions) gives, for
    every row, log p(expert response | that row's prompt), computed here token by token."""
    from verl_harness import PAD

    model = TinyPolicy()
    data = make_batch(model, seed=10)
    b = data.batch
    for i in range(len(data)):
        prompt = b["prompts"][i][b["prompts"][i] != PAD]
        expert = b[cv.EXPERT_RESPONSES][i][b[cv.EXPERT_RESPONSES][i] != PAD]
        with torch.no_grad():
            lp = model.next_log_probs(torch.cat([prompt, expert]))[len(prompt) - 1 : -1]
        got = b[cv.EXPERT_LOG_PROBS][i]
        torch.testing.assert_close(got[: len(expert)], lp.float(), rtol=1e-6, atol=1e-6)
        assert torch.all(got[len(expert):] == 0) and torch.all(b[cv.EXPERT_MASK][i, len(expert):] == 0)


def _dp_worker(rank, world, path, seed, agg):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["CALIBRL_TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = TinyPolicy()
        data = make_batch(model, seed=seed)
        shard = data.chunk(world)[rank]  # verl's DP dispatch
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses, _ = update(model, opt, shard, actor_config(*AGG[agg]), micro_batch_size=4,
                           dp_group=torch.distributed.group.WORLD)
        if rank == 0:
            torch.save(([p.detach() for p in model.parameters()], len(shard), len(losses)), path)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("agg", list(AGG))
def test_dp2_ga2_update_equals_the_single_process_update(agg, tmp_path):
    """One mini-batch of 16 rows: two gloo ranks of 8 rows, each in 2 micro-batches of 4
    (gradient accumulation 2), against one process with the whole mini-batch at once."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["CALIBRL_TEST_PORT"] = str(s.getsockname()[1])
    path = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_dp_worker, args=(2, str(path), 6, agg), nprocs=2, join=True)
    dp, rows_per_rank, micro_batches = torch.load(path)
    assert (rows_per_rank, micro_batches) == (8, 2)

    model = TinyPolicy()
    before = [p.detach().clone() for p in model.parameters()]
    data = make_batch(model, seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    update(model, opt, data, actor_config(*AGG[agg]), micro_batch_size=len(data), shuffle=False)
    for b, single, multi in zip(before, model.parameters(), dp):
        step = single.detach() - b
        assert step.abs().max() > 1e-4
        rel = (multi - single.detach()).norm() / step.norm()
        print(f"{agg}: DP=2 x GA 2 vs single process: relative difference of the update {rel:.2e}")
        assert rel < 1e-6, rel


def _engine_micro_batch(model, data, dp_size):
    """One rank's micro-batch as verl's engine hands it to the loss under ``dp_size`` ranks:
    ``global_batch_info`` counts the global mini-batch (here: dp_size copies of this one)."""
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, dp_size=dp_size, batch_num_tokens=float(td["loss_mask"].sum()) * dp_size,
                         global_batch_size=len(data) * dp_size)
    return td


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("agg", list(AGG))
def test_grpo_preset_equals_verl_vanilla_under_every_dp_size(agg, dp_size):
    """verl's agg_loss scales each rank's loss for DP (token-sum: the local sum times dp_size):
    the registered loss with the grpo preset equals verl's vanilla loss at every dp_size, value
    and gradient, with verl's rollout_is_weights."""
    model = TinyPolicy()
    data = make_batch(model, seed=12, expert=False)
    data.batch["rollout_is_weights"] = torch.rand(data.batch["old_log_probs"].shape,
                                                  generator=torch.Generator().manual_seed(5)) * 2
    out = {}
    for name, mode in (("calibrl", "actor_rollout_ref.actor.policy_loss.calibrl.preset=grpo"),
                       ("vanilla", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla")):
        config = actor_config(mode, *AGG[agg])
        model.zero_grad()
        td = _engine_micro_batch(model, data, dp_size)
        loss, _ = cv.ppo_loss(config=config, model_output=model.model_output(td), data=td)
        loss.backward()
        out[name] = (loss.item(), grads(model).clone())
    (ours, g_ours), (verls, g_verl) = out["calibrl"], out["vanilla"]
    print(f"{agg} dp={dp_size}: loss ratio to verl's vanilla {ours / verls:.6f}")
    assert ours == pytest.approx(verls, rel=1e-6)  # verl's loss is float32
    torch.testing.assert_close(g_ours, g_verl, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------ bad input


def test_calibrl_preset_without_expert_data_names_the_key():
    model = TinyPolicy()
    data = make_batch(model, seed=7, expert=False)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=cv.EXPERT_LOG_PROBS):
        update(model, opt, data, actor_config(), micro_batch_size=4)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_token_varying_advantages_are_an_error():
    model = TinyPolicy()
    data = make_batch(model, seed=8)
    data.batch["advantages"] = data.batch["advantages"] + 0.1 * torch.arange(5)  # GAE-like
    with pytest.raises(ValueError, match="`advantages` vary"):
        update(model, torch.optim.SGD(model.parameters(), lr=0.5), data, actor_config(), micro_batch_size=4)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_expert_rows_that_do_not_match_the_batch_name_the_key():
    model = TinyPolicy()
    data = make_batch(model, seed=9, expert=False)
    b = data.batch
    lp = b["old_log_probs"].clone().requires_grad_()
    config = actor_config()
    extra = {cv.EXPERT_LOG_PROBS: torch.zeros(len(data) - 1, 6), cv.EXPERT_MASK: None, cv.CORRECT: None}
    token = cv._current.set(extra)
    try:
        with pytest.raises(ValueError, match=cv.EXPERT_LOG_PROBS):
            cv.compute_policy_loss_calibrl(b["old_log_probs"], lp, b["advantages"], b["response_mask"].bool(),
                                           "token-mean", config)
    finally:
        cv._current.reset(token)
    assert lp.grad is None
    # the expert pass refuses expert responses of another batch, and writes nothing
    data.batch[cv.EXPERT_RESPONSES] = torch.ones(len(data), 4, dtype=torch.long)
    with pytest.raises(ValueError, match=cv.EXPERT_LOG_PROBS.replace("log_probs", "") + "|compute_log_prob"):
        cv.attach_expert_log_probs(data, lambda d: torch.zeros(len(data) - 1, 4))
    assert cv.EXPERT_LOG_PROBS not in data.batch.keys()


# ------------------------------------------------------------------------------ worker, example


def test_install_points_the_actor_at_the_calibrl_engine_loss():
    """install() rewires what ActorRolloutRefWorker.init_model set up (verl's
    ``partial(ppo_loss, config=actor_config)`` on the worker and its actor)."""
    import functools

    from verl.workers.utils.losses import ppo_loss

    class Actor:
        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

    class Worker:  # the two attributes of ActorRolloutRefWorker that install() touches
        actor = Actor()

    worker = Worker()
    config = actor_config()
    worker.loss_fn = functools.partial(ppo_loss, config=config)
    cv.install(worker)
    assert worker.actor.loss_fn.func is cv.ppo_loss and worker.actor.loss_fn.keywords["config"] is config
    assert issubclass(cv.CalibRLActorRolloutRefWorker, __import__(
        "verl.workers.engine_workers", fromlist=["x"]).ActorRolloutRefWorker)


def test_end_to_end_example_trains():
    import example_train

    history, model = example_train.main(["--steps", "12", "--seed", "3"])
    assert len(history) == 12 and all(np.isfinite(loss) for _, loss in history)
    assert any(loss != 0 for _, loss in history)
    initial = example_train.TinyPolicy(seed=3)
    assert not torch.equal(initial.head, model.head.detach())
