"""The expert-baseline forward-pass scheduler (SPEC §7, ``calibrl_plan_*``; docs/scheduler.md).

``plan(prompts, config)`` turns one training step — prompts with their rollout lengths, an
optional expert response and (for pass-rate selection) rewards — into a :class:`Plan` of plain
Python data:

- ``plan.nograd[rank][mb]``: the no-grad pass (old / expert log-probs), a list of
  :class:`SeqRef` per micro-batch; every rollout once, each selected expert once;
- ``plan.minibatches[b]``: the training pass, with ``train[rank][mb]`` and the ``normalizers``
  to pass to every :func:`calibrl.loss` call of that mini-batch;
- ``plan.gather_map`` (each rollout's expert slot, −1 for none: ``expert_index`` of the loss),
  ``plan.expert_prompts``, ``plan.expert_offsets`` (``expert_offsets`` of the loss);
- ``plan.collect_experts(nograd_logprobs)``: the packed expert tensor and/or ``E_g`` per slot
  from the no-grad pass's output.

Sequence ids: rollouts are ``0..R`` in input order; expert slot ``s`` is id ``R + s``.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import c_int64, c_size_t, c_uint32, c_void_p
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from . import _abi, _lib
from ._dlpack import as_array, ptr, stream_for, view
from ._errors import InvalidArgumentError

#: ``loss_kind`` values (``CALIBRL_LOSS_*``); the names are those of the loss's ``loss`` key.
LOSS_KINDS = {"calibrl": 0, "grpo": 1, "luffy": 2, "rlplus": 3}
#: ``expert_selection`` values (``CALIBRL_SELECT_*``).
SELECTIONS = {"all": 0, "random_fraction": 1, "pass_rate": 2}
#: ``pass`` argument of :meth:`Plan.oversize` (``CALIBRL_PASS_*``).
PASS_NOGRAD, PASS_TRAIN = 0, 1
_PASSES = {"nograd": PASS_NOGRAD, "train": PASS_TRAIN}

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


def _invalid(arg: str, what: str) -> InvalidArgumentError:
    """The error the library would give for an argument the C types cannot even hold."""
    return InvalidArgumentError(
        f"`{arg}`: {what} [CALIBRL_STATUS_INVALID_ARGUMENT]", 2, "CALIBRL_STATUS_INVALID_ARGUMENT"
    )


def _uint(value, arg: str, top: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _invalid(arg, f"expected an integer, got {type(value).__name__}")
    if not 0 <= int(value) <= top:
        raise _invalid(arg, f"{int(value)} is outside [0, {top}]")
    return int(value)


def _code(value, table: dict, arg: str) -> int:
    if isinstance(value, str):
        if value not in table:
            raise _invalid(arg, f"unknown name {value!r} (expected one of {sorted(table)})")
        return table[value]
    return _uint(value, arg, _U32_MAX)  # the library names unknown numbers


class SeqKind(enum.IntEnum):
    """``CALIBRL_SEQ_*``."""

    ROLLOUT = 0
    EXPERT = 1


@dataclass
class SchedulerConfig:
    """``calibrl_scheduler_config``, with the defaults of ``calibrl_scheduler_config_default``
    (one rank, 16384-token budgets, one mini-batch, CalibRL, every expert).

    ``loss_kind`` takes a ``CALIBRL_LOSS_*`` number or its name (``"calibrl"``, ``"grpo"``,
    ``"luffy"``, ``"rlplus"``); ``expert_selection`` a ``CALIBRL_SELECT_*`` number or
    ``"all"``, ``"random_fraction"`` (uses ``fraction``, ``seed``), ``"pass_rate"`` (uses
    ``pass_rate_low``/``_high`` and ``reward_threshold``; needs rewards).
    """

    dp_ranks: int = 1
    minibatch_prompts: int = _U32_MAX
    nograd_token_budget: int = 16384
    train_token_budget: int = 16384
    loss_kind: int | str = 0
    expert_selection: int | str = 0
    seed: int = 0
    fraction: float = 1.0
    pass_rate_low: float = 0.0
    pass_rate_high: float = 1.0
    reward_threshold: float = 0.1
    quadratic_coef: float = 1.0 / 24576.0
    #: DAPO dynamic sampling (SPEC §7.6): groups whose rewards are all equal are left out of
    #: both passes, the normalisers and expert selection (needs rewards); see
    #: ``Plan.dropped_prompts``.
    dynamic_sampling: bool = False

    @classmethod
    def from_library(cls) -> "SchedulerConfig":
        """The library's own defaults (``calibrl_scheduler_config_default``)."""
        c = _abi.SchedulerConfigC()
        _lib.call("calibrl_scheduler_config_default", ctypes.byref(c))
        return cls(**{name: getattr(c, name) for name, _ in _abi.SchedulerConfigC._fields_})

    @classmethod
    def coerce(cls, config) -> "SchedulerConfig":
        """A ``SchedulerConfig`` from one, a dict of its fields, or ``None`` (the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls(**config)
        raise TypeError(f"expected a SchedulerConfig, a dict or None, got {type(config).__name__}")

    def to_c(self) -> _abi.SchedulerConfigC:
        """The C struct. Values the C field types cannot hold raise here, naming the field;
        everything else is checked by the library."""
        return _abi.SchedulerConfigC(
            dp_ranks=_uint(self.dp_ranks, "config.dp_ranks", _U32_MAX),
            minibatch_prompts=_uint(self.minibatch_prompts, "config.minibatch_prompts", _U32_MAX),
            nograd_token_budget=_uint(self.nograd_token_budget, "config.nograd_token_budget", _U64_MAX),
            train_token_budget=_uint(self.train_token_budget, "config.train_token_budget", _U64_MAX),
            loss_kind=_code(self.loss_kind, LOSS_KINDS, "config.loss_kind"),
            expert_selection=_code(self.expert_selection, SELECTIONS, "config.expert_selection"),
            seed=_uint(self.seed, "config.seed", _U64_MAX),
            fraction=float(self.fraction),
            pass_rate_low=float(self.pass_rate_low),
            pass_rate_high=float(self.pass_rate_high),
            reward_threshold=float(self.reward_threshold),
            quadratic_coef=float(self.quadratic_coef),
            dynamic_sampling=1 if self.dynamic_sampling else 0,
        )


@dataclass
class Prompt:
    """One prompt of the step: its token count, its rollouts' response lengths, its expert
    response's length (``None``: no expert) and, for pass-rate selection, the rollouts' rewards."""

    prompt_len: int
    rollout_lens: Sequence[int]
    expert_len: int | None = None
    rewards: Sequence[float] | None = None


@dataclass(frozen=True)
class SeqRef:
    """One sequence of the plan: ``id`` (rollout ``i`` → ``i``, expert slot ``s`` → ``R + s``),
    its kind, prompt, rollout index or expert slot, prompt + response ``tokens`` and
    ``response_len``."""

    id: int
    kind: SeqKind
    prompt: int
    index: int
    tokens: int
    response_len: int


@dataclass
class Minibatch:
    """One mini-batch of the training pass: prompts ``first_prompt .. first_prompt +
    num_prompts``, ``microbatches`` per rank, ``train[rank][mb]`` and the global ``normalizers``
    (a dict ``calibrl.loss`` takes as ``normalizers=``)."""

    index: int
    first_prompt: int
    num_prompts: int
    microbatches: int
    normalizers: dict[str, float]
    train: list[list[list[SeqRef]]] = field(repr=False)

    @property
    def prompts(self) -> range:
        return range(self.first_prompt, self.first_prompt + self.num_prompts)

    def seqs(self) -> list[SeqRef]:
        """Every trained sequence of the mini-batch (rank by rank, micro-batch by micro-batch)."""
        return [s for rank in self.train for mb in rank for s in mb]


def _read_ids(fn: str, *args) -> np.ndarray:
    """An ``int64`` array query: size query first, then the read (two-call convention)."""
    n = c_size_t()
    _lib.call(fn, *args, None, 0, ctypes.byref(n))
    out = np.zeros(n.value, dtype=np.int64)
    _lib.call(fn, *args, out.ctypes.data_as(ctypes.POINTER(c_int64)), n.value, ctypes.byref(n))
    return out


class Plan:
    """A plan of one training step (see the module docstring). Owns a ``calibrl_plan*``: use it
    as a context manager or call :meth:`close` to free it at once (``__del__`` frees it too).
    Everything but :meth:`collect_experts` is plain Python data read at construction and stays
    usable after ``close()``."""

    def __init__(self, prompts: Sequence[Prompt], config=None, **overrides):
        self._handle = None
        self._free = _lib.function("calibrl_plan_free")
        cfg = SchedulerConfig.coerce(config)
        if overrides:
            cfg = replace(cfg, **overrides)
        self.config = cfg
        c_cfg = cfg.to_c()
        descs, lens, rewards = _describe(prompts)
        handle = c_void_p()
        _lib.call(
            "calibrl_plan_new",
            ctypes.byref(c_cfg),
            descs,
            len(descs),
            lens.ctypes.data_as(ctypes.POINTER(c_uint32)),
            len(lens),
            None if rewards is None else rewards.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
            ctypes.byref(handle),
        )
        self._handle = handle
        self._read()

    # -- construction ------------------------------------------------------------------------

    def _read(self):
        h = self._handle
        info = _abi.PlanInfo()
        _lib.call("calibrl_plan_summary", h, ctypes.byref(info))
        self.summary: dict[str, int] = {name: int(getattr(info, name)) for name, _ in info._fields_}
        self.num_rollouts = self.summary["num_rollouts"]
        self.seqs: list[SeqRef] = [self._seq(i) for i in range(self.num_rollouts + self.summary["num_expert_slots"])]
        ranks = self.summary["dp_ranks"]
        self.nograd: list[list[list[SeqRef]]] = [
            [self._microbatch("calibrl_plan_nograd_microbatch", r, m) for m in range(self.summary["nograd_microbatches"])]
            for r in range(ranks)
        ]
        self.minibatches: list[Minibatch] = []
        for b in range(self.summary["num_minibatches"]):
            mi = _abi.MinibatchInfo()
            _lib.call("calibrl_plan_minibatch", h, b, ctypes.byref(mi))
            norm = _abi.Normalizers()
            _lib.call("calibrl_plan_normalizers", h, b, ctypes.byref(norm))
            train = [
                [self._microbatch("calibrl_plan_train_microbatch", b, r, m) for m in range(mi.microbatches)]
                for r in range(ranks)
            ]
            self.minibatches.append(
                Minibatch(
                    index=b,
                    first_prompt=int(mi.first_prompt),
                    num_prompts=int(mi.num_prompts),
                    microbatches=int(mi.microbatches),
                    normalizers={name: getattr(norm, name) for name, _ in _abi.Normalizers._fields_},
                    train=train,
                )
            )
        self.gather_map: np.ndarray = _read_ids("calibrl_plan_gather_map", h)
        self.expert_prompts: np.ndarray = _read_ids("calibrl_plan_expert_prompts", h)
        #: Prompts left out by dynamic sampling (all-equal rewards): sample this many more.
        self.dropped_prompts: np.ndarray = _read_ids("calibrl_plan_dropped_prompts", h)
        self.expert_offsets: np.ndarray = _read_ids("calibrl_plan_expert_offsets", h)
        self._oversize = {p: [int(i) for i in _read_ids("calibrl_plan_oversize", h, c_uint32(p))] for p in _PASSES.values()}

    def _seq(self, seq_id: int) -> SeqRef:
        s = _abi.SeqInfo()
        _lib.call("calibrl_plan_seq", self._handle, seq_id, ctypes.byref(s))
        return SeqRef(seq_id, SeqKind(s.kind), s.prompt, s.index, s.tokens, s.response_len)

    def _microbatch(self, fn: str, *where) -> list[SeqRef]:
        """One micro-batch's sequences (ids only: kinds and the rest come from ``self.seqs``)."""
        n = c_size_t()
        _lib.call(fn, self._handle, *where, None, None, 0, ctypes.byref(n))
        ids = np.zeros(n.value, dtype=np.int64)
        _lib.call(fn, self._handle, *where, ids.ctypes.data_as(ctypes.POINTER(c_int64)), None, n.value, ctypes.byref(n))
        return [self.seqs[i] for i in ids.tolist()]

    # -- queries ------------------------------------------------------------------------------

    def seq(self, seq_id: int) -> SeqRef:
        """The sequence with id ``seq_id``."""
        if not 0 <= seq_id < len(self.seqs):
            raise _invalid("seq_id", f"{seq_id} is out of range (must be in 0..{len(self.seqs)})")
        return self.seqs[seq_id]

    def oversize(self, which: int | str) -> list[int]:
        """Ids of the sequences longer than a pass's budget (``"nograd"``/``PASS_NOGRAD`` or
        ``"train"``/``PASS_TRAIN``); each sits alone in a micro-batch."""
        code = _PASSES.get(which, which) if isinstance(which, str) else which
        if code not in self._oversize:
            raise _invalid("pass", f"unknown pass {which!r} (expected 'nograd' or 'train')")
        return list(self._oversize[code])

    def nograd_seqs(self, rank: int = -1) -> list[SeqRef]:
        """The no-grad pass's sequences in plan order (micro-batch by micro-batch), of one rank
        or of all ranks in rank order (``rank=-1``): the order of ``collect_experts``' input."""
        ranks = self.nograd if rank == -1 else [self.nograd[rank]]
        return [s for r in ranks for mb in r for s in mb]

    # -- the expert helper ---------------------------------------------------------------------

    def collect_experts(
        self,
        nograd_logprobs,
        rank: int = -1,
        *,
        length_normalize: bool = False,
        expert_logprobs=True,
        expert_sums=True,
    ):
        """The expert baseline from the no-grad pass's output (``calibrl_plan_collect_experts``).

        ``nograd_logprobs``: 1-D float (CPU), the response-token log-probs of
        :meth:`nograd_seqs` ``(rank)`` packed in that order. Returns
        ``(expert_logprobs [T*], expert_sums [P*])``: the packed expert tensor (offsets
        ``expert_offsets``) and ``E_g`` per slot (divided by the expert's length with
        ``length_normalize``). ``True`` allocates an output (the input's kind and float dtype),
        ``None``/``False`` skips it, or pass a buffer. With one rank's part, other ranks' slots
        are 0: sum the outputs over ranks.
        """
        from .ops import _float_dtype, _new

        if self._handle is None:
            raise _invalid("plan", "the plan was closed")
        src = as_array(nograd_logprobs, "nograd_logprobs")
        dt = _float_dtype(src)
        if expert_logprobs is True:
            expert_logprobs = _new(src, (self.summary["expert_tokens"],), dt)
        elif expert_logprobs is False:
            expert_logprobs = None
        if expert_sums is True:
            expert_sums = _new(src, (self.summary["num_expert_slots"],), dt)
        elif expert_sums is False:
            expert_sums = None
        views = [
            view(src, "nograd_logprobs"),
            view(expert_logprobs, "expert_logprobs", writable=True),
            view(expert_sums, "expert_sums", writable=True),
        ]
        _lib.call(
            "calibrl_plan_collect_experts",
            self._handle,
            int(rank),
            *[ptr(v) for v in views],
            bool(length_normalize),
            stream_for(views),
        )
        return expert_logprobs, expert_sums

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def handle(self) -> c_void_p | None:
        """The raw ``calibrl_plan*`` (``None`` once closed)."""
        return self._handle

    def close(self) -> None:
        """Frees the handle (idempotent). The plain data stays usable."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None and handle.value:
            self._free(handle)

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Plan({s['num_prompts']} prompts, {s['num_rollouts']} rollouts, "
            f"{s['num_expert_slots']} experts, {s['dp_ranks']} ranks, "
            f"{s['nograd_microbatches']} no-grad micro-batches/rank, {s['num_minibatches']} mini-batches)"
        )


def _describe(prompts: Sequence[Any]):
    """``calibrl_prompt_desc[]``, the rollout lengths and the rewards (or ``None``) of the step,
    checking what the C types cannot hold (negative or huge numbers) with the argument named."""
    prompts = list(prompts)
    descs = (_abi.PromptDesc * len(prompts))()
    lens: list[int] = []
    rewards: list[float] = []
    with_rewards = [getattr(p, "rewards", None) is not None for p in prompts]
    if any(with_rewards) and not all(with_rewards):
        g = with_rewards.index(not with_rewards[0])
        raise _invalid(f"prompts[{g}].rewards", "give rewards for every prompt or for none")
    for g, p in enumerate(prompts):
        rl = list(p.rollout_lens)
        for j, n in enumerate(rl):
            lens.append(_uint(n, f"prompts[{g}].rollout_lens[{j}]", _U32_MAX))
        expert = getattr(p, "expert_len", None)
        descs[g] = _abi.PromptDesc(
            prompt_len=_uint(p.prompt_len, f"prompts[{g}].prompt_len", _U32_MAX),
            num_rollouts=_uint(len(rl), f"prompts[{g}].rollout_lens", _U32_MAX),
            expert_len=-1 if expert is None else _uint(expert, f"prompts[{g}].expert_len", _U32_MAX),
        )
        if with_rewards[g]:
            r = [float(x) for x in p.rewards]
            if len(r) != len(rl):
                raise _invalid(f"prompts[{g}].rewards", f"has {len(r)} rewards for {len(rl)} rollouts")
            rewards.extend(r)
    return (
        descs,
        np.asarray(lens, dtype=np.uint32),
        np.asarray(rewards, dtype=np.float64) if any(with_rewards) else None,
    )


def plan(prompts: Sequence[Prompt], config=None, **overrides) -> Plan:
    """Plans one training step (SPEC §7). ``config``: a :class:`SchedulerConfig`, a dict of its
    fields or ``None``; keyword arguments override fields (``plan(ps, dp_ranks=8)``)."""
    return Plan(prompts, config, **overrides)


__all__ = [
    "LOSS_KINDS",
    "PASS_NOGRAD",
    "PASS_TRAIN",
    "SELECTIONS",
    "Minibatch",
    "Plan",
    "Prompt",
    "SchedulerConfig",
    "SeqKind",
    "SeqRef",
    "plan",
]
