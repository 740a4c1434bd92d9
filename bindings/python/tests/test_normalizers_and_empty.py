"""The global normalisers' two pairs of counts (SPEC §4.5, §4.7) through the bindings, and empty
arrays whatever their strides (NumPy reports (0, 0) for some empty arrays)."""

import numpy as np
import pytest
import torch

import calibrl
from conftest import needs_loss

pytestmark = needs_loss


def authors_batch():
    """Two rollouts and one expert row of 2 tokens each (issue 29's example)."""
    rng = np.random.default_rng(0)
    logp = rng.uniform(-2.0, -0.1, size=(3, 2))
    return dict(
        logprobs=logp,
        old_logprobs=logp + 0.1,
        ref_logprobs=logp - 0.2,
        advantages=np.array([0.7, -0.7, 0.0]),
        weights=np.array([0.7, 0.7, 0.0]),
        signs=np.array([1.0, -1.0, 1.0]),
        is_expert=np.array([0, 0, 1], np.uint8),
    )


def run(config, normalizers, **kw):
    b = authors_batch()
    logp = b.pop("logprobs")
    return calibrl.loss(config, logp, normalizers=normalizers, **b, **kw)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_all_row_counts_reach_the_library(form):
    cfg = {"preset": "authors", "kl_coef": 0.1}
    own = run(cfg, None)  # the call's own counts: 4 rollout tokens, 6 tokens in all
    counts = (4.0, 2.0, 6.0, 3.0)
    n = counts if form == "tuple" else dict(zip(["token_count", "seq_count", "all_token_count", "all_seq_count"], counts))
    given = run(cfg, n)
    assert given.loss == pytest.approx(own.loss, rel=1e-12)
    np.testing.assert_allclose(given.grad_logprobs, own.grad_logprobs, rtol=1e-12)
    # Doubled all-row counts halve the KL term only.
    half = run(cfg, (4.0, 2.0, 12.0, 6.0))
    assert half.metrics["kl_loss"] == pytest.approx(own.metrics["kl_loss"] / 2, rel=1e-12)
    assert half.metrics["pg_loss"] == pytest.approx(own.metrics["pg_loss"], rel=1e-12)


def test_inconsistent_counts_are_refused_by_name():
    with pytest.raises(calibrl.InvalidArgumentError, match="all_token_count"):
        run({"preset": "authors"}, (4.0, 2.0, 3.0, 3.0))  # below token_count
    with pytest.raises(calibrl.InvalidArgumentError, match="all_token_count"):
        run({"preset": "authors"}, (4.0, 2.0))  # left 0 while this call counts expert tokens
    with pytest.raises(ValueError, match="normalizers"):
        run({"preset": "authors"}, (4.0, 2.0, 6.0))
    with pytest.raises(ValueError, match="unknown keys"):
        run({"preset": "authors"}, {"token_count": 4.0, "seq_count": 2.0, "all_tokens": 6.0})


@pytest.mark.parametrize("path", ["autograd", "custom_op"])
def test_torch_paths_pass_the_all_row_counts(path):
    from calibrl.custom_ops import CompiledCalibRLLoss

    b = {k: torch.tensor(v) for k, v in authors_batch().items()}
    logp = b.pop("logprobs").requires_grad_()
    cfg = {"preset": "authors", "kl_coef": 0.1}
    inputs = calibrl.LossInputs(normalizers=(4.0, 2.0, 12.0, 6.0), **b)
    if path == "autograd":
        value, _ = calibrl.calibrl_loss(logp, inputs, cfg)
    else:
        value, _ = CompiledCalibRLLoss(cfg)(logp, inputs)
    value.backward()
    direct = run(cfg, (4.0, 2.0, 12.0, 6.0))
    assert float(value.detach()) == pytest.approx(direct.loss, rel=1e-12)
    np.testing.assert_allclose(logp.grad.numpy(), direct.grad_logprobs, rtol=1e-12)
    assert direct.loss != pytest.approx(run(cfg, (4.0, 2.0, 6.0, 3.0)).loss, rel=1e-9)


def strided_empty(shape, dtype=np.float64):
    a = np.zeros(shape, dtype)
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=(0,) * len(shape))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_numpy_arrays_with_zero_strides(shape):
    b, _ = shape
    rows = lambda: strided_empty((b,)) if b == 0 else np.full(b, 0.5)  # noqa: E731
    r = calibrl.loss(
        "reference",
        strided_empty(shape),
        mask=strided_empty(shape, np.uint8),
        old_logprobs=strided_empty(shape),
        advantages=rows(),
        weights=rows(),
        signs=np.ones(b) if b else strided_empty((0,)),
        expert_logprobs=strided_empty((0, 5)),
        expert_index=np.full(b, -1, np.int64) if b else strided_empty((0,), np.int64),
    )
    assert r.loss == 0.0
    # The same as a torch tensor of that shape.
    t = calibrl.loss("grpo", torch.zeros(shape, dtype=torch.float64), advantages=torch.full((b,), 0.5),
                     weights=torch.full((b,), 0.5), signs=torch.ones(b))
    assert t.loss == 0.0


def test_empty_logits_with_zero_strides():
    out = calibrl.logits_forward(strided_empty((0, 7), np.float32), strided_empty((0,), np.int64))
    assert all(np.asarray(x).size == 0 for x in (out if isinstance(out, tuple) else [out]))


def test_plan_normalizers_carry_every_row_count():
    # The training pass holds no untrained expert row: every row's counts are the rollouts'.
    plan = calibrl.Plan([calibrl.Prompt(prompt_len=3, rollout_lens=[2, 4], expert_len=5)])
    n = plan.minibatches[0].normalizers
    assert n == {"token_count": 6.0, "seq_count": 2.0, "all_token_count": 6.0, "all_seq_count": 2.0}
