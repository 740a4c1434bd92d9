"""A Megatron-Core RL training step with the CalibRL drop-in ``loss_func``, through Megatron-Core's
own schedule (``forward_backward_no_pipelining``) and ``finalize_model_grads`` on the CPU (gloo).

What is not Megatron's own here, and why:
- ``TinyLM``: a position-wise toy model (replicated embedding, Megatron's own
  ``ColumnParallelLinear`` as the vocabulary-parallel output layer) with what the schedule asks of
  a model (``config``, ``set_input_tensor``); position-wise, so context-parallel slicing needs no
  ring attention. ``fused_linear=True`` applies ``skip_output_layer`` to it, as a trainer does to
  ``GPTModel.output_layer`` for ``linear_loss_func``.
- ``GradSync``: Megatron's ``DistributedDataParallel`` keeps its gradient buffers on CUDA, so
  this wrapper does what it does at ``finish_grad_sync`` (sum the gradients over the
  data-parallel × context-parallel group, pre-scaled by 1/size unless
  ``calculate_per_token_loss``) and ``scale_gradients``; Megatron's ``finalize_model_grads``
  calls both.
- ``cpu_schedule``: the schedule allocates its token counter with ``device="cuda"``; on a
  machine without CUDA that one allocation is made on the CPU.
- ``megatron_lm_logged``: what Megatron-LM's ``train_step`` does with the schedule's output
  (megatron-lm is not on PyPI): sum each ``[sum, count]`` pair over micro-batches, all-reduce
  over the DP × CP group, log ``sum / count``.

Used by bindings/python/tests/test_megatron.py and integration/megatron/example_calibrl.py.
"""

from __future__ import annotations

import contextlib
import types
from functools import partial

import torch
import torch.distributed as dist

import calibrl
from calibrl.integrations.megatron import (
    linear_logprobs_func, linear_loss_func, logprobs_func, loss_func, output_layer_weight, skip_output_layer,
)


class TinyLM(torch.nn.Module):
    """Replicated embedding, vocabulary-parallel output layer (``ColumnParallelLinear``, weight
    ``[V/tp, H]``)."""

    def __init__(self, vocab: int, hidden: int, config, seed: int = 0):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear

        g = torch.Generator().manual_seed(seed)
        full_embedding = torch.randn(vocab, hidden, generator=g) * 0.5
        full_output = torch.randn(vocab, hidden, generator=g) * 0.5
        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        v = vocab // tp
        self.embedding = torch.nn.Parameter(full_embedding)
        # as GPTModel builds its output layer
        self.output_layer = ColumnParallelLinear(hidden, vocab, config=config, init_method=torch.nn.init.zeros_,
                                                 bias=False, skip_bias_add=False, gather_output=False)
        with torch.no_grad():
            self.output_layer.weight.copy_(full_output[rank * v:(rank + 1) * v])
        self.config = config
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder

    @property
    def output_weight(self) -> torch.nn.Parameter:
        return self.output_layer.weight

    def set_input_tensor(self, input_tensor):  # no pipeline stages before this one
        pass

    def forward(self, tokens):
        hidden = torch.tanh(self.embedding[tokens])
        # [B, S, V/tp]: Megatron's logits without labels; with skip_output_layer, hidden [B, S, H]
        out, _ = self.output_layer(hidden)
        return out


class GradSync(torch.nn.Module):
    """Megatron DDP's gradient reduction on the CPU (see the module docstring)."""

    def __init__(self, module: TinyLM):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallelConfig

        self.module, self.config = module, module.config
        self.ddp_config = DistributedDataParallelConfig()  # read by finalize_model_grads
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def forward(self, *args):
        return self.module(*args)

    def set_input_tensor(self, t):
        self.module.set_input_tensor(t)

    def finish_grad_sync(self, force_all_reduce=False):
        scale = 1.0 if self.config.calculate_per_token_loss else 1.0 / dist.get_world_size(self.group)
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
                dist.all_reduce(p.grad, group=self.group)

    def scale_gradients(self, scaling: float):
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scaling)


