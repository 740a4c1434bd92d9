#!/usr/bin/env python3
"""Fused logits path: calibrl (C ABI via ctypes) vs PyTorch eager vs torch.compile (vs Liger's
cross-entropy when `liger_kernel` imports), forward + backward with entropy.

For each (N, V) and method: median time over CUDA-event-timed iterations, peak extra device
memory of one fwd+bwd (over what the inputs already hold), and for calibrl the achieved bandwidth
(3·N·V·elem bytes: the forward reads the logits, the backward reads them and writes d-logits in
place) as a fraction of a measured device-to-device copy (2 bytes moved per byte copied).

Also checks calibrl against PyTorch eager (f32) on the first configuration.

Usage: python3 benchmarks/bench_logits.py --lib .devbuild/lib/libcalibrl.so [--out bench.csv]
       [--sizes 4096x32000,16384x152064] [--dtype bf16] [--iters 10] [--budget-s 240]
"""

import argparse
import csv
import ctypes
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
from calibrl._abi import DLDataType, DLDevice, DLTensor, LossArgs  # noqa: E402  (the ABI's ctypes structures)

# --------------------------------------------------------------------------------------------
# DLPack descriptors over torch tensors


DTYPES = {
    torch.float32: (2, 32),
    torch.float16: (2, 16),
    torch.bfloat16: (4, 16),
    torch.float64: (2, 64),
    torch.int64: (0, 64),
    torch.int32: (0, 32),
}


class Desc:
    """A DLTensor over a torch tensor (keeps the shape/strides arrays alive)."""

    def __init__(self, t):
        code, bits = DTYPES[t.dtype]
        self.shape = (ctypes.c_int64 * t.dim())(*t.shape)
        self.strides = (ctypes.c_int64 * t.dim())(*t.stride())
        dev = DLDevice(2, t.device.index or 0) if t.is_cuda else DLDevice(1, 0)
        self.t = DLTensor(t.data_ptr(), dev, t.dim(), DLDataType(code, bits, 1), self.shape, self.strides, 0)

    @property
    def ref(self):
        return ctypes.byref(self.t)


NULL = None


class Calibrl:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        T, S = ctypes.POINTER(DLTensor), ctypes.c_void_p  # descriptor, stream
        self.lib.calibrl_logits_forward.argtypes = [T, T, ctypes.c_double, T, T, T, S]
        self.lib.calibrl_logits_forward.restype = ctypes.c_int
        self.lib.calibrl_logits_backward.argtypes = [T, T, ctypes.c_double, ctypes.c_int64, T, T, T, T, T, S]
        self.lib.calibrl_logits_backward.restype = ctypes.c_int
        # Forward + backward in one call (issue 35; calibrl.logits_forward_backward in the
        # bindings): called here through the same ctypes layer as the rows it is compared with.
        self.lib.calibrl_logits_forward_backward.argtypes = [T, T, ctypes.c_double, T, T, T, T, T, T, S]
        self.lib.calibrl_logits_forward_backward.restype = ctypes.c_int
        self.lib.calibrl_last_error_message.restype = ctypes.c_char_p
        self.lib.calibrl_config_new.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.calibrl_config_new.restype = ctypes.c_int
        self.lib.calibrl_loss.argtypes = [ctypes.c_void_p, ctypes.POINTER(LossArgs), ctypes.c_void_p, S]
        self.lib.calibrl_loss.restype = ctypes.c_int

    def config(self, json):
        cfg = ctypes.c_void_p()
        self._check(self.lib.calibrl_config_new(json.encode(), ctypes.byref(cfg)), "calibrl_config_new")
        return cfg

    def loss(self, cfg, **tensors):
        """calibrl_loss with the named tensors of calibrl_loss_args (others NULL), on device."""
        descs = {k: Desc(v) for k, v in tensors.items()}
        args = LossArgs(**{k: ctypes.pointer(d.t) for k, d in descs.items()})
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.lib.calibrl_loss(cfg, ctypes.byref(args), None, stream), "calibrl_loss")

    def _check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: status {status}: {self.lib.calibrl_last_error_message().decode()}")

    def forward(self, logits, labels, temperature, logprobs, entropy, lse):
        d = [Desc(x) for x in (logits, labels, logprobs, entropy, lse)]
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(
            self.lib.calibrl_logits_forward(d[0].ref, d[1].ref, temperature, d[2].ref, d[3].ref, d[4].ref, stream),
            "calibrl_logits_forward",
        )

    def backward(self, logits, labels, temperature, lse, entropy, grad_lp, grad_ent, grad_logits):
        d = [Desc(x) for x in (logits, labels, lse, entropy, grad_lp, grad_ent, grad_logits)]
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(
            self.lib.calibrl_logits_backward(
                d[0].ref, d[1].ref, temperature, 0, d[2].ref, d[3].ref, d[4].ref, d[5].ref, d[6].ref, stream
            ),
            "calibrl_logits_backward",
        )

    def forward_backward(self, logits, labels, temperature, grad_lp, grad_ent, logprobs, entropy, lse, grad_logits):
        d = [Desc(x) for x in (logits, labels, grad_lp, grad_ent, logprobs, entropy, lse, grad_logits)]
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(
            self.lib.calibrl_logits_forward_backward(
                d[0].ref, d[1].ref, temperature, d[2].ref, d[3].ref, d[4].ref, d[5].ref, d[6].ref, d[7].ref, stream
            ),
            "calibrl_logits_forward_backward",
        )


