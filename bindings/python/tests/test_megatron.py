"""The Megatron-Core drop-in through Megatron-Core's own schedule and finalize_model_grads
(the real package, gloo, 2 processes) with TP = 2, DP = 2 and CP = 2 (2 micro-batches per rank),
for the `paper` preset (sequence Δ) and `reference` (token-aligned Δ): gradients, and the
metrics Megatron-LM's train_step would log, against the single-process mini-batch (one loss call
on the full vocabulary and full sequences). Both the logits path (`loss_func`) and the path
without logits (`linear_loss_func` on the input of Megatron's `ColumnParallelLinear` output
layer, `skip_output_layer`)."""

import datetime
import importlib.util
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import calibrl
from calibrl.integrations.megatron import REPORTED, per_row_expert, sequence_sums
from conftest import REPO, needs_loss

pytestmark = [
    needs_loss,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed"),
]
sys.path.insert(0, str(REPO / "integration" / "megatron"))

VOCAB, HIDDEN, ROWS, S = 24, 8, 8, 8
PRESETS = {
    "paper": {"preset": "paper", "entropy_coef": 0.01},
    "reference": {"preset": "reference", "entropy_coef": 0.01, "kl_coef": 0.05},
}


def minibatch():
    """8 rollouts (4 prompts × 2) with prompt positions masked out, the expert aligned per row at
    each row's response start, and the global normalisers."""
    g = torch.Generator().manual_seed(3)
    groups = torch.arange(ROWS) // 2
    start = torch.randint(1, 3, (ROWS,), generator=g)
    length = torch.randint(2, S - 2, (ROWS,), generator=g)
    pos = torch.arange(S)[None]
    mask = ((pos >= start[:, None]) & (pos < (start + length)[:, None])).float()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv, w, c = calibrl.group_advantages(rewards, groups)
    # Expert log-probs near the policy's (≈ −log V) and lengths near the rollouts': Δ of both
    # signs, so a Δ from one context-parallel slice only would change the gradient.
    expert_len = length[::2].clone()
    expert = -2.7 - torch.rand(ROWS // 2, S, generator=g)
    e_lp, _, e_index = per_row_expert(expert, groups)
    # row i's expert token j sits at column start_i + j, like its own response token j
    col = pos - start[:, None]
    e_rows = torch.where(col >= 0, e_lp.gather(1, col.clamp(min=0)), torch.zeros(()))
    e_mask = ((col >= 0) & (col < expert_len[groups][:, None])).float()
    ref = -torch.rand(ROWS, S, generator=g) * 3
    inputs = calibrl.LossInputs(
        advantages=adv, weights=w, signs=c, mask=mask, old_logprobs=-torch.rand(ROWS, S, generator=g) * 3,
        ref_logprobs=ref, expert_logprobs=e_rows * e_mask, expert_mask=e_mask, expert_index=e_index,
        normalizers=(float(mask.sum()), float(ROWS)),
    )
    tokens = torch.randint(0, VOCAB, (ROWS, S), generator=g)
    labels = torch.randint(0, VOCAB, (ROWS, S), generator=g)
    return tokens, labels, inputs


def rows_of(rows: slice):
    tokens, labels, inputs = minibatch()
    sub = inputs.map_tensors(lambda t: t[rows])
    sub.expert_index = torch.where(sub.expert_index >= 0, torch.arange(sub.expert_index.numel()), -1)
    return tokens[rows], labels[rows], sub


def reference(cfg):
    """One process, full vocabulary, whole sequences, the whole mini-batch in one call."""
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).requires_grad_()
    out = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).requires_grad_()
    tokens, labels, inputs = minibatch()
    logits = torch.tanh(emb[tokens]) @ out.t()
    n = labels.numel()
    flat = torch.where(inputs.mask.reshape(n) != 0, labels.reshape(n), -1)
    lp = torch.log_softmax(logits.detach().double(), -1).gather(-1, labels[..., None])[..., 0] * inputs.mask
    loss, metrics = calibrl.fused_logits_calibrl_loss(logits.reshape(n, VOCAB), flat, inputs, cfg, token_shape=labels.shape)
    loss.backward()  # (overwrites the logits with their gradient)
    return {"metrics": metrics, "embedding": emb.grad, "output": out.grad, "logprobs": lp}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, layout, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        from megatron.core import parallel_state as ps

        import example_step as ex

        ps.initialize_model_parallel(tensor_model_parallel_size=layout["tp"], context_parallel_size=layout["cp"])
        dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = ROWS // dp
        mb_rows = per_rank // 2  # 2 micro-batches per rank
        mbs = [ex.microbatch(*rows_of(slice(d * per_rank + m * mb_rows, d * per_rank + (m + 1) * mb_rows)))
               for m in range(2)]
        result = {"tp_rank": ps.get_tensor_model_parallel_rank(), "runs": {}}
        for name, cfg in PRESETS.items():
            for per_token in layout["per_token"]:
                for fused in (False, True):
                    model = ex.make_model(VOCAB, HIDDEN, calculate_per_token_loss=per_token, fused_linear=fused)
                    opt = torch.optim.SGD(model.parameters(), lr=0.0)
                    opts = {} if per_token else {
                        "calculate_per_token_loss": False, "num_microbatches": len(mbs),
                        "dp_cp_size": ps.get_data_parallel_world_size(with_context_parallel=True)}
                    if fused:
                        opts["chunk_size"] = 5  # several chunks per micro-batch, the last one short
                    logged = ex.train_step(model, opt, [dict(m) for m in mbs], cfg=cfg, loss_options=opts)
                    result["runs"][(name, per_token, fused)] = {
                        "logged": logged, "embedding": model.module.embedding.grad.clone(),
                        "output": model.module.output_weight.grad.clone(),
                    }
        result["logprobs"] = ex.forward_logprobs(ex.make_model(VOCAB, HIDDEN), [dict(m) for m in mbs])
        result["linear_logprobs"] = ex.forward_logprobs(ex.make_model(VOCAB, HIDDEN, fused_linear=True),
                                                        [dict(m) for m in mbs])
        if layout["tp"] > 1:
            result["bf16"] = _bf16_paths(mbs[0])
        result["sequence_sums"] = [sequence_sums(lp, m["mask"]) for lp, m in zip(result["logprobs"], mbs)]
        result["rows"] = (d * per_rank, mb_rows)
        if layout["cp"] > 1:
            result["errors"] = _cp_errors(ex, mbs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bf16_paths(mb):
    """One bf16 micro-batch through both paths with explicit groups: the gradients of the hidden
    states and of this rank's weight shard from the materialised logits (`loss_func`) and
    without them (`linear_loss_func`)."""
    from megatron.core import parallel_state as ps

    from calibrl.integrations.megatron import linear_loss_func, loss_func

    g = torch.Generator().manual_seed(5)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    hidden = torch.randn(*mb["labels"].shape, HIDDEN, generator=g).bfloat16()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).bfloat16()[rank * VOCAB // tp:(rank + 1) * VOCAB // tp]
    groups = {"tp_group": ps.get_tensor_model_parallel_group(), "cp_group": ps.get_context_parallel_group()}
    out = {}
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss, _, _ = linear_loss_func(mb["labels"], mb["inputs"], h, weight=w, config="paper", chunk_size=7,
                                          **groups)
        else:
            # Megatron's output layer in bf16: the dgrad summed over the TP group
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            logits = copy_to_tensor_model_parallel_region(h, group=groups["tp_group"]) @ w.t()
            loss, _, _ = loss_func(mb["labels"], mb["inputs"], logits, config="paper", **groups)
        loss.backward()
        out[fused] = {"loss": loss.detach().double(), "hidden": h.grad.double(), "weight": w.grad.double()}
    return out


def _cp_errors(ex, mbs):
    """Bad input under CP=2: the messages, and whether anything was written."""
    from calibrl.integrations.megatron import loss_func

    errors = {}
    model = ex.make_model(VOCAB, HIDDEN)
    b = mbs[0]

    def attempt(key, labels, inputs, cfg):
        logits = model(b["tokens"][: labels.shape[0]]).detach().requires_grad_()
        before = logits.clone()
        try:
            loss_func(labels, inputs, logits, config=cfg)
            errors[key] = None
        except ValueError as e:
            errors[key] = (str(e), torch.equal(before, logits) and logits.grad is None)

    attempt("agg", b["labels"], b["inputs"], {"preset": "reference", "agg": "seq-mean-token-mean"})
    attempt("length_normalize", b["labels"], b["inputs"], {"preset": "paper", "length_normalize": True})
    packed = calibrl.LossInputs(**{**b["inputs"].__dict__, "expert_logprobs": torch.zeros(2, 3), "expert_mask": None})
    attempt("expert_layout", b["labels"], packed, "paper")
    shifted = calibrl.LossInputs(**{**b["inputs"].__dict__, "expert_index": b["inputs"].expert_index.roll(1)})
    attempt("expert_index", b["labels"], shifted, "paper")
    rank = dist.get_rank()
    rows = b["labels"].shape[0] - rank  # CP rank 1 holds one row fewer
    fewer = b["inputs"].map_tensors(lambda t: t[:rows])
    attempt("rows", b["labels"][:rows], fewer, "paper")
    return errors


LAYOUTS = {
    "tp2": {"tp": 2, "cp": 1, "per_token": (True,)},
    "dp2": {"tp": 1, "cp": 1, "per_token": (True, False)},
    "cp2": {"tp": 1, "cp": 2, "per_token": (True,)},
}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``spawned(layout)``: the two ranks' results of that layout (each layout run once)."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            mp.spawn(_worker, args=(2, _port(), LAYOUTS[name], str(out)), nprocs=2, join=True)
            cache[name] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_and_logged_metrics_equal_single_process_minibatch(spawned, name):
    ranks = spawned(name)
    for preset, cfg in PRESETS.items():
        ref = reference(cfg)
        scale = max(ref["embedding"].abs().max(), ref["output"].abs().max())
        assert scale > 0
        for r in ranks:
            assert {k[2] for k in r["runs"]} == {False, True}  # both paths ran
            for key, run in r["runs"].items():
                if key[0] != preset:
                    continue
                v = VOCAB // (2 if name == "tp2" else 1)
                shard = ref["output"][r["tp_rank"] * v:(r["tp_rank"] + 1) * v]
                torch.testing.assert_close(run["output"], shard, rtol=1e-6, atol=1e-6 * scale)
                torch.testing.assert_close(run["embedding"], ref["embedding"], rtol=1e-6, atol=1e-6 * scale)
                assert set(run["logged"]) == {f"calibrl/{m}" for m in REPORTED}
                for m in REPORTED:
                    assert run["logged"][f"calibrl/{m}"] == pytest.approx(ref["metrics"][m], rel=1e-6, abs=1e-9), (key, m)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_linear_path_equals_logits_path(spawned, name):
    """The update without logits equals the materialised logits path's, in the same layout."""
    for r in spawned(name):
        for (preset, per_token, fused), run in r["runs"].items():
            if not fused:
                continue
            logits_run = r["runs"][(preset, per_token, False)]
            for p in ("embedding", "output"):
                scale = logits_run[p].abs().max()
                torch.testing.assert_close(run[p], logits_run[p], rtol=1e-6, atol=1e-6 * scale)


def test_linear_path_bf16_equals_logits_path_within_bf16_tolerance(spawned):
    for r in spawned("tp2"):
        materialised, fused = r["bf16"][False], r["bf16"][True]
        # bf16 rounds the materialised logits (unit 2^-8 relative), the fused path keeps them f32
        torch.testing.assert_close(fused["loss"], materialised["loss"], rtol=2e-2, atol=0)
        for p in ("hidden", "weight"):
            scale = materialised[p].abs().max()
            assert scale > 0
            torch.testing.assert_close(fused[p], materialised[p], rtol=0, atol=2e-2 * scale)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("path", ["logprobs", "linear_logprobs"])
def test_forward_only_logprobs_through_the_schedule(spawned, name, path):
    ranks = spawned(name)
    lp = reference(PRESETS["paper"])["logprobs"]
    for k, r in enumerate(ranks):
        first, mb_rows = r["rows"]
        assert len(r[path]) == 2
        for m, got in enumerate(r[path]):
            want = lp[first + m * mb_rows: first + (m + 1) * mb_rows]
            if name == "cp2":  # this CP rank's chunks 0 and 3 (rank 0) or 1 and 2 (rank 1)
                chunks = want.view(want.shape[0], 4, S // 4)
                want = torch.cat([chunks[:, k], chunks[:, 3 - k]], 1)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_context_parallel_sequence_sums_are_whole_sequence_sums(spawned):
    lp = reference(PRESETS["paper"])["logprobs"]
    for r in spawned("cp2"):
        first, mb_rows = r["rows"]
        for m, got in enumerate(r["sequence_sums"]):
            torch.testing.assert_close(got, lp[first + m * mb_rows: first + (m + 1) * mb_rows].sum(1), rtol=1e-6, atol=1e-6)


def test_context_parallel_bad_layouts_name_the_argument(spawned):
    for r in spawned("cp2"):
        e = r["errors"]
        for key, arg in (("agg", "config.agg"), ("length_normalize", "config.length_normalize"),
                         ("expert_layout", "inputs.expert_logprobs"), ("expert_index", "inputs.expert_index"),
                         ("rows", "labels")):
            assert e[key] is not None, key
            msg, untouched = e[key]
            assert f"`{arg}`" in msg and untouched, (key, msg)


def test_bad_input_names_the_argument():
    from calibrl.integrations.megatron import loss_func

    tokens, labels, inputs = minibatch()
    logits = torch.zeros(ROWS, S, VOCAB)
    with pytest.raises(ValueError, match="output_tensor"):
        loss_func(labels, inputs, torch.zeros(4, 5, VOCAB), tp_group=object())
    no_expert = calibrl.LossInputs(**{**inputs.__dict__, "expert_logprobs": None})
    with pytest.raises(ValueError, match=r"`inputs.expert_logprobs` is missing"):
        loss_func(labels, no_expert, logits, config="paper", tp_group=object())
    short = calibrl.LossInputs(**{**inputs.__dict__, "signs": inputs.signs[:-1]})
    with pytest.raises(ValueError, match=r"`inputs.signs`"):
        loss_func(labels, short, logits, config="paper", tp_group=object())
    with pytest.raises(ValueError, match=r"`num_microbatches`"):
        loss_func(labels, inputs, logits, config="paper", tp_group=object(), calculate_per_token_loss=False)
    assert torch.count_nonzero(logits) == 0


def test_linear_bad_input_names_the_argument():
    from calibrl.integrations.megatron import linear_loss_func

    tokens, labels, inputs = minibatch()
    hidden = torch.zeros(ROWS, S, HIDDEN, requires_grad=True)
    weight = torch.zeros(VOCAB, HIDDEN, requires_grad=True)
    with pytest.raises(ValueError, match="`output_tensor`"):
        linear_loss_func(labels, inputs, torch.zeros(ROWS, S, HIDDEN + 1), weight=weight, tp_group=object())
    with pytest.raises(ValueError, match="`output_tensor`"):
        linear_loss_func(labels, inputs, torch.zeros(ROWS, S - 1, HIDDEN), weight=weight, tp_group=object())
    with pytest.raises(ValueError, match="`weight`"):
        linear_loss_func(labels, inputs, hidden, weight=torch.zeros(VOCAB * HIDDEN), tp_group=object())
    with pytest.raises(ValueError, match="`bias`"):
        linear_loss_func(labels, inputs, hidden, weight=weight, bias=torch.zeros(VOCAB + 1), tp_group=object())
    no_expert = calibrl.LossInputs(**{**inputs.__dict__, "expert_logprobs": None})
    with pytest.raises(ValueError, match=r"`inputs.expert_logprobs` is missing"):
        linear_loss_func(labels, no_expert, hidden, weight=weight, config="paper", tp_group=object())
    assert hidden.grad is None and weight.grad is None
