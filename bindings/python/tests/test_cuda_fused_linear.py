"""The fused linear path on CUDA through the Python binding (skipped without a GPU; written
without one, not yet run): results against the CPU backend on the same inputs, a non-default
stream, and CUDA graph capture and replay after one warm-up call (cuBLAS into the caller's
workspace: nothing allocated inside the call)."""

import pytest
import torch

from calibrl import linear
from conftest import needs_cuda

pytestmark = [needs_cuda]
N, H, V, CHUNK = 300, 64, 1001, 128


def problem(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -1
    grad_lp = torch.randn(N, generator=g)
    grad_ent = 0.3 * torch.randn(N, generator=g)
    return hidden, weight, bias, labels, grad_lp, grad_ent


def run(t, chunk=CHUNK):
    hidden, weight, bias, labels, grad_lp, grad_ent = t
    return linear.forward_backward(hidden, weight, labels, grad_lp, 0.8, bias=bias, grad_entropy=grad_ent,
                                   chunk_size=chunk)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2 * 2**-7), (torch.float16, 2 * 2**-10),
                                        (torch.float32, 1e-4)])
def test_cuda_matches_cpu(dtype, tol):
    cpu = problem(1, dtype)
    want = run(cpu)
    got = run(tuple(x.cuda() for x in cpu))
    for k in ("logprobs", "entropy", "lse", "d_hidden", "d_weight", "d_bias"):
        w, g = want[k].double(), got[k].cpu().double()
        assert (g - w).abs().max() <= tol * w.abs().max().clamp(min=1e-3), k


def test_non_default_stream_gives_the_same_bits():
    t = tuple(x.cuda() for x in problem(2, torch.bfloat16))
    a = run(t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        b = run(t)
    s.synchronize()
    for k in a:
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), k


def test_cuda_graph_capture_and_replay():
    hidden, weight, bias, labels, grad_lp, grad_ent = (x.cuda() for x in problem(3, torch.bfloat16))
    ws = torch.empty(linear.workspace_size(hidden, weight, CHUNK), dtype=torch.uint8, device="cuda")
    d_hidden, d_weight = torch.empty_like(hidden), torch.empty(V, H, device="cuda")
    d_bias = torch.empty(V, device="cuda")
    out = {}

    def step():
        out.update(linear.forward_backward(hidden, weight, labels, grad_lp, 0.8, bias=bias, grad_entropy=grad_ent,
                                           chunk_size=CHUNK, d_hidden=d_hidden, d_weight=d_weight, d_bias=d_bias,
                                           workspace=ws))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compiles the kernels, loads cuBLAS, creates its handle
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        step()
    captured = out["logprobs"]
    for seed in range(3):
        torch.manual_seed(seed)
        hidden.copy_(torch.randn(N, H, device="cuda").bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        replayed = (captured.clone(), d_hidden.clone(), d_weight.clone())
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed[0], out["logprobs"])
        assert torch.equal(replayed[1], d_hidden) and torch.equal(replayed[2], d_weight)
        assert torch.isfinite(d_weight).all()
