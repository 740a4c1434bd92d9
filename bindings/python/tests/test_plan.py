"""The scheduler binding (SPEC §7, ``calibrl.plan``): plan properties on random steps, checks by
plain sums and counts (no re-implementation of the planner), errors naming the argument, the
handle's lifetime, the expert helper, and an end-to-end check that per-micro-batch loss calls
with the plan's normalisers add up to one whole-mini-batch call."""

import gc
import math
from collections import Counter

import numpy as np
import pytest
import torch

import calibrl
from calibrl import Prompt, SchedulerConfig, SeqKind
from calibrl.plan import PASS_NOGRAD, PASS_TRAIN
from conftest import needs_loss

F64 = torch.float64


def random_step(rng, n_prompts=None, with_rewards=False):
    prompts = []
    for _ in range(n_prompts or int(rng.integers(1, 30))):
        n = int(rng.integers(1, 9))
        prompts.append(
            Prompt(
                prompt_len=int(rng.integers(1, 120)),
                rollout_lens=rng.integers(1, 400, n).tolist(),
                expert_len=int(rng.integers(1, 500)) if rng.random() < 0.7 else None,
                rewards=rng.choice([0.0, 1.0], n).tolist() if with_rewards else None,
            )
        )
    return prompts


def random_config(rng, n_prompts):
    selection = str(rng.choice(["all", "random_fraction", "pass_rate"]))
    low = float(rng.random())
    return SchedulerConfig(
        dp_ranks=int(rng.integers(1, 5)),
        minibatch_prompts=int(rng.integers(1, n_prompts + 3)),
        nograd_token_budget=int(rng.integers(150, 2500)),
        train_token_budget=int(rng.integers(150, 2500)),
        loss_kind=str(rng.choice(["calibrl", "grpo", "luffy", "rlplus"])),
        expert_selection=selection,
        seed=int(rng.integers(0, 2**63)),
        fraction=float(rng.random()),
        pass_rate_low=low,
        pass_rate_high=low + float(rng.random()) * (1 - low),
    )


def flat(prompts):
    """Per rollout id: (prompt, response length), in input order."""
    return [(g, n) for g, p in enumerate(prompts) for n in p.rollout_lens]


def trains_experts(cfg):
    return cfg.loss_kind in ("luffy", "rlplus")


