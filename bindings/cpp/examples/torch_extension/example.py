"""Replaces a pure-PyTorch GRPO/CalibRL loss by the libcalibrl call through a C++ extension.

    python bindings/cpp/examples/torch_extension/example.py --prefix /opt/calibrl

builds calibrl_torch.cpp with torch.utils.cpp_extension.load against an installed calibrl
(scripts/install.sh --prefix ...), then checks the extension's loss and gradient against a
Python implementation of the clipped policy-gradient term (SPEC §4.1, grpo preset). Exits 0 on
agreement.
"""
import argparse
import json
import os
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))


def build(prefix):
    return load(
        name="calibrl_torch",
        sources=[os.path.join(HERE, "calibrl_torch.cpp")],
        extra_include_paths=[os.path.join(prefix, "include")],
        extra_cflags=["-O2"],
        extra_ldflags=[f"-L{prefix}/lib", "-lcalibrl", f"-Wl,-rpath,{prefix}/lib"],
        verbose=False,
    )


class CalibrlLoss(torch.autograd.Function):
    """loss = calibrl(logprobs, ...); d loss / d logprobs comes from the same library call."""

    @staticmethod
    def forward(ctx, ext, config_json, logprobs, seq_offsets, old, adv, w, signs, *expert):
        loss, grad, metrics = ext.loss_and_grad(
            config_json, logprobs.detach(), seq_offsets, old, adv, w, signs, *expert)
        ctx.save_for_backward(grad)
        ctx.num_expert_args = len(expert)
        ctx.metrics = metrics
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (None, None, grad * grad_out) + (None,) * (5 + ctx.num_expert_args)


def python_grpo_loss(logprobs, seq_offsets, old, adv, clip=0.2, dual=3.0):
    """The Python loss being replaced: token-mean clipped PG with dual clip (SPEC §4.1)."""
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).tolist()
    a = torch.repeat_interleave(adv, torch.tensor(lengths))
    ratio = torch.exp(logprobs - old)
    p1 = -a * ratio
    p2 = -a * torch.clamp(ratio, 1 - clip, 1 + clip)
    pc = torch.maximum(p1, p2)
    p = torch.where(a < 0, torch.minimum(pc, -a * dual), pc)
    return p.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True, help="calibrl install prefix")
    prefix = ap.parse_args().prefix
    ext = build(prefix)

    torch.manual_seed(0)
    seq_offsets = torch.tensor([0, 3, 7, 8, 12], dtype=torch.int64)
    T = int(seq_offsets[-1])
    logprobs = (-torch.rand(T, dtype=torch.float32) * 3).requires_grad_()
    old = (logprobs.detach() + 0.3 * torch.randn(T)).clamp(max=0.0)
    adv = torch.tensor([0.5, -0.25, 1.0, -1.0])
    w = adv.abs()
    signs = torch.where(adv > 0, torch.ones_like(adv), -torch.ones_like(adv))

    want = python_grpo_loss(logprobs, seq_offsets, old, adv)
    (want_grad,) = torch.autograd.grad(want, logprobs)
    cfg = json.dumps({"preset": "grpo"})
    got = CalibrlLoss.apply(ext, cfg, logprobs, seq_offsets, old, adv, w, signs)
    got.backward()
    print(f"python loss {want.item():.8f}  calibrl loss {got.item():.8f}")
    ok = torch.allclose(got.detach(), want.detach(), rtol=1e-5, atol=1e-6) and torch.allclose(
        logprobs.grad, want_grad, rtol=1e-5, atol=1e-6)
    try:
        ext.loss_and_grad(cfg, logprobs.detach(), seq_offsets, old, adv, w[:2], signs)
        ok = False
    except RuntimeError as e:  # the library's message, naming the argument
        print("error surfaced:", str(e).splitlines()[0])
        ok = ok and "`weights`" in str(e)
    print("torch extension:", "ok" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
