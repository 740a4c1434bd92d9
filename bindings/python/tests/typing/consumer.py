"""A small program written against calibrl's public types; CI runs `mypy --strict` on it with the
installed wheel (py.typed), so a type checker sees real signatures, not `Any`."""

import numpy as np

import calibrl
from calibrl import Config, LossInputs, LossResult


def grpo_step(config: Config) -> float:
    rewards = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float64)
    groups = np.array([0, 0, 1, 1], dtype=np.int64)
    advantages, weights, signs = calibrl.group_advantages(rewards, groups, 2, config=config)
    logprobs = np.full((4, 3), -0.5, dtype=np.float32)
    inputs = LossInputs(
        advantages=advantages,
        weights=weights,
        signs=signs,
        mask=np.ones((4, 3), dtype=np.float32),
        normalizers=(12.0, 4.0),
    )
    result: LossResult = calibrl.loss(config, logprobs, inputs)
    metrics: dict[str, float] = result.metrics
    return result.loss + metrics["num_tokens"] * 0.0


if __name__ == "__main__":
    print(grpo_step(Config("grpo")))
