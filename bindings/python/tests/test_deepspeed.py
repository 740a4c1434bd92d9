"""DeepSpeed (the real package, CPU accelerator, gloo): the update at data-parallel size 2 ×
gradient accumulation 2, with ZeRO stages 0 to 3, equals the single-process mini-batch update
(the expert carried per row in the ranks' micro-batches, one row per prompt in the reference);
the no-grad helper; bad input."""

import importlib.util
import subprocess
import sys

import pytest
import torch

import calibrl
from conftest import REPO, needs_loss

pytestmark = [
    needs_loss,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
DIR = REPO / "integration" / "deepspeed"
sys.path.insert(0, str(DIR))
import example_train as ex  # noqa: E402

STAGES = (0, 1, 2, 3)  # ZeRO-3 keeps these tiny parameters whole (persistence threshold)


def single_process_update():
    """The whole mini-batch in one loss call (no DeepSpeed, no splitting), plain SGD."""
    model = ex.TinyLM()
    b = ex.make_minibatch(per_row=False)
    logits = model(b["input_ids"])
    n = b["labels"].numel()
    labels = torch.where(b["inputs"].mask.reshape(n) != 0, b["labels"].reshape(n), -1)
    loss, metrics = calibrl.fused_logits_calibrl_loss(logits.reshape(n, -1), labels, b["inputs"], ex.CFG,
                                                      token_shape=b["labels"].shape)
    loss.backward()
    with torch.no_grad():
        return {
            "loss": loss.item(),
            "embedding": model.embedding - ex.LR * model.embedding.grad,
            "head": model.head - ex.LR * model.head.grad,
            "step_size": ex.LR * max(model.embedding.grad.abs().max(), model.head.grad.abs().max()),
        }


@pytest.fixture(scope="module")
def dp2_ga2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    script = f"import sys; sys.path.insert(0, {str(DIR)!r}); import example_train as ex; ex.run({str(out)!r}, 2, {STAGES!r})"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_dp2_ga2_update_equals_single_process_minibatch(dp2_ga2, stage):
    ref = single_process_update()
    assert ref["step_size"] > 0.05  # the update is not lost in the weights' rounding
    for r in dp2_ga2:
        res = r[stage]
        assert res["global_steps"] == 1
        for name in ("embedding", "head"):
            torch.testing.assert_close(res[name], ref[name], rtol=1e-6, atol=1e-6 * ref["step_size"])
    # The partial losses of the 4 micro-batches (2 ranks × GA 2) add up to the mini-batch loss.
    total = sum(m["loss"] for r in dp2_ga2 for m in r[stage]["metrics"])
    assert total == pytest.approx(ref["loss"], rel=1e-6)


class _Engine:
    """Just what train_micro_batch and logprobs call on a DeepSpeedEngine."""

    def __init__(self, model, ga=1, dp=1):
        self.model, self.ga, self.dp_world_size, self.calls = model, ga, dp, []

    def __call__(self, input_ids):
        return self.model(input_ids)

    def gradient_accumulation_steps(self):
        return self.ga

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")


def test_logprobs_no_grad_pass_matches_log_softmax():
    model = ex.TinyLM()
    b = ex.make_minibatch()
    lp = calibrl.integrations.deepspeed.logprobs(_Engine(model), b, mask=b["inputs"].mask)
    ref = torch.log_softmax(model(b["input_ids"]).double(), -1).gather(-1, b["labels"][..., None])[..., 0]
    ref = ref * b["inputs"].mask
    assert not lp.requires_grad
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)


def test_bad_input_names_the_argument_and_writes_nothing():
    model = ex.TinyLM()
    b = ex.make_minibatch()
    eng = _Engine(model)
    missing = dict(b, inputs=b["inputs"].map_tensors(lambda t: t))
    missing["inputs"].expert_logprobs = None
    with pytest.raises(ValueError, match=r"expert_logprobs"):
        calibrl.integrations.deepspeed.train_micro_batch(eng, missing, ex.CFG)
    short = dict(b, inputs=b["inputs"].map_tensors(lambda t: t))
    short["inputs"].advantages = short["inputs"].advantages[:-1]
    with pytest.raises(ValueError, match=r"advantages"):
        calibrl.integrations.deepspeed.train_micro_batch(eng, short, ex.CFG)
    assert eng.calls == [] and model.embedding.grad is None and model.head.grad is None
