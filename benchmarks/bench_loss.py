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


def make_batch(n_tokens, seq_len=1024, group=8, expert_len=512, dtype=torch.float32):
    b = n_tokens // seq_len
    group = min(group, b)
    p = b // group
    expert_len = min(expert_len, seq_len)
    g = torch.Generator(device="cuda").manual_seed(0)
    lp = (-torch.rand(n_tokens, device="cuda", generator=g) * 3).to(dtype)
    old = (lp.float() + (torch.rand(n_tokens, device="cuda", generator=g) - 0.5) * 0.4).to(dtype)
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
    return lp, inputs, seq_len, expert_len


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


def torch_reference_loss(lp, old, adv_tok, w_tok, c_tok, e_tok, lam=0.1, alpha=0.5):
    """The authors' released loss arithmetic (the `reference` preset: token-aligned Δ against the
    expert's log-prob at the same position, token-mean of PG + λ·w·φ(x))."""
    ratio = torch.exp(lp - old)
    p1, p2 = -adv_tok * ratio, -adv_tok * ratio.clamp(0.8, 1.2)
    pc = torch.maximum(p1, p2)
    p = torch.where(adv_tok < 0, torch.minimum(pc, -adv_tok * 3.0), pc)
    x = -c_tok * (lp - e_tok)
    phi = torch.where(x > 0, x, alpha * x)
    return (p + lam * w_tok * phi).mean()


def empty_graph_us():
    """Replay latency of a CUDA graph holding one trivial kernel (the floor for one launch)."""
    x = torch.zeros(1, device="cuda")
    return 1000 * time_ms(graph_of(lambda: x.add_(1)).replay, 200, 20)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        fn()
    return graph


def shape_rows(cfg, bw, shapes):
    """calibrl alone on other row shapes and dtypes: ns per token next to the 1024-token rows."""
    rows = []
    for n, seq_len, dtype in shapes:
        lp, inputs, seq_len, _ = make_batch(n, seq_len, dtype=dtype)
        grad = torch.empty_like(lp)
        metrics = torch.empty(15, device="cuda", dtype=torch.float64)

        def run():
            calibrl.loss(cfg, lp, inputs, grad_logprobs=grad, metrics=metrics, host_metrics=False)

        run()
        first = grad.clone()
        run()
        torch.cuda.synchronize()
        deterministic = bool(torch.equal(first, grad))
        graph = graph_of(run)
        elem = lp.element_size()
        for name, ms in (("calibrl", time_ms(run)), ("calibrl_graph", time_ms(graph.replay))):
            gbps = (3 * elem * n) / (ms * 1e-3) / 1e9
            rows.append(dict(tokens=n, seqs=n // seq_len, method=f"{name}[{seq_len}-tok rows,{str(dtype)[6:]}]",
                             ms=round(ms, 4), gbps=round(gbps, 1), pct_of_copy=round(100 * gbps / bw, 1),
                             max_rel_grad_err=f"ns/token {1e6 * ms / n:.4f}; bitwise repeat {deterministic}"))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1048576,16777216")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-shapes", action="store_true", help="skip the other row shapes and dtypes")
    args = ap.parse_args()
    bw = copy_gbps()
    print(f"device: {torch.cuda.get_device_name()}; device-to-device copy {bw:.0f} GB/s", flush=True)
    cfg = calibrl.Config("paper")
    empty_us = empty_graph_us()
    print(f"empty-kernel graph replay: {empty_us:.2f} us", flush=True)
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        lp, inputs, seq_len, expert_len = make_batch(n)
        grad = torch.empty_like(lp)
        metrics = torch.empty(15, device="cuda", dtype=torch.float64)

        def run():
            calibrl.loss(cfg, lp, inputs, grad_logprobs=grad, metrics=metrics, host_metrics=False)

        # Correctness next to the timing: calibrl vs the eager implementation.
        rep = torch.repeat_interleave
        nseq = n // seq_len
        adv_tok = rep(inputs.advantages, seq_len)
        e_sum = inputs.expert_logprobs.view(-1, expert_len).sum(1)[inputs.expert_index]
        x = lp.clone().requires_grad_()
        torch_loss(x, inputs.old_logprobs, adv_tok, inputs.weights, inputs.signs, e_sum, seq_len).backward()
        run()
        torch.cuda.synchronize()
        err = ((grad - x.grad).abs().max() / x.grad.abs().max()).item()
        bytes_moved = 12 * n
        results = {
            "calibrl": time_ms(run),
            "calibrl_graph": time_ms(graph_of(run).replay),
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

        # The `reference` preset (token-aligned Δ, the authors' released arithmetic) against
        # the same arithmetic in PyTorch under torch.compile.
        ref_cfg = calibrl.Config("reference")

        def run_ref():
            calibrl.loss(ref_cfg, lp, inputs, grad_logprobs=grad, metrics=metrics, host_metrics=False)

        e_rows = inputs.expert_logprobs.view(-1, expert_len)[inputs.expert_index]
        e_tok = torch.nn.functional.pad(e_rows, (0, seq_len - expert_len)).reshape(-1)
        w_tok, c_tok = rep(inputs.weights, seq_len), rep(inputs.signs, seq_len)
        compiled_ref = torch.compile(torch_reference_loss, dynamic=False)

        def comp_ref():
            xx.grad = None
            compiled_ref(xx, inputs.old_logprobs, adv_tok, w_tok, c_tok, e_tok).backward()

        xr = lp.clone().requires_grad_()
        torch_reference_loss(xr, inputs.old_logprobs, adv_tok, w_tok, c_tok, e_tok).backward()
        run_ref()
        torch.cuda.synchronize()
        err_ref = ((grad - xr.grad).abs().max() / xr.grad.abs().max()).item()
        print(f"reference preset: max relative gradient difference to PyTorch {err_ref:.1e}", flush=True)
        results["calibrl_reference"] = time_ms(run_ref)
        results["calibrl_reference_graph"] = time_ms(graph_of(run_ref).replay)
        results["torch_compile_reference"] = time_ms(comp_ref)
        for name, ms in results.items():
            gbps = bytes_moved / (ms * 1e-3) / 1e9
            row = dict(tokens=n, seqs=nseq, method=name, ms=round(ms, 4), gbps=round(gbps, 1),
                       pct_of_copy=round(100 * gbps / bw, 1), max_rel_grad_err=f"{err:.1e}")
            rows.append(row)
            print(row, flush=True)
    if not args.no_shapes:
        rows += shape_rows(cfg, bw, [
            (1 << 20, 16, torch.float32), (1 << 20, 4096, torch.float32), (8 * 4096, 4096, torch.float32),
            (1 << 20, 1024, torch.bfloat16), (1 << 24, 1024, torch.bfloat16),
        ])
    print(f"empty-kernel graph replay: {empty_us:.2f} us", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    print(f"\n{'tokens':>9} {'method':<44} {'ms':>9} {'GB/s':>7} {'%copy':>6}  note")
    for r in rows:
        print(f"{r['tokens']:>9} {r['method']:<44} {r['ms']:>9.4f} {r['gbps']:>7.0f} {r['pct_of_copy']:>6.1f}  {r['max_rel_grad_err']}")


if __name__ == "__main__":
    main()
