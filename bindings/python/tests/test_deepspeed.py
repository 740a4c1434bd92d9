"""DeepSpeed: the README's training step on a real DeepSpeedEngine (CPU accelerator, gloo),
checked against the same step done with plain PyTorch + calibrl."""

import importlib.util
import os
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
EXAMPLE = REPO / "integration" / "deepspeed" / "example_train.py"
sys.path.insert(0, str(EXAMPLE.parent))
import example_train  # noqa: E402


def test_deepspeed_step_equals_plain_pytorch(tmp_path):
    out = tmp_path / "ds.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    run = subprocess.run([sys.executable, str(EXAMPLE), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ds = torch.load(out)
    assert ds["global_steps"] == 1

    # The same step without DeepSpeed: accumulate the two micro-batches' gradients, SGD.
    model = example_train.TinyLM()
    losses = []
    for b in example_train.make_batches():
        logits = model(b["input_ids"])
        n = b["labels"].numel()
        labels = torch.where(b["inputs"].mask.reshape(n) != 0, b["labels"].reshape(n), -1)
        loss, _ = calibrl.fused_logits_calibrl_loss(logits.reshape(n, -1), labels, b["inputs"], example_train.CFG,
                                                    token_shape=b["labels"].shape)
        loss.backward()
        losses.append(loss.item())
    lr = example_train.DS_CONFIG["optimizer"]["params"]["lr"]
    with torch.no_grad():
        expected_head = model.head - lr * model.head.grad
        expected_emb = model.embedding - lr * model.embedding.grad
    assert model.head.grad.abs().sum() > 0
    assert [m["loss"] for m in ds["metrics"]] == pytest.approx(losses, rel=1e-6)
    torch.testing.assert_close(ds["head"], expected_head, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ds["embedding"], expected_emb, atol=1e-6, rtol=1e-5)
