"""The Megatron drop-in: vocabulary-parallel (gloo, 2 processes, TP = 2) against the
single-process full-vocabulary result, through the minimal trainer of integration/megatron."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import calibrl
from conftest import REPO, needs_loss

pytestmark = needs_loss
sys.path.insert(0, str(REPO / "integration" / "megatron"))
import example_step  # noqa: E402

VOCAB, HIDDEN = 24, 8
CFG = {"preset": "reference", "entropy_coef": 0.01, "kl_coef": 0.0}


def full_vocabulary_reference():
    """One process, full vocabulary, the fused logits path: the step's loss and gradients."""
    model = example_step.TinyLM(VOCAB, HIDDEN)
    batches = example_step.make_microbatches(VOCAB)
    total = 0.0
    for b in batches:
        logits = model(b["tokens"])
        n = logits.shape[0] * logits.shape[1]
        labels = torch.where(b["inputs"].mask.reshape(n) != 0, b["labels"].reshape(n), -1)
        loss, _ = calibrl.fused_logits_calibrl_loss(logits.reshape(n, VOCAB), labels, b["inputs"], CFG,
                                                    token_shape=b["labels"].shape)
        loss.backward()
        total += loss.item()
    return total, model.embedding.grad, model.output_weight.grad


def _worker(rank, world, port, out_dir, use_megatron):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = None
        if use_megatron:
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
            group = parallel_state.get_tensor_model_parallel_group()
        else:
            group = dist.new_group(list(range(world)))
        model = example_step.TinyLM(VOCAB, HIDDEN, tp_rank=rank, tp_size=world, group=group)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights to compare
        reported = example_step.train_step(model, optimizer, example_step.make_microbatches(VOCAB),
                                           cfg=CFG, tp_group=group)
        loss = sum(m["calibrl/loss"].item() for m in reported)
        torch.save({"loss": loss, "embedding": model.embedding.grad, "output": model.output_weight.grad,
                    "metrics": reported}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _megatron_usable() -> bool:
    try:
        import megatron.core.parallel_state  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.parametrize("use_megatron", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _megatron_usable(), reason="megatron-core is not installed"))], ids=["torch-group", "megatron-core-state"])
def test_tensor_parallel_2_equals_full_vocabulary(tmp_path, use_megatron):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), use_megatron), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, emb_grad, out_grad = full_vocabulary_reference()

    for r in ranks:  # every TP rank reports the same loss, equal to the full-vocabulary one
        assert r["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), out_grad, atol=1e-6, rtol=1e-4)
    for r in ranks:  # the embedding gradient is all-reduced over the TP group
        torch.testing.assert_close(r["embedding"], emb_grad, atol=1e-6, rtol=1e-4)
    assert out_grad.abs().sum() > 0 and emb_grad.abs().sum() > 0


def test_loss_func_rejects_mismatched_logits():
    b = example_step.make_microbatches(VOCAB)[0]
    with pytest.raises(ValueError, match="output_tensor"):
        calibrl.integrations.megatron.loss_func(b["labels"], b["inputs"], torch.zeros(4, 5, VOCAB), tp_group=object())