def check_plan(prompts, cfg, p):
    rollouts = flat(prompts)
    R = len(rollouts)
    s = p.summary
    assert (s["num_prompts"], s["num_rollouts"], s["dp_ranks"]) == (len(prompts), R, cfg.dp_ranks)
    P = s["num_expert_slots"]
    assert len(p.seqs) == R + P

    # Sequences describe the input: rollout i is prompt g's rollout of length n.
    for i, (g, n) in enumerate(rollouts):
        q = p.seq(i)
        assert (q.id, q.kind, q.prompt, q.index, q.response_len) == (i, SeqKind.ROLLOUT, g, i, n)
        assert q.tokens == prompts[g].prompt_len + n
    for slot in range(P):
        q = p.seq(R + slot)
        g = int(p.expert_prompts[slot])
        assert (q.kind, q.prompt, q.index) == (SeqKind.EXPERT, g, slot)
        assert q.response_len == prompts[g].expert_len
        assert q.tokens == prompts[g].prompt_len + prompts[g].expert_len

    # Expert selection, slots, offsets and the gather map.
    has = [g for g, q in enumerate(prompts) if q.expert_len is not None]
    chosen = p.expert_prompts.tolist()
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(has)
    if cfg.loss_kind == "grpo":
        assert chosen == []
    elif cfg.expert_selection == "all":
        assert chosen == has
    elif cfg.expert_selection == "random_fraction":
        assert len(chosen) == math.floor(cfg.fraction * len(has) + 0.5)
    else:
        rate = {g: np.mean([r > cfg.reward_threshold for r in prompts[g].rewards]) for g in has}
        assert chosen == [g for g in has if cfg.pass_rate_low <= rate[g] <= cfg.pass_rate_high]
    assert p.expert_offsets.tolist() == np.concatenate([[0], np.cumsum([prompts[g].expert_len for g in chosen], dtype=np.int64)]).tolist()
    assert s["expert_tokens"] == p.expert_offsets[-1]
    slot_of = {g: k for k, g in enumerate(chosen)}
    assert p.gather_map.tolist() == [slot_of.get(g, -1) for g, _ in rollouts]

    # No-grad pass: every rollout and every selected expert exactly once, the same number of
    # micro-batches on every rank, the budget kept except by lone oversize sequences.
    assert all(len(rank) == s["nograd_microbatches"] for rank in p.nograd)
    ids = Counter(q.id for q in p.nograd_seqs())
    assert ids == Counter(range(R + P))
    assert sum(q.tokens for q in p.nograd_seqs()) == sum(
        q.prompt_len * len(q.rollout_lens) + sum(q.rollout_lens) for q in prompts
    ) + sum(prompts[g].prompt_len + prompts[g].expert_len for g in chosen)
    budget = cfg.nograd_token_budget
    for rank in p.nograd:
        for mb in rank:
            if sum(q.tokens for q in mb) > budget:
                assert len(mb) == 1, "only a lone oversize sequence may exceed the budget"
    assert sorted(p.oversize("nograd")) == sorted(q.id for q in p.seqs if q.tokens > budget)
    assert p.oversize(PASS_NOGRAD) == p.oversize("nograd")

    # Training pass: mini-batches cover the prompts in order; every rollout once; experts only
    # when LUFFY / RL-PLUS train them; normalisers are the trained rows' counts.
    assert len(p.minibatches) == s["num_minibatches"] == math.ceil(len(prompts) / min(cfg.minibatch_prompts, len(prompts)))
    trained = Counter()
    budget = cfg.train_token_budget
    over = []
    for b, mb in enumerate(p.minibatches):
        assert mb.index == b and mb.first_prompt == b * cfg.minibatch_prompts
        assert all(len(rank) == mb.microbatches for rank in mb.train)
        seqs = mb.seqs()
        assert all(q.prompt in mb.prompts for q in seqs)
        trained.update(q.id for q in seqs)
        tokens, rows = float(sum(q.response_len for q in seqs)), float(len(seqs))
        # No untrained expert row in the training pass: every row's counts are the same.
        assert mb.normalizers == {
            "token_count": tokens,
            "seq_count": rows,
            "all_token_count": tokens,
            "all_seq_count": rows,
        }
        for rank in mb.train:
            for micro in rank:
                if sum(q.tokens for q in micro) > budget:
                    assert len(micro) == 1
        over += [q.id for q in seqs if q.tokens > budget]
    assert sorted(p.oversize("train")) == sorted(over) and p.oversize(PASS_TRAIN) == p.oversize("train")
    assert (s["nograd_oversize"], s["train_oversize"]) == (len(p.oversize("nograd")), len(over))
    experts_trained = [i for i in trained if i >= R]
    assert Counter(i for i in trained if i < R) == Counter(range(R))
    if trains_experts(cfg):
        assert Counter(experts_trained) == Counter(range(R, R + P))
    else:
        assert experts_trained == [], "CalibRL / GRPO never train an expert row"


@pytest.mark.parametrize("seed", range(40))
def test_random_plans_have_the_plan_properties(seed):
    rng = np.random.default_rng(seed)
    prompts = random_step(rng, with_rewards=True)
    cfg = random_config(rng, len(prompts))
    with calibrl.plan(prompts, cfg) as p:
        check_plan(prompts, cfg, p)


def test_calibrl_forwards_experts_once_and_never_trains_them():
    prompts = [Prompt(10, [5, 7, 9], expert_len=12), Prompt(4, [3, 3], expert_len=6), Prompt(8, [2])]
    p = calibrl.plan(prompts, dp_ranks=2, nograd_token_budget=20, train_token_budget=18)
    assert p.expert_prompts.tolist() == [0, 1] and p.gather_map.tolist() == [0, 0, 0, 1, 1, -1]
    assert p.expert_offsets.tolist() == [0, 12, 18]
    assert sorted(q.id for q in p.nograd_seqs() if q.kind == SeqKind.EXPERT) == [6, 7]
    assert all(q.kind == SeqKind.ROLLOUT for mb in p.minibatches for q in mb.seqs())
    assert p.minibatches[0].normalizers == {
        "token_count": 29.0, "seq_count": 6.0, "all_token_count": 29.0, "all_seq_count": 6.0
    }
    # The expert of prompt 0 (10 + 12 tokens) is over the no-grad budget; its longest rollout
    # (10 + 9) over the training budget. Each is alone in its micro-batch.
    assert p.oversize("nograd") == [6] and p.oversize("train") == [2]
    assert [q.id for mb in p.nograd[0] + p.nograd[1] for q in mb if len(mb) == 1 and q.id == 6] == [6]


