#!/usr/bin/env python3
"""The CalibRL loss on log-prob inputs (SPEC §4, paper preset: clipped PG + exploration term
against the expert baseline), calibrl's CUDA kernels vs the same loss in PyTorch eager
(verl-style, autograd) and under torch.compile, on the same inputs in one process.

Bytes counted (the floor): read ℓ, ℓold (f32) and write ∂L/∂ℓ (f32) once: 12 bytes per token
(the per-sequence and expert inputs are negligible). Achieved bandwidth = bytes / median time,
as a fraction of a measured device-to-device copy. calibrl is timed two ways: plain launches,
and replays of a CUDA graph of the same call (removes the launch overhead of its 4 kernels).

Usage: PYTHONPATH=bindings/python CALIBRL_LIBRARY=.devbuild/lib/libcalibrl.so \
       python3 benchmarks/bench_loss.py [--tokens 1048576,16777216] [--out loss.csv]
"""

import argparse
import csv
import statistics

import torch

import calibrl


def time_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_gbps(nbytes=2 << 30):
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_batch(n_tokens, seq_len=1024, group=8, expert_len=512):
    b = n_tokens // seq_len
    p = b // group
    g = torch.Generator(device="cuda").manual_seed(0)
    lp = -torch.rand(n_tokens, device="cuda", generator=g) * 3
    old = lp + (torch.rand(n_tokens, device="cuda", generator=g) - 0.5) * 0.4
    rewards = (torch.rand(b, device="cuda", generator=g) < 0.3).float()
    gid = torch.arange(b, device="cuda") // group
    adv, w, c = calibrl.group_advantages(rewards, gid, p)
    inputs = calibrl.LossInputs(
        advantages=adv, weights=w, signs=c, old_logprobs=old,
        seq_offsets=torch.arange(0, n_tokens + 1, seq_len, device="cuda", dtype=torch.int64),
        expert_logprobs=-torch.rand(p * expert_len, device="cuda", generator=g),
        expert_offsets=torch.arange(0, p * expert_len + 1, expert_len, device="cuda", dtype=torch.int64),
        expert_index=gid,
    )
    return lp, inputs, seq_len


def torch_loss(lp, old, adv_tok, w_seq, c_seq, e_seq, seq_len, lam=0.1, alpha=0.5):
    """SPEC §4 paper preset in PyTorch (token-mean PG with dual clip; sequence exploration)."""
    ratio = torch.exp(lp - old)
    p1, p2 = -adv_tok * ratio, -adv_tok * ratio.clamp(0.8, 1.2)
    pc = torch.maximum(p1, p2)
    p = torch.where(adv_tok < 0, torch.minimum(pc, -adv_tok * 3.0), pc)
    s = lp.view(-1, seq_len).sum(1)
    x = -c_seq * (s - e_seq)
    phi = torch.where(x > 0, x, alpha * x)
    return p.mean() + lam * (w_seq * phi).mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1048576,16777216")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bw = copy_gbps()
    print(f"device: {torch.cuda.get_device_name()}; device-to-device copy {bw:.0f} GB/s", flush=True)
    cfg = calibrl.Config("paper")
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        lp, inputs, seq_len = make_batch(n)
        grad = torch.empty_like(lp)
        metrics = torch.empty(15, device="cuda", dtype=torch.float64)

        def run():
            calibrl.loss(cfg, lp, inputs, grad_logprobs=grad, metrics=metrics, host_metrics=False)

        # Correctness next to the timing: calibrl vs the eager implementation.
        rep = torch.repeat_interleave
        nseq = n // seq_len
        adv_tok = rep(inputs.advantages, seq_len)
        e_sum = inputs.expert_logprobs.view(-1, 512).sum(1)[inputs.expert_index]
        x = lp.clone().requires_grad_()
        torch_loss(x, inputs.old_logprobs, adv_tok, inputs.weights, inputs.signs, e_sum, seq_len).backward()
        run()
        torch.cuda.synchronize()
        err = ((grad - x.grad).abs().max() / x.grad.abs().max()).item()
        bytes_moved = 12 * n
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        s.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            run()
        results = {
            "calibrl": time_ms(run),
            "calibrl_graph": time_ms(graph.replay),
        }
        xx = lp.clone().requires_grad_()

        def eager():
            xx.grad = None
            torch_loss(xx, inputs.old_logprobs, adv_tok, inputs.weights, inputs.signs, e_sum, seq_len).backward()

        results["torch_eager"] = time_ms(eager)
        compiled = torch.compile(torch_loss, dynamic=False)

        def comp():
            xx.grad = None
            compiled(xx, inputs.old_logprobs, adv_tok, inputs.weights, inputs.signs, e_sum, seq_len).backward()

        results["torch_compile"] = time_ms(comp)
        for name, ms in results.items():
            gbps = bytes_moved / (ms * 1e-3) / 1e9
            row = dict(tokens=n, seqs=nseq, method=name, ms=round(ms, 4), gbps=round(gbps, 1),
                       pct_of_copy=round(100 * gbps / bw, 1), max_rel_grad_err=f"{err:.1e}")
            rows.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    print(f"\n{'tokens':>9} {'method':<15} {'ms':>9} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        print(f"{r['tokens']:>9} {r['method']:<15} {r['ms']:>9.4f} {r['gbps']:>7.0f} {r['pct_of_copy']:>6.1f}")


if __name__ == "__main__":
    main()
