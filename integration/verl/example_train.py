"""End-to-end CalibRL training with verl 0.9.1 on the CPU (a few seconds).

A tiny bigram policy learns a verifiable task (the first response token must be the prompt's
answer; reward 1 only then, so correct answers are rare at first). Each step is what verl's
RayPPOTrainer does, with verl's own code: rollouts → rewards (``token_level_scores``) → GRPO
advantages (``compute_grpo_outcome_advantage``) → old log-probs and the expert pass
(``attach_expert_log_probs``: the compute_log_prob path, one no-grad forward) → correctness
(``attach_correctness``) → the actor update (``left_right_2_no_padding``, ``make_iterator``,
``prepare_micro_batches``, ``verl.workers.utils.losses.ppo_loss`` → the registered ``calibrl``
loss). verl 0.9.1 has no CPU platform for its FSDP engine, so only the model forward/backward
and the optimizer step (the engine's job) are this file's.

    python integration/verl/example_train.py [--preset paper|grpo] [--steps 30]
"""

from __future__ import annotations

import argparse

import torch

from verl_harness import PAD, VOCAB, TinyPolicy, actor_config, build_batch, update

ANSWERS = {t: (5 * t) % (VOCAB - 1) + 1 for t in range(1, VOCAB)}


def rollouts(model, prompts, n, g):
    """n sampled responses of 2 tokens per prompt (prompt = 2 tokens, no padding)."""
    prev = prompts[:, -1].repeat_interleave(n)
    out = []
    with torch.no_grad():
        for _ in range(2):
            probs = torch.softmax(torch.tanh(model.emb[prev]) @ model.head, -1)
            probs[:, PAD] = 0
            prev = torch.multinomial(probs, 1, generator=g)[:, 0]
            out.append(prev)
    return torch.stack(out, 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    model = TinyPolicy(seed=args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    config = actor_config(f"actor_rollout_ref.actor.policy_loss.calibrl.preset={args.preset}")
    n, prompts_per_step, history = 4, 8, []
    for step in range(args.steps):
        prompts = torch.randint(1, VOCAB, (prompts_per_step, 2), generator=g)
        responses = rollouts(model, prompts, n, g)
        answer = torch.tensor([ANSWERS[int(t)] for t in prompts[:, -1]]).repeat_interleave(n)
        rewards = (responses[:, 0] == answer).float()
        expert = torch.stack([answer, answer], 1)  # the expert's (correct) response
        uid = [f"s{step}p{i // n}" for i in range(len(responses))]
        data = build_batch(model, prompts.repeat_interleave(n, 0), responses, rewards, uid, expert)
        losses, metrics = update(model, optimizer, data, config, micro_batch_size=8)
        history.append((rewards.mean().item(), sum(losses)))
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  reward {history[-1][0]:.3f}  loss {history[-1][1]:+.4f}")
    return history, model


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