def test_defaults_are_the_librarys():
    assert SchedulerConfig() == SchedulerConfig.from_library()
    c = SchedulerConfig().to_c()
    assert (c.dp_ranks, c.minibatch_prompts, c.loss_kind, c.expert_selection) == (1, 2**32 - 1, 0, 0)


def test_plans_are_deterministic_and_honour_the_seed():
    rng = np.random.default_rng(7)
    prompts = random_step(rng, n_prompts=40)
    cfg = SchedulerConfig(dp_ranks=4, nograd_token_budget=900, expert_selection="random_fraction", fraction=0.5, seed=3)
    a, b = calibrl.plan(prompts, cfg), calibrl.plan(prompts, cfg)
    assert [[[q.id for q in mb] for mb in r] for r in a.nograd] == [[[q.id for q in mb] for mb in r] for r in b.nograd]
    assert a.expert_prompts.tolist() == b.expert_prompts.tolist()
    others = {tuple(calibrl.plan(prompts, cfg, seed=s).expert_prompts.tolist()) for s in range(4, 12)}
    assert len(others) > 1, "the seed changes which experts are drawn"


def test_ranks_are_balanced_within_one_sequence():
    rng = np.random.default_rng(11)
    prompts = random_step(rng, n_prompts=64)
    p = calibrl.plan(prompts, dp_ranks=8, nograd_token_budget=4000, quadratic_coef=0.0)
    loads = [sum(q.tokens for mb in r for q in mb) for r in p.nograd]
    assert max(loads) - min(loads) <= max(q.tokens for q in p.seqs)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "prompts, overrides, error, needle",
    [
        ([Prompt(5, [3])], {"train_token_budget": 0}, calibrl.InvalidArgumentError, "`config.train_token_budget`"),
        ([Prompt(5, [3])], {"nograd_token_budget": 0}, calibrl.InvalidArgumentError, "`config.nograd_token_budget`"),
        ([Prompt(5, [3])], {"dp_ranks": 0}, calibrl.InvalidArgumentError, "`config.dp_ranks`"),
        ([Prompt(5, [3])], {"dp_ranks": -1}, calibrl.InvalidArgumentError, "`config.dp_ranks`"),
        ([Prompt(5, [3])], {"minibatch_prompts": 0}, calibrl.InvalidArgumentError, "`config.minibatch_prompts`"),
        ([Prompt(5, [3])], {"loss_kind": 9}, calibrl.InvalidArgumentError, "`config.loss_kind`"),
        ([Prompt(5, [3])], {"loss_kind": "ppo"}, calibrl.InvalidArgumentError, "`config.loss_kind`"),
        ([Prompt(5, [3])], {"expert_selection": "random_fraction", "fraction": 1.5}, calibrl.InvalidArgumentError, "fraction"),
        ([Prompt(5, [3]), Prompt(2, [])], {}, calibrl.InvalidArgumentError, "`prompts[1].num_rollouts`"),
        ([Prompt(5, [3, -2])], {}, calibrl.InvalidArgumentError, "`prompts[0].rollout_lens[1]`"),
        ([Prompt(5, [3, 0])], {}, calibrl.InvalidArgumentError, "`rollout_lens[1]`"),
        ([Prompt(5, [3], expert_len=0)], {}, calibrl.InvalidArgumentError, "`prompts[0].expert_len`"),
        ([Prompt(-5, [3])], {}, calibrl.InvalidArgumentError, "`prompts[0].prompt_len`"),
        ([], {}, calibrl.InvalidArgumentError, "`prompts`"),
        ([Prompt(5, [3], expert_len=4)], {"expert_selection": "pass_rate"}, calibrl.InvalidArgumentError, "`prompts[0].rewards`"),
        ([Prompt(5, [3], rewards=[1.0]), Prompt(5, [3])], {}, calibrl.InvalidArgumentError, "`prompts[1].rewards`"),
        ([Prompt(5, [3, 4], rewards=[float("nan"), 1.0])], {}, calibrl.NonFiniteError, "`prompts[0].rewards`"),
    ],
)
def test_bad_input_raises_naming_the_argument(prompts, overrides, error, needle):
    with pytest.raises(error) as e:
        calibrl.plan(prompts, **overrides)
    assert needle in str(e.value)
    assert isinstance(e.value, calibrl.CalibrlError) and e.value.status_name.startswith("CALIBRL_STATUS_")