# --------------------------------------------------------------------------------------------
# Methods: each returns a closure running one forward + backward.


def torch_loss(logits, labels, temperature, g, h):
    u = logits.float() / temperature
    logp = torch.log_softmax(u, dim=-1)
    valid = labels >= 0
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return (lp * g).sum() + (ent * h).sum(), lp, ent


def make_torch(logits, labels, temperature, g, h, compiled):
    x = logits.detach().clone().requires_grad_(True)
    fn = torch.compile(torch_loss, dynamic=False) if compiled else torch_loss

    def step():
        x.grad = None
        loss, _, _ = fn(x, labels, temperature, g, h)
        loss.backward()

    return step, x


def make_calibrl(lib, logits, labels, temperature, g, h):
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    lp, ent, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)

    def step():
        lib.forward(logits, labels, temperature, lp, ent, lse)
        lib.backward(logits, labels, temperature, lse, ent, g, h, logits)  # in place

    return step, (lp, ent, lse)


def make_calibrl_single_pass(lib, logits, labels, temperature, g, h):
    """The same work as `make_calibrl` (∂L/∂ℓ, ∂L/∂H known before the call) in one call: on sm_90+
    the single-pass cluster kernel where the row fits (2·N·V elements moved), else the same three
    passes."""
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    lp, ent, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)

    def step():
        lib.forward_backward(logits, labels, temperature, g, h, lp, ent, lse, logits)  # in place

    return step, (lp, ent, lse)


SEQS = 16  # sequences per batch in the full-step comparisons


def make_calibrl_step(lib, logits, labels, old_lp, adv):
    """The whole GRPO-style step on calibrl: fused forward (log-prob, entropy, lse), the loss on
    the GPU (grpo preset + entropy bonus: ∂L/∂ℓ and ∂L/∂H), fused backward in place."""
    n = logits.shape[0]
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    lp, ent, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    g, h = torch.empty(n, **f32), torch.empty(n, **f32)
    offsets = torch.linspace(0, n, SEQS + 1, device=dev).round().to(torch.int64)
    w = adv.abs()
    signs = torch.where(adv > 0, 1.0, -1.0).to(torch.float32)
    metrics = torch.empty(15, **f32)
    cfg = lib.config('{"preset": "grpo", "entropy_coef": 0.001}')

    def step():
        lib.forward(logits, labels, 1.0, lp, ent, lse)
        lib.loss(cfg, logprobs=lp, seq_offsets=offsets, old_logprobs=old_lp, entropy=ent, advantages=adv,
                 weights=w, signs=signs, grad_logprobs=g, grad_entropy=h, metrics=metrics)
        lib.backward(logits, labels, 1.0, lse, ent, g, h, logits)  # in place

    return step


