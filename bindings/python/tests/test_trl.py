"""The TRL drop-in against the real trl 1.16.0 (CPU): a tiny random Llama, an in-memory tokenizer.

- the `grpo` preset gives TRL's own GRPOTrainer loss and parameter gradient, per loss_type, with
  TRL's own terms on (β·KL, entropy bonus, top-entropy mask, off-policy mask, IS ratio, δ);
- CalibRL's terms equal the float64 reference of SPEC.md (spec_reference.py), and the expert
  pass and the correctness signs equal independent recomputations;
- 2 processes (gloo) × gradient accumulation 2 give the single-process mini-batch gradient;
- a few training steps run end to end and move the parameters.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.skipif(trl.__version__ != "1.16.0", reason=f"pinned trl 1.16.0, found {trl.__version__}")

import spec_reference as ref  # noqa: E402
import trl_harness as h  # noqa: E402

from calibrl import Config  # noqa: E402
from calibrl.integrations import trl as ctrl  # noqa: E402

HERE = Path(__file__).resolve().parent


def trainers(tmp_path, trl_args: dict, calibrl: dict, ds=None):
    path = h.save_model(tmp_path / "model")
    ds = h.dataset() if ds is None else ds
    tok = h.tokenizer()
    theirs = trl.GRPOTrainer(
        model=path,
        reward_funcs=h.reward_a,
        args=h.config(trl.GRPOConfig, tmp_path / "trl", **trl_args),
        train_dataset=ds,
        processing_class=tok,
    )
    ours = ctrl.CalibRLGRPOTrainer(
        model=path,
        reward_funcs=h.reward_a,
        args=h.config(ctrl.CalibRLGRPOConfig, tmp_path / "calibrl", calibrl=calibrl, **trl_args),
        train_dataset=ds,
        processing_class=tok,
    )
    for t in (theirs, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = t.args.gradient_accumulation_steps
    return theirs, ours, ds


def micro_batch(trainer, ds, seed=1, perturb_old=True):
    """TRL's own generation batch (generation, rewards, expert pass), first micro-batch; old
    log-probs perturbed so that the ratio clip and dual clip are exercised."""
    torch.manual_seed(seed)
    inputs = trainer._prepare_inputs(h.generation_batch(trainer, ds))
    if perturb_old:
        with torch.no_grad():
            lp, _, _ = per_token(trainer, inputs)
        g = torch.Generator().manual_seed(seed)
        inputs["old_per_token_logps"] = lp + 0.4 * torch.randn(lp.shape, generator=g)
    return inputs


def per_token(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    return trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, att, inputs["completion_ids"].size(1), compute_entropy=True
    )


def loss_and_grad(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def enable_is(trainer, inputs, seed=2):
    """TRL's vLLM importance-sampling path without vLLM: the loss reads only these."""
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    if "importance_sampling_ratio" not in inputs:
        g = torch.Generator().manual_seed(seed)
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(inputs["completion_mask"].shape, generator=g)


# --------------------------------------------------------------------------- grpo preset = TRL

TERMS = {
    "plain": {},
    "trl_terms": dict(
        beta=0.05, entropy_coef=0.02, top_entropy_quantile=0.6, off_policy_mask_threshold=0.05, delta=1.6
    ),
}


@pytest.mark.parametrize("terms", sorted(TERMS))
@pytest.mark.parametrize("loss_type", ctrl.LOSS_TYPES)
def test_grpo_preset_gives_trls_loss_and_gradient(tmp_path, loss_type, terms):
    args = dict(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=2, **TERMS[terms])
    theirs, ours, ds = trainers(tmp_path, args, {"preset": "grpo"})
    inputs = micro_batch(ours, ds)
    if terms == "trl_terms":
        enable_is(theirs, inputs)
        enable_is(ours, inputs)
    assert inputs["completion_mask"].sum() > 0 and ctrl.EXPERT_LOGPS not in inputs  # λ = 0: no expert pass
    l_theirs, g_theirs = loss_and_grad(theirs, inputs)
    l_ours, g_ours = loss_and_grad(ours, inputs)
    assert g_theirs.abs().max() > 0
    torch.testing.assert_close(l_ours, l_theirs, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2e-4, atol=1e-7)


# --------------------------------------------------------------------------- CalibRL = float64 SPEC


