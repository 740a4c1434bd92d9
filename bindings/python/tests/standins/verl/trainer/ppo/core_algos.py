"""Stand-in for ``verl.trainer.ppo.core_algos``: the policy-loss registry with verl's signature.

verl's ``PolicyLossFn`` is
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_log_probs)
-> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.
"""

from typing import Callable

POLICY_LOSS_REGISTRY: dict = {}


def register_policy_loss(name: str) -> Callable:
    def decorator(func):
        POLICY_LOSS_REGISTRY[name] = func
        return func

    return decorator


def get_policy_loss_fn(name):
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(POLICY_LOSS_REGISTRY.keys())}")
    return POLICY_LOSS_REGISTRY[name]
