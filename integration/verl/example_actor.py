"""A minimal verl-style actor update using the registered ``calibrl`` policy loss.

It mirrors the policy-loss part of verl's ``DataParallelPPOActor.update_policy``: look the loss
up by ``config.policy_loss.loss_mode`` and call it with verl's arguments; the one added line is
the ``calibrl.integrations.verl.micro_batch(model_inputs)`` block. Used by
bindings/python/tests/test_verl.py.
"""

from __future__ import annotations

import torch

import calibrl.integrations.verl as calibrl_verl  # registers "calibrl" with verl
from verl.trainer.ppo.core_algos import get_policy_loss_fn


class TinyPolicy(torch.nn.Module):
    def __init__(self, vocab=16, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def log_prob(self, tokens):
        logits = self.head(self.embedding(tokens[:, :-1]))
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]


def update_policy(actor, optimizer, config, micro_batches):
    optimizer.zero_grad()
    metrics = []
    for model_inputs in micro_batches:
        log_prob = actor.log_prob(model_inputs["input_ids"])
        policy_loss_fn = get_policy_loss_fn(config["policy_loss"]["loss_mode"])
        with calibrl_verl.micro_batch(model_inputs):  # <- the added line
            pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = policy_loss_fn(
                old_log_prob=model_inputs["old_log_probs"],
                log_prob=log_prob,
                advantages=model_inputs["advantages"],
                response_mask=model_inputs["response_mask"],
                loss_agg_mode=config["loss_agg_mode"],
                config=config,
                rollout_log_probs=None,
            )
        (pg_loss / len(micro_batches)).backward()
        metrics.append({"actor/pg_loss": pg_loss.item(), "actor/pg_clipfrac": pg_clipfrac.item(),
                        "actor/ppo_kl": ppo_kl.item(), "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()})
    optimizer.step()
    return metrics
