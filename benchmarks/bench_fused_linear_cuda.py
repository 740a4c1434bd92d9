#!/usr/bin/env python3
"""Fused linear path on CUDA (issue 33): calibrl's cuBLAS GEMMs + fused logits kernels against
the materialised path and the fused kernels users compare us with, forward + backward, bf16,
every peer in the same run. NOT YET RUN: written without a GPU; the figures go to docs/perf.md
with the device and the commit once it has run.

Methods (each in its own process; time = median of ``--iters`` CUDA-event timings after two
warm-up calls; peak extra = ``torch.cuda.max_memory_allocated`` during one call minus the
memory allocated before it, inputs excluded, outputs included):
- ``materialised``: ``hidden @ W.T`` (cuBLAS via PyTorch), calibrl's fused logits forward and
  in-place backward on the ``[N, V]`` logits, ``dz @ W`` and ``dz.T @ hidden``;
- ``calibrl`` (forward, then a backward that recomputes each chunk: 4 GEMMs, the ``paper``
  form), ``calibrl-1pass`` (the combined call: 3 GEMMs, token-local losses);
- ``liger-grpo``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (no entropy, no reference model);
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` (no entropy);
- ``verl``: verl's fused ``linear_cross_entropy`` (log-probs and entropy).
A peer that is not installed is reported as such, not skipped silently.

Usage: PYTHONPATH=bindings/python CALIBRL_LIBRARY=target/release/libcalibrl.so \\
       python3 benchmarks/bench_fused_linear_cuda.py [--sizes 16384x4096x152064,...]
       [--chunk 2048] [--iters 5] [--methods materialised,calibrl,...]
"""

import argparse
import json
import statistics
import subprocess
import sys

METHODS = ("materialised", "calibrl", "calibrl-1pass", "liger-grpo", "cce", "verl")


def make(method, hidden, weight, labels, g, gh, chunk):
    import torch

    import calibrl
    from calibrl import linear

    if method == "materialised":
        def step():
            logits = hidden @ weight.T
            lp, ent, lse = calibrl.logits_forward(logits, labels)
            dz = calibrl.logits_backward(logits, labels, lse, g, entropy=ent, grad_entropy=gh, out=logits)
            return lp, dz @ weight, dz.T @ hidden
        return step
    if method == "calibrl":
        def step():
            lp, ent, lse = linear.forward(hidden, weight, labels, chunk_size=chunk)
            dh, dw, _ = linear.backward(hidden, weight, labels, lse, g, entropy=ent, grad_entropy=gh,
                                        chunk_size=chunk)
            return lp, dh, dw
        return step
    if method == "calibrl-1pass":
        def step():
            r = linear.forward_backward(hidden, weight, labels, g, grad_entropy=gh, chunk_size=chunk)
            return r["logprobs"], r["d_hidden"], r["d_weight"]
        return step
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    if method == "liger-grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
        n = hidden.shape[0]
        mask = torch.ones(1, n, device=hidden.device)
        adv = torch.randn(1, device=hidden.device)

        def step():
            loss, _ = loss_fn(_input=h.view(1, n, -1), lin_weight=w, selected_token_ids=labels.view(1, n),
                              attention_mask=mask, advantages=adv)
            loss.backward()
            return loss, h.grad, w.grad
        return step
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():
            loss = linear_cross_entropy(h, w, labels)
            loss.backward()
            return loss, h.grad, w.grad
        return step
    if method == "verl":
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        def step():
            lp, ent = linear_cross_entropy(h, w, labels, 1.0, "none")
            ((lp * g).sum() + (ent * gh).sum()).backward()
            return lp, h.grad, w.grad
        return step
    raise ValueError(method)


def run_one(method: str, n: int, hdim: int, v: int, chunk: int, iters: int) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden = torch.randn(n, hdim, device=dev).bfloat16()
    weight = (torch.randn(v, hdim, device=dev) / hdim**0.5).bfloat16()
    labels = torch.randint(0, v, (n,), device=dev)
    g = torch.randn(n, device=dev) / n
    gh = torch.randn(n, device=dev) / n
    try:
        step = make(method, hidden, weight, labels, g, gh, chunk)
    except ImportError as e:
        return dict(method=method, n=n, h=hdim, v=v, missing=str(e))
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return dict(method=method, n=n, h=hdim, v=v, chunk=chunk, median_s=statistics.median(times),
                peak_extra_mb=peak / 2**20, device=torch.cuda.get_device_name())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384x4096x152064,4096x4096x32000,65536x4096x152064")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        method, n, h, v = a.one.split(",")
        print(json.dumps(run_one(method, int(n), int(h), int(v), a.chunk, a.iters)))
        return
    for size in a.sizes.split(","):
        n, h, v = (int(x) for x in size.split("x"))
        rows = []
        for method in a.methods.split(","):
            p = subprocess.run([sys.executable, __file__, "--one", f"{method},{n},{h},{v}", "--chunk",
                                str(a.chunk), "--iters", str(a.iters)], capture_output=True, text=True)
            if p.returncode != 0:
                print(f"N={n} H={h} V={v} {method:14} FAILED: {p.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            if "missing" in r:
                print(f"N={n} H={h} V={v} {method:14} not installed ({r['missing']})", flush=True)
                continue
            print(f"N={n} H={h} V={v} {method:14} median {r['median_s'] * 1e3:8.2f} ms  peak extra "
                  f"{r['peak_extra_mb']:8.0f} MiB  ({r['device']})", flush=True)
        base = next((r for r in rows if r["method"] == "materialised" and "median_s" in r), None)
        for r in rows:
            if base and "median_s" in r and r is not base:
                print(f"    {r['method']:14} ×{r['median_s'] / base['median_s']:.2f} of materialised", flush=True)


if __name__ == "__main__":
    main()
