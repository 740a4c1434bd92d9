"""The toy RL task of the end-to-end examples (framework-free): prompts, sampled rollouts, a
verifiable reward, one expert response per prompt, and padded micro-batches built from the
scheduler's plan (calibrl.plan).

Task: the prompt is two tokens ``a b``; the verified answer (the expert response) is
``a+b, a+2b, a+3b`` (mod V). The reward is the fraction of answer tokens a rollout gets right.

Layout of one sequence in a padded ``[B, S]`` micro-batch: ``tokens = prompt + response``
(the model input), ``labels[t] = tokens[t+1]``; response token j is predicted at position
``prompt_len − 1 + j``, where ``mask`` is 1. The expert's token j sits at the same position of
each of its prompt's rows (the expert carried per row).
"""

from __future__ import annotations

import torch

import calibrl

VOCAB, PROMPT_LEN, ANSWER_LEN, S = 16, 2, 3, 8


def make_prompts(num: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (num, PROMPT_LEN), generator=g)


def answer(prompt: torch.Tensor) -> torch.Tensor:
    a, b = int(prompt[0]), int(prompt[1])
    return torch.tensor([(a + k * b) % VOCAB for k in range(1, ANSWER_LEN + 1)])


@torch.no_grad()
def sample(next_logits, prompts: torch.Tensor, group: int, seed: int) -> list[list[torch.Tensor]]:
    """``group`` rollouts per prompt of 2..ANSWER_LEN+1 tokens, sampled from the policy
    (``next_logits(tokens [N, T]) -> [N, V]``); the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in prompts:
        seqs = []
        for _ in range(group):
            length = int(torch.randint(2, ANSWER_LEN + 2, (1,), generator=g))
            tokens = p.clone()
            for _ in range(length):
                probs = torch.softmax(next_logits(tokens[None]).double()[0], -1)
                tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)])
            seqs.append(tokens[PROMPT_LEN:])
        out.append(seqs)
    return out


def reward(response: torch.Tensor, prompt: torch.Tensor) -> float:
    ans = answer(prompt)
    n = min(len(response), len(ans))
    return float((response[:n] == ans[:n]).sum()) / len(ans)


class Step:
    """One training step's data: rollouts, rewards, advantages, the expert responses and the plan."""

    def __init__(self, prompts: torch.Tensor, rollouts: list[list[torch.Tensor]], dp_ranks: int, *,
                 config, train_token_budget: int, minibatch_prompts: int):
        self.prompts, self.config = prompts, calibrl.Config.coerce(config)
        self.responses = [r for group in rollouts for r in group]  # rollout id order
        self.group_ids = torch.tensor([g for g, group in enumerate(rollouts) for _ in group])
        self.rewards = torch.tensor([reward(r, prompts[g]) for r, g in zip(self.responses, self.group_ids.tolist())])
        self.experts = [answer(p) for p in prompts]
        self.adv, self.weights, self.signs = calibrl.group_advantages(self.rewards, self.group_ids, config=self.config)
        self.plan = calibrl.plan(
            [calibrl.Prompt(PROMPT_LEN, [len(r) for r in group], ANSWER_LEN) for group in rollouts],
            dp_ranks=dp_ranks, train_token_budget=train_token_budget, nograd_token_budget=4 * S,
            minibatch_prompts=minibatch_prompts,
        )
        self.old = torch.zeros(len(self.responses), S)  # ℓold per rollout, at its label positions
        self.expert_lp = torch.zeros(len(self.plan.expert_prompts), S)  # ℓ* per expert slot

    def response(self, seq) -> torch.Tensor:
        return self.responses[seq.index] if seq.kind == calibrl.SeqKind.ROLLOUT else self.experts[seq.prompt]

    def padded(self, seqs) -> dict:
        """``tokens``, ``labels``, ``mask`` ``[B, S]`` of a list of plan sequences."""
        b = len(seqs)
        tokens, labels, mask = torch.zeros(b, S, dtype=torch.long), torch.zeros(b, S, dtype=torch.long), torch.zeros(b, S)
        for i, s in enumerate(seqs):
            full = torch.cat([self.prompts[s.prompt], self.response(s)])
            tokens[i, :len(full)] = full
            labels[i, :len(full) - 1] = full[1:]
            mask[i, PROMPT_LEN - 1:len(full) - 1] = 1
        return {"tokens": tokens, "labels": labels, "mask": mask}

    def store_nograd(self, seqs, logprobs: torch.Tensor):
        """Keep the no-grad pass's log-probs ``[B, S]`` of ``seqs`` (rollouts: ℓold; expert
        slots: ℓ*). Each rank stores its own share; :meth:`gather` sums the shares."""
        for i, s in enumerate(seqs):
            if s.kind == calibrl.SeqKind.ROLLOUT:
                self.old[s.index] = logprobs[i]
            else:
                self.expert_lp[s.index] = logprobs[i]

    def gather(self, all_reduce):
        """Every rank gets every rollout's ℓold and every expert's ℓ* (``all_reduce`` sums a
        tensor over the data-parallel ranks in place)."""
        all_reduce(self.old)
        all_reduce(self.expert_lp)

    def train_batch(self, seqs, normalizers) -> dict:
        """A training micro-batch: padded tokens and the :class:`calibrl.LossInputs`, the expert
        carried per row at the rows' response positions (token-aligned Δ and sequence sums alike)."""
        batch = self.padded(seqs)
        ids = torch.tensor([s.index for s in seqs])
        slot = torch.as_tensor(self.plan.gather_map)[ids]
        e_lp = torch.where((slot >= 0)[:, None], self.expert_lp[slot.clamp(min=0)], torch.zeros(()))
        e_mask = torch.zeros_like(e_lp)
        e_mask[:, PROMPT_LEN - 1:PROMPT_LEN - 1 + ANSWER_LEN] = 1
        e_mask = e_mask * (slot >= 0)[:, None]
        batch["inputs"] = calibrl.LossInputs(
            advantages=self.adv[ids], weights=self.weights[ids], signs=self.signs[ids], mask=batch["mask"],
            old_logprobs=self.old[ids], expert_logprobs=e_lp * e_mask, expert_mask=e_mask,
            expert_index=torch.where(slot >= 0, torch.arange(len(seqs)), -1), normalizers=normalizers,
        )
        return batch


def spawn_ranks(worker, *args, nprocs: int = 2) -> None:
    """Runs ``worker(rank, nprocs, port, *args)`` in ``nprocs`` processes (gloo rendezvous on a
    free loopback port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs, join=True)