def test_query_errors():
    p = calibrl.plan([Prompt(5, [3, 4], expert_len=2)])
    with pytest.raises(calibrl.InvalidArgumentError, match="`pass`"):
        p.oversize("backward")
    with pytest.raises(calibrl.InvalidArgumentError, match="`seq_id`"):
        p.seq(3)
    with pytest.raises(calibrl.ShapeError, match="`nograd_logprobs`"):
        p.collect_experts(np.zeros(4))  # 3 + 4 + 2 = 9 response tokens
    with pytest.raises(calibrl.InvalidArgumentError, match="`rank`"):
        p.collect_experts(np.zeros(9), rank=-2)
    p.close()
    with pytest.raises(calibrl.InvalidArgumentError, match="closed"):
        p.collect_experts(np.zeros(9))


# -------------------------------------------------------------------------------- lifetime


def test_the_handle_is_freed_once_by_the_context_manager_and_by_del():
    freed = []

    def spy(p):
        real = p._free
        p._free = lambda h: (freed.append(h.value), real(h))

    with calibrl.plan([Prompt(5, [3, 4], expert_len=2)]) as p:
        spy(p)
        raw = p.handle.value
        assert raw
    assert freed == [raw] and p.handle is None
    p.close()
    assert freed == [raw], "close() after the with block must not free twice"
    assert p.nograd_seqs() and p.minibatches[0].normalizers["seq_count"] == 2  # data outlives the handle

    q = calibrl.plan([Prompt(1, [1])])
    spy(q)
    raw = q.handle.value
    del q
    gc.collect()
    assert freed[-1] == raw


# ----------------------------------------------------------------------------- the expert helper


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_collect_experts_gathers_the_expert_rows(kind):
    rng = np.random.default_rng(5)
    prompts = random_step(rng, n_prompts=12)
    p = calibrl.plan(prompts, dp_ranks=3, nograd_token_budget=700)
    R = p.num_rollouts
    # Each token's value encodes (sequence id, position): the expected outputs are plain sums.
    values = {q.id: q.id * 1000.0 + np.arange(q.response_len) for q in p.seqs}
    to = (lambda a: torch.tensor(a, dtype=F64)) if kind == "torch" else (lambda a: np.asarray(a, np.float64))
    packed = to(np.concatenate([values[q.id] for q in p.nograd_seqs()]))
    lp, sums = p.collect_experts(packed)
    _, means = p.collect_experts(packed, length_normalize=True, expert_logprobs=False)
    assert type(lp) is type(packed) and lp.dtype == packed.dtype
    want = np.concatenate([values[R + s] for s in range(len(p.expert_prompts))] or [np.zeros(0)])
    np.testing.assert_array_equal(np.asarray(lp), want)
    np.testing.assert_array_equal(np.asarray(sums), [values[R + s].sum() for s in range(len(p.expert_prompts))])
    np.testing.assert_allclose(np.asarray(means), [values[R + s].mean() for s in range(len(p.expert_prompts))])
    # One rank's part each: the outputs summed over ranks (an all-reduce) are the full ones.
    total_lp, total_sums = np.zeros_like(want), np.zeros(len(p.expert_prompts))
    for r in range(3):
        part = to(np.concatenate([values[q.id] for q in p.nograd_seqs(r)] or [np.zeros(0)]))
        a, b = p.collect_experts(part, rank=r)
        total_lp += np.asarray(a)
        total_sums += np.asarray(b)
    np.testing.assert_array_equal(total_lp, want)
    np.testing.assert_array_equal(total_sums, np.asarray(sums))


# ----------------------------------------------------------------------------- end to end


def pack(seqs, d, gather):
    """Loss inputs over `seqs` (packed layout), from per-id data."""
    lp = torch.cat([d["lp"][q.id] for q in seqs])
    lengths = torch.tensor([q.response_len for q in seqs])
    return lp, dict(
        seq_offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        old_logprobs=torch.cat([d["old"][q.id] for q in seqs]),
        advantages=torch.tensor([d["adv"][q.id] for q in seqs], dtype=F64),
        weights=torch.tensor([abs(d["adv"][q.id]) for q in seqs], dtype=F64),
        signs=torch.tensor([d["sign"][q.id] for q in seqs], dtype=F64),
        is_expert=torch.tensor([q.kind == SeqKind.EXPERT for q in seqs]),
        expert_index=torch.tensor([int(gather[q.id]) if q.kind == SeqKind.ROLLOUT else -1 for q in seqs]),
    )


