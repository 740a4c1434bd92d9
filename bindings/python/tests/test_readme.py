"""The READMEs' Python examples run as written: bindings/python/README.md's blocks, and the
repository README's program, whose loss and head gradient are checked against the float64
reference (spec_reference.py) on the same data."""

import re

import pytest
import torch

import spec_reference as ref
from conftest import HERE, REPO, needs_loss


def blocks(path):
    found = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert found, f"no python example in {path}"
    return found


@needs_loss
def test_bindings_readme_examples_run(capsys):
    for code in blocks(HERE.parent / "README.md"):
        exec(compile(code, "bindings/python/README.md", "exec"), {})
    assert "loss " in capsys.readouterr().out


@needs_loss
def test_repository_readme_program_matches_the_reference(capsys):
    (code,) = blocks(REPO / "README.md")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    printed = capsys.readouterr().out
    assert printed.startswith("loss "), printed

    # The same batch in float64 through SPEC written in PyTorch, differentiated by autograd.
    B, S, head, inputs = ns["B"], ns["S"], ns["head"], ns["inputs"]
    w64 = head.weight.detach().double().requires_grad_()
    logits64 = ns["hidden"].double() @ w64.T + head.bias.detach().double()
    lp, _, _ = ref.logits_outputs(logits64, ns["labels"], 1.0)
    total, _ = ref.loss(ns["calibrl"].Config("paper").to_dict(), lp.view(B, S), inputs.mask,
                        inputs.advantages, inputs.weights, inputs.signs,
                        expert_lp=inputs.expert_logprobs, expert_index=inputs.expert_index)
    total.backward()
    assert ns["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert float(printed.split()[1]) == pytest.approx(total.item(), abs=1e-4)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)