def make_torch_step(logits, labels, old_lp, adv, compiled):
    """The same step in PyTorch eager (verl-style: f32 upcast, log_softmax, gather, entropy,
    clipped PG with token-mean, entropy bonus, autograd)."""
    x = logits.detach().clone().requires_grad_(True)
    n = logits.shape[0]
    seq = torch.bucketize(torch.arange(n, device=x.device), torch.linspace(0, n, SEQS + 1, device=x.device).round()[1:-1], right=True)
    a_tok = adv[seq]

    def loss_fn(x):
        logp = torch.log_softmax(x.float(), dim=-1)
        lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        ratio = torch.exp(lp - old_lp)
        p1, p2 = -a_tok * ratio, -a_tok * ratio.clamp(0.8, 1.2)
        pc = torch.maximum(p1, p2)
        p = torch.where(a_tok < 0, torch.minimum(pc, -a_tok * 3.0), pc)
        return p.mean() - 0.001 * ent.mean()

    fn = torch.compile(loss_fn, dynamic=False) if compiled else loss_fn

    def step():
        x.grad = None
        fn(x).backward()

    return step


def make_liger_grpo(logits, labels, old_lp, adv):
    """Liger-Kernel's fused GRPO op (log-softmax + clipped PG + in-place backward; no entropy)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    n, v = logits.shape
    L = n // SEQS
    x = torch.empty(SEQS, L + 1, v, device=logits.device, dtype=logits.dtype)
    x[:, :L].copy_(logits[: SEQS * L].view(SEQS, L, v))
    x.requires_grad_(True)
    ids = labels[: SEQS * L].view(SEQS, L)
    old = old_lp[: SEQS * L].view(SEQS, L)

    def step():
        x.grad = None
        loss, _ = triton_grpo_loss(x, old, None, ids, adv, temperature=1.0, beta=0.0, eps_low=0.2,
                                   eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
        loss.backward()

    return step


def make_liger(logits, labels):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    x = logits.detach().clone().requires_grad_(True)

    def step():
        x.grad = None
        out = LigerCrossEntropyFunction.apply(x, labels, None, -1)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()

    return step


def time_it(step, iters, warmup=2):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_extra(step):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(nbytes=4 << 30):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = time_it(lambda: dst.copy_(src), 10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9  # GB/s (read + write)


def check_against_torch(lib, dtype, make=None, n=257, v=32003, temperature=0.9):
    """Max |difference| of calibrl (`make`: make_calibrl or make_calibrl_single_pass) vs PyTorch
    eager (f32): logprobs, entropy, d-logits."""
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::17] = -1
    g, h = torch.randn(n, device="cuda"), torch.randn(n, device="cuda") * 0.3
    x = logits.detach().clone().float().requires_grad_(True)
    loss, lp_ref, ent_ref = torch_loss(x, labels, temperature, g, h)
    loss.backward()
    z = logits.clone()
    step, (lp, ent, lse) = (make or make_calibrl)(lib, z, labels, temperature, g, h)
    step()
    torch.cuda.synchronize()
    dlp = (lp - lp_ref).abs().max().item()
    dent = (ent - ent_ref).abs().max().item()
    dgrad = (z.float() - x.grad).abs().max().item() / max(x.grad.abs().max().item(), 1e-30)
    return dlp, dent, dgrad


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.environ.get("CALIBRL_LIB", ".devbuild/lib/libcalibrl.so"))
    ap.add_argument("--out", default=None, help="CSV path (default: stdout only)")
    # The issue-6 target (16384 x 152064) first, so a tight time budget still measures it.
    ap.add_argument("--sizes", default="16384x152064,4096x32000,4096x152064,4096x262144,16384x32000,16384x262144,"
                    "65536x32000,65536x152064,65536x262144")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new configurations after this")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    start = time.time()

    lib = Calibrl(args.lib)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB; torch {torch.__version__}", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s", flush=True)
    check_ok = True
    for what, make in [("calibrl", make_calibrl), ("calibrl_single_pass", make_calibrl_single_pass)]:
        dlp, dent, dgrad = check_against_torch(lib, dtype, make)
        print(f"check {what} vs PyTorch eager (N=257, V=32003, T=0.9): max|dlogprob| {dlp:.2e}, "
              f"max|dentropy| {dent:.2e}, max|dgrad|/max|grad| {dgrad:.2e}", flush=True)
        check_ok &= dlp < 1e-3 and dent < 1e-3 and dgrad < (1e-4 if dtype == torch.float32 else 2e-2)
    if not check_ok:
        print("CHECK FAILED: calibrl disagrees with PyTorch eager", flush=True)

    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except Exception:
        have_liger = False
        print("liger_kernel not importable: skipped", flush=True)

    rows = []
    for size in args.sizes.split(","):
        n, v = (int(s) for s in size.lower().split("x"))
        if time.time() - start > args.budget_s:
            print(f"time budget reached: skipping {n}x{v} and later sizes", flush=True)
            rows.append(dict(N=n, V=v, method="all", status="skipped (time budget)"))
            continue
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        need = n * v * esize
        if need * 1.1 > free:
            rows.append(dict(N=n, V=v, method="all", status=f"skipped (logits need {need / 2**30:.1f} GiB)"))
            continue
        logits = torch.empty(n, v, device="cuda", dtype=dtype).normal_(0, 3)
        labels = torch.randint(0, v, (n,), device="cuda")
        g, h = torch.randn(n, device="cuda"), torch.randn(n, device="cuda") * 0.1
        methods = [("calibrl", None), ("calibrl_single_pass", "single_pass"), ("torch_eager", False)]
        if not args.no_compile:
            methods.append(("torch_compile", True))
        old_lp = -torch.rand(n, device="cuda") * 5
        adv = torch.randn(SEQS, device="cuda")
        methods += [("calibrl_step", "step"), ("torch_eager_step", "torch_step")]
        if not args.no_compile:
            methods.append(("torch_compile_step", "torch_step_compiled"))
        if have_liger:
            methods.append(("liger_ce_no_entropy", "liger"))
            methods.append(("liger_grpo_step", "liger_grpo"))
        for name, kind in methods:
            row = dict(N=n, V=v, method=name, dtype=args.dtype)
            try:
                t0 = time.time()
                if name == "calibrl":
                    step, _ = make_calibrl(lib, logits, labels, 1.0, g, h)
                elif kind == "single_pass":
                    step, _ = make_calibrl_single_pass(lib, logits, labels, 1.0, g, h)
                elif kind == "liger":
                    step = make_liger(logits, labels)
                elif kind == "step":
                    step = make_calibrl_step(lib, logits, labels, old_lp, adv)
                elif kind == "torch_step":
                    step = make_torch_step(logits, labels, old_lp, adv, compiled=False)
                elif kind == "torch_step_compiled":
                    step = make_torch_step(logits, labels, old_lp, adv, compiled=True)
                elif kind == "liger_grpo":
                    step = make_liger_grpo(logits, labels, old_lp, adv)
                else:
                    step, _ = make_torch(logits, labels, 1.0, g, h, compiled=kind)
                mem = peak_extra(step)  # also the first call (compilation, module load)
                row["setup_s"] = round(time.time() - t0, 2)
                ms = time_it(step, args.iters)
                row.update(ms=round(ms, 3), peak_extra_mib=round(mem, 1), status="ok")
                if name in ("calibrl", "calibrl_step", "calibrl_single_pass"):
                    passes = 2 if name == "calibrl_single_pass" else 3  # bytes the method needs to move
                    gbs = passes * n * v * esize / (ms * 1e-3) / 1e9
                    row.update(gbps=round(gbs, 1), pct_of_copy=round(100 * gbs / bw, 1))
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as e:  # report and go on
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            step = None
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
        del logits
        torch.cuda.empty_cache()

    fields = ["N", "V", "dtype", "method", "ms", "gbps", "pct_of_copy", "peak_extra_mib", "setup_s", "status"]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    print(f"\ncopy bandwidth {bw:.0f} GB/s; calibrl moves 3·N·V·{esize} bytes per fwd+bwd, "
          f"calibrl_single_pass 2·N·V·{esize} (its %copy counts those)")
    print(f"{'N':>6} {'V':>7} {'method':<20} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'peak+MiB':>9}  status")
    for r in rows:
        def f(k, fmt):
            return format(r[k], fmt) if k in r else ""
        print(f"{r['N']:>6} {r['V']:>7} {r['method']:<20} {f('ms', '9.3f'):>9} {f('gbps', '7.0f'):>7} "
              f"{f('pct_of_copy', '6.1f'):>6} {f('peak_extra_mib', '9.0f'):>9}  {r.get('status', '')}")
    return 0 if check_ok and all(r.get("status") == "ok" or "skipped" in r.get("status", "") for r in rows
                    if r["method"] == "calibrl" or r["method"] == "all") else 1


if __name__ == "__main__":
    sys.exit(main())