@needs_loss
@pytest.mark.parametrize("kind", ["calibrl", "luffy"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_microbatch_losses_with_the_plans_normalizers_add_up_to_the_whole_batch(kind, agg):
    rng = np.random.default_rng(2)
    g = torch.Generator().manual_seed(2)
    prompts = random_step(rng, n_prompts=24)
    p = calibrl.plan(prompts, dp_ranks=3, nograd_token_budget=600, train_token_budget=500, minibatch_prompts=7, loss_kind=kind)
    cfg = calibrl.Config(loss=kind, agg=agg)
    d = {"lp": {}, "old": {}, "adv": {}, "sign": {}}
    for q in p.seqs:
        lp = -3.0 * torch.rand(q.response_len, generator=g, dtype=F64) - 0.01
        d["lp"][q.id] = lp
        d["old"][q.id] = lp + 0.6 * (torch.rand(q.response_len, generator=g, dtype=F64) - 0.5)
        d["adv"][q.id] = 2.0 * torch.rand(1, generator=g).item() - 1.0
        d["sign"][q.id] = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
    # The no-grad pass's output, through the expert helper, is the expert baseline.
    expert_lp, _ = p.collect_experts(torch.cat([d["lp"][q.id] for q in p.nograd_seqs()]), expert_sums=False)
    expert = dict(expert_logprobs=expert_lp, expert_offsets=torch.from_numpy(p.expert_offsets))

    for mb in p.minibatches:
        everything = sorted(mb.seqs(), key=lambda q: q.id)
        lp, inputs = pack(everything, d, p.gather_map)
        whole = calibrl.loss(cfg, lp, **inputs, **expert)
        n_tok, n_seq = whole.metrics["num_tokens"], whole.metrics["num_seqs"]
        assert {"token_count": n_tok, "seq_count": n_seq, "all_token_count": n_tok, "all_seq_count": n_seq} \
            == mb.normalizers
        want = dict(zip([q.id for q in everything], whole.grad_logprobs.split([q.response_len for q in everything])))

        got, loss_sum, local_sum, slices = {}, 0.0, 0.0, 0
        for rank in mb.train:
            for micro in rank:
                if not micro:
                    continue  # an empty micro-batch is a zero-token step
                lp, inputs = pack(micro, d, p.gather_map)
                r = calibrl.loss(cfg, lp, **inputs, **expert, normalizers=mb.normalizers)
                for q, grad in zip(micro, r.grad_logprobs.split([q.response_len for q in micro])):
                    assert q.id not in got
                    got[q.id] = grad
                loss_sum += r.loss
                local_sum += calibrl.loss(cfg, lp, **inputs, **expert).loss
                slices += 1
        assert slices > 1, "the mini-batch must be split for the test to mean anything"
        assert loss_sum == pytest.approx(whole.loss, rel=1e-10, abs=1e-12)
        assert got.keys() == want.keys()
        for i in want:
            torch.testing.assert_close(got[i], want[i], rtol=1e-10, atol=1e-14)
        assert local_sum != pytest.approx(whole.loss, rel=1e-6), "local counts must not add up (else the test proves nothing)"


def test_dynamic_sampling_leaves_out_all_equal_groups():
    """SPEC §7.6: groups whose rewards are all equal train nothing; they leave both passes, the
    normalisers and expert selection, and the plan reports them."""
    prompts = [
        Prompt(10, [5, 7, 9], expert_len=12, rewards=[1.0, 1.0, 1.0]),
        Prompt(4, [3, 3], expert_len=6, rewards=[0.0, 1.0]),
        Prompt(8, [2, 4], expert_len=5, rewards=[0.0, 0.0]),
    ]
    p = calibrl.plan(prompts, dynamic_sampling=True)
    assert p.dropped_prompts.tolist() == [0, 2] and p.summary["dropped_prompts"] == 2
    assert p.expert_prompts.tolist() == [1]
    assert sorted(q.id for q in p.nograd_seqs()) == [3, 4, 7]  # prompt 1's rollouts, its expert
    assert p.minibatches[0].normalizers == {
        "token_count": 6.0, "seq_count": 2.0, "all_token_count": 6.0, "all_seq_count": 2.0
    }
    off = calibrl.plan(prompts)
    assert off.dropped_prompts.tolist() == [] and off.expert_prompts.tolist() == [0, 1, 2]
    with pytest.raises(calibrl.CalibrlError, match=r"prompts\[0\]\.rewards"):
        calibrl.plan([Prompt(10, [5, 7])], dynamic_sampling=True)