class _CpuCounterTorch(types.ModuleType):
    """``torch`` as the schedule module sees it, with ``zeros(device="cuda")`` made on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


@contextlib.contextmanager
def cpu_schedule():
    from megatron.core.pipeline_parallel import schedules

    if torch.cuda.is_available():
        yield
        return
    saved, schedules.torch = schedules.torch, _CpuCounterTorch()
    try:
        yield
    finally:
        schedules.torch = saved


def make_model(vocab: int, hidden: int, *, calculate_per_token_loss: bool = True, seed: int = 0,
               fused_linear: bool = False) -> GradSync:
    """TinyLM with Megatron's model config; the schedule calls Megatron's finalize_model_grads.
    ``fused_linear``: the model returns the output layer's input (``skip_output_layer``)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=4,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        calculate_per_token_loss=calculate_per_token_loss, use_cpu_initialization=True,
    )
    config.finalize_model_grads_func = finalize_model_grads
    model = TinyLM(vocab, hidden, config, seed)
    if fused_linear:
        skip_output_layer(model.output_layer)
    wrapped = GradSync(model)
    wrapped.fused_linear = fused_linear  # which forward_step the schedule runs
    return wrapped


# --- the user's forward_step, after the README change ------------------------------------


def forward_step(data_iterator, model, *, cfg, loss_options=None):
    batch = next(data_iterator)
    output_tensor = model(batch["tokens"])  # the logits shard [B, S, V/tp]
    return output_tensor, partial(loss_func, batch["labels"], batch["inputs"], config=cfg, **(loss_options or {}))


def logprob_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"]), partial(logprobs_func, batch["labels"], mask=batch.get("mask"))


# --- the same without the logits (make_model(..., fused_linear=True)) ---------------------


def linear_forward_step(data_iterator, model, *, cfg, loss_options=None):
    batch = next(data_iterator)
    hidden = model(batch["tokens"])  # the output layer's input [B, S, H]
    return hidden, partial(linear_loss_func, batch["labels"], batch["inputs"], weight=output_layer_weight(model),
                           config=cfg, **(loss_options or {}))


def linear_logprob_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"]), partial(linear_logprobs_func, batch["labels"], weight=output_layer_weight(model),
                                           mask=batch.get("mask"))


def train_step(model, optimizer, microbatches, *, cfg, loss_options=None):
    """One optimizer step over this rank's ``microbatches``: Megatron's schedule, then what
    Megatron-LM's train_step logs. Returns the logged metrics."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    step = linear_forward_step if model.fused_linear else forward_step
    optimizer.zero_grad()
    with cpu_schedule():
        losses_reduced = get_forward_backward_func()(
            forward_step_func=partial(step, cfg=cfg, loss_options=loss_options),
            data_iterator=iter(microbatches), model=model, num_microbatches=len(microbatches),
            seq_length=microbatches[0]["labels"].shape[1], micro_batch_size=microbatches[0]["labels"].shape[0],
            forward_only=False,
        )
    optimizer.step()
    return megatron_lm_logged(losses_reduced)


def forward_logprobs(model, microbatches) -> list[torch.Tensor]:
    """The no-grad pass through the same schedule (``forward_only=True``): log-probs ``[B, S]``
    of each micro-batch (this CP rank's slice)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with cpu_schedule(), torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=linear_logprob_step if model.fused_linear else logprob_step,
            data_iterator=iter(microbatches), model=model,
            num_microbatches=len(microbatches), seq_length=microbatches[0]["labels"].shape[1],
            micro_batch_size=microbatches[0]["labels"].shape[0], forward_only=True,
        )
    return [d["logprobs"] for d in out]


def megatron_lm_logged(losses_reduced: list[dict]) -> dict[str, float]:
    """Megatron-LM ``train_step``'s reduction of ``[sum, count]`` pairs (see the docstring)."""
    from megatron.core import parallel_state

    logged = {}
    for key in losses_reduced[0]:
        val = torch.vstack([x[key].view(-1) for x in losses_reduced]).sum(dim=0)
        dist.all_reduce(val, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        logged[key] = (val[0] / val[1]).item()
    return logged


def cp_slice(batch: dict) -> dict:
    """This context-parallel rank's slice of the token tensors (Megatron's own slicing)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch))


def microbatch(tokens, labels, inputs: calibrl.LossInputs) -> dict:
    """A micro-batch for ``forward_step``: token tensors (every ``[B, S]`` field, the expert
    carried per row included) sliced for this CP rank, row tensors whole."""
    token_fields = [k for k, v in inputs.__dict__.items()
                    if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(labels.shape)]
    tok = cp_slice({"tokens": tokens, "labels": labels, **{k: getattr(inputs, k) for k in token_fields}})
    sliced = calibrl.LossInputs(**{**inputs.__dict__, **{k: tok[k] for k in token_fields}})
    return {"tokens": tok["tokens"], "labels": tok["labels"], "mask": sliced.mask, "inputs": sliced}
