#!/usr/bin/env python3
"""Fused linear path on the CPU: calibrl's chunked GEMMs + fused logits arithmetic against the
materialised path (PyTorch CPU's ``hidden @ W.T``, calibrl's fused logits forward/backward on
the ``[N, V]`` logits, PyTorch's matmuls for ``d_hidden``/``d_weight``), forward + backward
with entropy, in the same run.

Methods: ``materialised``; for bf16 also ``materialised-f32`` (the same path on float32 copies
of the bf16 hidden states and weight: the faster choice on CPUs without native bf16 dot
products, where PyTorch's bf16 matmul is emulated); ``fused`` (forward, then a backward that
recomputes each chunk: 4 GEMMs, for losses that need whole-sequence sums first);
``fused-1pass`` (the combined call: 3 GEMMs, for token-local losses whose ∂L/∂ℓ is known
before the call).

Each (method, size, dtype) runs in its own process: after a warm-up on a vocabulary slice, the
high-water RSS is reset (/proc/self/clear_refs) and the peak extra memory is the high-water RSS
of one call minus the RSS before it (outputs, i.e. log-probs, d_hidden and d_weight, are listed
apart from the working memory); the time is the median of ``--iters`` runs after that first
one. Prints a table and the ratios against the faster materialised baseline.

Usage: PYTHONPATH=bindings/python CALIBRL_LIBRARY=target/release/libcalibrl.so \\
       python3 benchmarks/bench_fused_linear.py [--sizes 1024x512x32000,1024x512x152064]
       [--dtypes f32,bf16] [--chunk 256] [--iters 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("materialised", "fused", "fused-1pass")
# bf16 only: the materialised path on float32 copies (a baseline, not a calibrl method).
BF16_BASELINES = ("materialised-f32",)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Resets the process's high-water RSS (Linux >= 4.0), so that a warm-up does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_one(method: str, n: int, h: int, v: int, dtype: str, chunk: int, iters: int) -> dict:
    import torch

    import calibrl
    from calibrl import linear

    torch.manual_seed(0)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden = torch.randn(n, h).to(dt)
    weight = (torch.randn(v, h) / h**0.5).to(dt)
    labels = torch.randint(0, v, (n,))
    g = torch.randn(n) / n
    gh = torch.randn(n) / n

    def materialised():
        logits = hidden @ weight.T
        lp, ent, lse = calibrl.logits_forward(logits, labels)
        dz = calibrl.logits_backward(logits, labels, lse, g, entropy=ent, grad_entropy=gh, out=logits)
        d_hidden = dz @ weight
        d_weight = dz.T @ hidden
        return lp, d_hidden, d_weight

    def materialised_f32():
        h32, w32 = hidden.float(), weight.float()
        logits = h32 @ w32.T
        lp, ent, lse = calibrl.logits_forward(logits, labels)
        dz = calibrl.logits_backward(logits, labels, lse, g, entropy=ent, grad_entropy=gh, out=logits)
        return lp, (dz @ w32).to(hidden.dtype), (dz.T @ h32).to(weight.dtype)

    def fused():
        lp, ent, lse = linear.forward(hidden, weight, labels, chunk_size=chunk)
        dh, dw, _ = linear.backward(hidden, weight, labels, lse, g, entropy=ent, grad_entropy=gh, chunk_size=chunk)
        return lp, dh, dw

    def fused_1pass():
        r = linear.forward_backward(hidden, weight, labels, g, grad_entropy=gh, chunk_size=chunk)
        return r["logprobs"], r["d_hidden"], r["d_weight"]

    fn = {"materialised": materialised, "materialised-f32": materialised_f32, "fused": fused, "fused-1pass": fused_1pass}[method]
    torch.set_num_threads(os.cpu_count() or 1)
    # Warm-up on a slice of the vocabulary: loads the library, starts the thread pools, sizes
    # the GEMM packing buffers; then the peak is reset so that only the measured call counts.
    full_weight, weight = weight, weight[: max(1, v // 64)].clone()
    labels_full, labels = labels, labels % weight.shape[0]
    fn()
    weight, labels = full_weight, labels_full
    reset_peak()
    base = rss_bytes()
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    peak = peak_rss_bytes() - base
    # What the call returns (log-probs, d_hidden, d_weight) is output, not working memory.
    out_bytes = sum(t.numel() * t.element_size() for t in out)
    del out
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(method=method, n=n, h=h, v=v, dtype=dtype, chunk=chunk, first_s=first,
                median_s=statistics.median(times) if times else first,
                peak_extra_mb=peak / 2**20, outputs_mb=out_bytes / 2**20,
                working_mb=(peak - out_bytes) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024x512x32000,1024x512x152064")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        method, n, h, v, dtype = a.one.split(",")
        print(json.dumps(run_one(method, int(n), int(h), int(v), dtype, a.chunk, a.iters)))
        return
    rows = []
    for size in a.sizes.split(","):
        n, h, v = (int(x) for x in size.split("x"))
        for dtype in a.dtypes.split(","):
            methods = METHODS + (BF16_BASELINES if dtype == "bf16" else ())
            for method in methods:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", f"{method},{n},{h},{v},{dtype}",
                     "--chunk", str(a.chunk), "--iters", str(a.iters)],
                    check=True, capture_output=True, text=True,
                ).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"N={n} H={h} V={v} {dtype:4} {method:12} median {r['median_s']:.3f} s "
                      f"(first {r['first_s']:.3f} s)  peak extra {r['peak_extra_mb']:.0f} MiB "
                      f"(outputs {r['outputs_mb']:.0f}, working {r['working_mb']:.0f})", flush=True)
            these = rows[-len(methods):]
            base = min((r for r in these if r["method"].startswith("materialised")),
                       key=lambda r: r["median_s"])
            print(f"    baseline: {base['method']}", flush=True)
            for r in these:
                if r["method"].startswith("materialised"):
                    continue
                print(f"    {r['method']:12} time ×{r['median_s'] / base['median_s']:.2f}, working memory "
                      f"{r['working_mb']:.0f} vs {base['working_mb']:.0f} MiB "
                      f"(chunk·V·4 = {a.chunk * v * 4 / 2**20:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