def spec_loss(ours, inputs, cfg: Config, lp64):
    """SPEC §4 in float64 with the normalisers TRL's loss_type gives (trl.normalization)."""
    mask = inputs["completion_mask"]
    agg, t_norm, norms = ctrl.normalization(
        ours.loss_type,
        rows=mask.shape[0],
        tokens=float(mask.sum()),
        grad_accum=ours.current_gradient_accumulation_steps,
        num_items_in_batch=float(inputs["num_items_in_batch"]),
        num_processes=1,
        steps_per_generation=ours.args.steps_per_generation,
        max_completion_length=ours.max_completion_length,
    )
    d = cfg.to_dict()
    d.update(agg=agg, t_norm=t_norm)
    adv = inputs["advantages"].double()
    expert = {}
    if ctrl.EXPERT_LOGPS in inputs:
        has = inputs[ctrl.EXPERT_MASK].bool().any(-1)
        expert = dict(
            expert_lp=inputs[ctrl.EXPERT_LOGPS].double(),
            expert_mask=inputs[ctrl.EXPERT_MASK].double(),
            expert_index=torch.where(has, torch.arange(len(has)), -1),
        )
    ref_lp = inputs.get("ref_per_token_logps")
    value, _ = ref.loss(
        d,
        lp64,
        mask,
        adv,
        adv.abs(),
        inputs[ctrl.CORRECT].double() * 2 - 1,
        old=inputs["old_per_token_logps"].double(),
        ref=None if ref_lp is None else ref_lp.double(),
        normalizers=norms,
        **expert,
    )
    return value


BLOCKS = {
    "paper": {"preset": "paper", "lambda": 0.3, "alpha": 0.4},
    "reference": {"preset": "reference", "lambda": 0.3, "alpha": 0.4},
    "ref_policy": {"preset": "paper", "lambda": 0.3, "baseline": "ref_policy"},  # Table 8: no expert pass
}


@pytest.mark.parametrize("loss_type", ctrl.LOSS_TYPES)
@pytest.mark.parametrize("preset", sorted(BLOCKS))
def test_calibrl_terms_equal_the_float64_reference(tmp_path, loss_type, preset):
    block = BLOCKS[preset]
    args = dict(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=2)
    if preset == "ref_policy":
        args["beta"] = 0.05  # TRL computes the reference log-probs only with β > 0
    _, ours, ds = trainers(tmp_path, args, block)
    inputs = micro_batch(ours, ds)
    assert (ctrl.EXPERT_LOGPS in inputs) == (preset != "ref_policy")
    ours.beta = 0.0  # CalibRL's terms alone (TRL's KL is checked against TRL itself)
    cfg = ctrl.config_from_trl(ours.args, "token-mean", None)
    lp, _, _ = per_token(ours, inputs)
    lp64 = lp.detach().double().requires_grad_(True)
    expected = spec_loss(ours, inputs, cfg, lp64)
    (dl_dlp,) = torch.autograd.grad(expected, lp64)
    params = [p for p in ours.model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(lp, params, dl_dlp.float(), allow_unused=True)
    expected_g = torch.cat([g.reshape(-1) for g in expected_grads if g is not None])

    loss, grads = loss_and_grad(ours, inputs)
    assert abs(float(expected.detach())) > 1e-6 and dl_dlp.abs().max() > 0
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads, expected_g, rtol=1e-4, atol=1e-6)


def test_expert_pass_and_correctness_equal_independent_recomputation(tmp_path):
    block = {"preset": "paper", "correct_threshold": 0.2}
    _, ours, ds = trainers(tmp_path, {"per_device_train_batch_size": 8}, block, ds=h.dataset(expert_as_ids=True))
    torch.manual_seed(3)
    rows = h.generation_batch(ours, ds)
    inputs = ours._generate_and_score_completions(rows)
    assert len({tuple(r["expert"]) for r in rows}) == 2  # two prompts, each with its own expert
    assert 0 < float(inputs[ctrl.CORRECT].sum()) < len(rows)  # both outcomes occur
    tok = ours.processing_class
    prompts, completions = inputs["prompt_ids"], inputs["completion_ids"]
    for i, row in enumerate(rows):
        # The expert: the row's prompt followed by its expert ids, one plain forward pass.
        p = prompts[i][inputs["prompt_mask"][i].bool()]
        e = torch.tensor(row["expert"])
        with torch.no_grad():
            logits = ours.model(torch.cat([p, e])[None]).logits[0].float()
        expected = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, e[:, None])[:, 0]
        n = int(inputs[ctrl.EXPERT_MASK][i].sum())
        assert n == len(e)
        torch.testing.assert_close(inputs[ctrl.EXPERT_LOGPS][i, :n], expected, rtol=1e-4, atol=1e-5)
        # Correctness: the reward of the decoded completion > τ (not the sign of A).
        c = completions[i][inputs["completion_mask"][i].bool()]
        reward = h.reward_a([tok.decode(c, skip_special_tokens=True)])[0]
        assert float(inputs[ctrl.CORRECT][i]) == float(reward > 0.2)


