"""The C ABI's data layout in ctypes: every structure of ``include/calibrl.h`` (and DLPack's),
the ABI version they describe, and the metrics order. Every other module (the package's and
the benchmarks') imports them from here; ``tests/test_library.py`` checks each against the
header.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    POINTER,
    c_double,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

#: The ABI version these bindings are written against (``CALIBRL_ABI_VERSION`` in the header).
EXPECTED_ABI_VERSION = 4

METRICS_NAMES = (
    "loss",
    "pg_loss",
    "explore_loss",
    "entropy_loss",
    "kl_loss",
    "clipfrac",
    "clipfrac_lower",
    "ppo_kl",
    "mean_delta",
    "mean_expert_logprob",
    "mean_response_length",
    "frac_correct",
    "mean_rarity_weight",
    "num_tokens",
    "num_seqs",
    "cov_selected_frac",
)
METRICS_LEN = len(METRICS_NAMES)


# --------------------------------------------------------------------------------------------
# DLPack (dlpack.h)

DL_CPU = 1
DL_CUDA = 2
DL_CUDA_HOST = 3
DL_CUDA_MANAGED = 13


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(ctypes.Structure):
    """Layout-identical to ``DLTensor`` of dlpack.h (v0.6 – v1.x)."""

    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


# --------------------------------------------------------------------------------------------
# calibrl structures (docs/abi.md)

_T = POINTER(DLTensor)


class Normalizers(ctypes.Structure):
    """``calibrl_normalizers``: global counts of the mini-batch (all ranks, all micro-batches).
    ``token_count`` / ``seq_count`` count the trained rows (the denominators of the policy
    gradient and exploration terms); ``all_token_count`` / ``all_seq_count`` every row, expert
    rows included (entropy and KL under the ``authors`` preset, SPEC §4.7), 0 meaning "the same
    as token_count / seq_count"."""

    _fields_ = [
        ("token_count", c_double),
        ("seq_count", c_double),
        ("all_token_count", c_double),
        ("all_seq_count", c_double),
    ]


class Metrics(ctypes.Structure):
    """``calibrl_metrics``: every field is a double, in ``METRICS_NAMES`` order."""

    _fields_ = [(name, c_double) for name in METRICS_NAMES]

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in METRICS_NAMES}


class AdvantageArgs(ctypes.Structure):
    """``calibrl_advantage_args`` (SPEC §3)."""

    _fields_ = [
        ("rewards", _T),
        ("group_ids", _T),
        ("num_groups", c_int64),
        ("correct", _T),
        ("is_expert", _T),
        ("advantages", _T),
        ("weights", _T),
        ("signs", _T),
    ]


class LossArgs(ctypes.Structure):
    """``calibrl_loss_args`` (SPEC §4). NULL is "absent" for every optional field."""

    _fields_ = [
        ("logprobs", _T),
        ("seq_offsets", _T),
        ("mask", _T),
        ("old_logprobs", _T),
        ("ref_logprobs", _T),
        ("entropy", _T),
        ("advantages", _T),
        ("weights", _T),
        ("signs", _T),
        ("is_expert", _T),
        ("expert_logprobs", _T),
        ("expert_offsets", _T),
        ("expert_mask", _T),
        ("expert_index", _T),
        ("normalizers", POINTER(Normalizers)),
        ("grad_logprobs", _T),
        ("grad_entropy", _T),
        ("metrics", _T),
        ("token_weights", _T),
    ]


class SchedulerConfigC(ctypes.Structure):
    """``calibrl_scheduler_config`` (SPEC §7); :class:`calibrl.SchedulerConfig` builds it."""

    _fields_ = [
        ("dp_ranks", c_uint32),
        ("minibatch_prompts", c_uint32),
        ("nograd_token_budget", c_uint64),
        ("train_token_budget", c_uint64),
        ("loss_kind", c_uint32),
        ("expert_selection", c_uint32),
        ("seed", c_uint64),
        ("fraction", c_double),
        ("pass_rate_low", c_double),
        ("pass_rate_high", c_double),
        ("reward_threshold", c_double),
        ("quadratic_coef", c_double),
        ("dynamic_sampling", c_uint32),
    ]


class PromptDesc(ctypes.Structure):
    """``calibrl_prompt_desc``: one prompt of the step (``expert_len`` -1: no expert)."""

    _fields_ = [("prompt_len", c_uint32), ("num_rollouts", c_uint32), ("expert_len", c_int64)]


class PlanInfo(ctypes.Structure):
    """``calibrl_plan_info``: the counts of a plan."""

    _fields_ = [
        ("num_prompts", c_uint64),
        ("num_rollouts", c_uint64),
        ("num_expert_slots", c_uint64),
        ("expert_tokens", c_uint64),
        ("dp_ranks", c_uint64),
        ("nograd_microbatches", c_uint64),
        ("num_minibatches", c_uint64),
        ("nograd_oversize", c_uint64),
        ("train_oversize", c_uint64),
        ("dropped_prompts", c_uint64),
    ]


class MinibatchInfo(ctypes.Structure):
    """``calibrl_minibatch_info``: one mini-batch of the training pass."""

    _fields_ = [
        ("first_prompt", c_uint64),
        ("num_prompts", c_uint64),
        ("microbatches", c_uint64),
        ("normalizers", Normalizers),
    ]


class SeqInfo(ctypes.Structure):
    """``calibrl_seq_info``: one sequence of a plan."""

    _fields_ = [
        ("kind", c_uint32),
        ("prompt", c_uint32),
        ("index", c_uint32),
        ("tokens", c_uint32),
        ("response_len", c_uint32),
    ]