def test_expert_column_text_and_ids_give_the_same_rows(tmp_path):
    _, ours, _ = trainers(tmp_path, {"per_device_train_batch_size": 8}, {"preset": "paper"})
    torch.manual_seed(4)
    text = ours._generate_and_score_completions(h.generation_batch(ours, h.dataset()))
    ids_rows = h.generation_batch(ours, h.dataset(expert_as_ids=True))
    lp, mask = ours._expert_pass(ids_rows, text["prompt_ids"], text["prompt_mask"])
    torch.testing.assert_close(lp, text[ctrl.EXPERT_LOGPS])
    torch.testing.assert_close(mask, text[ctrl.EXPERT_MASK])


# --------------------------------------------------------------------------- 2 processes × GA 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_two_processes_with_accumulation_equal_one_process(tmp_path, loss_type):
    """One process on the 16-row mini-batch (GA 1) against 2 gloo processes × GA 2 (4 rows per
    micro-batch), DDP's gradient averaging done by an all-reduce: the same update."""
    block = {"preset": "paper", "lambda": 0.3}
    one = dict(loss_type=loss_type, beta=0.05, per_device_train_batch_size=16, gradient_accumulation_steps=1)
    _, ours, ds = trainers(tmp_path, one, block)
    inputs = micro_batch(ours, ds)
    assert inputs["completion_ids"].shape[0] == 16
    loss, grads = loss_and_grad(ours, inputs)
    torch.save({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}, tmp_path / "batch.pt")

    env = dict(os.environ, CALIBRL_TRL_LOSS_TYPE=loss_type, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(HERE / "trl_worker.py"), str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"),
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["world_size"] == 2 and out["micro_batches"] == 2
    torch.testing.assert_close(out["grads"], grads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["loss_sum"], loss, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- end to end


def test_training_steps_move_the_parameters(tmp_path):
    path = h.save_model(tmp_path / "model")
    args = h.config(
        ctrl.CalibRLGRPOConfig,
        tmp_path / "out",
        calibrl={"preset": "paper", "lambda": 0.2},
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        beta=0.02,
        max_steps=3,
    )
    trainer = ctrl.CalibRLGRPOTrainer(
        model=path, reward_funcs=h.reward_a, args=args, train_dataset=h.dataset(8), processing_class=h.tokenizer()
    )
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    moved = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2, moved
    logs = [e for e in trainer.state.log_history if "calibrl/explore_loss" in e]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


# --------------------------------------------------------------------------- bad configuration


def test_unsupported_options_are_clear_errors(tmp_path):
    path = h.save_model(tmp_path / "model")
    cases = [
        (dict(loss_type="cispo"), {}, "loss_type"),
        (dict(importance_sampling_level="sequence", loss_type="grpo"), {}, "importance_sampling_level"),
        ({}, {"kl_coef": 0.1}, "beta"),
        ({}, {"agg": "token-sum"}, "loss_type"),
        ({}, {"lamda": 0.1}, "lambda"),
    ]
    for trl_args, block, word in cases:
        with pytest.raises(Exception, match=word):
            ctrl.CalibRLGRPOTrainer(
                model=path,
                reward_funcs=h.reward_a,
                args=h.config(ctrl.CalibRLGRPOConfig, tmp_path / "o", calibrl=block, **trl_args),
                train_dataset=h.dataset(),
                processing_class=h.tokenizer(),
            )


# --------------------------------------------------------------------------- the README


def test_readme_change_is_counted_and_the_script_trains(tmp_path):
    import re

    repo = HERE.parents[2]
    text = (repo / "integration" / "trl" / "README.md").read_text()
    (diff,) = re.findall(r"```diff\n(.*?)```", text, re.S)
    (script,) = re.findall(r"```python\n(.*?)```", text, re.S)
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    stated = int(re.search(r"The change to your script: (\d+) lines", text).group(1))
    assert len(added) == stated
    assert all(line in script.splitlines() for line in added)
    top = (repo / "README.md").read_text()
    assert f"{stated} lines" in top[top.index("## With TRL") :]
    assert added[0] in top
    settings = dict(h.config(dict, tmp_path / "out"))
    ns = dict(
        model=h.save_model(tmp_path / "model"),
        tokenizer=h.tokenizer(),
        dataset=h.dataset(),
        reward_fn=h.reward_a,
        settings=settings,
    )
    exec(compile(script, "integration/trl/README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert isinstance(trainer, ctrl.CalibRLGRPOTrainer) and trainer.state.global_step == settings["max_steps"]
    assert any("calibrl/explore_loss" in e for e in trainer.state.log_history)
