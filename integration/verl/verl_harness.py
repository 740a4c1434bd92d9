"""A tiny policy and verl's own batch handling around it, for the tests and the example.

Everything between the DataProto and the loss is verl 0.9.1's code: DataProto, its DP chunking,
``left_right_2_no_padding``, ``tensordict_utils.make_iterator`` (mini-batches, shuffle),
``prepare_micro_batches`` (micro-batches, dynamic batch size), ``no_padding_2_padding``, GRPO
advantages, the Hydra config and ``verl.workers.utils.losses.ppo_loss``. Only the model forward
and the optimizer loop (FSDP's job in verl) are ours: a bigram policy in float64.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from tensordict import TensorDict

from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import calibrl.integrations.verl as calibrl_verl

VOCAB, PAD = 12, 0
F64 = torch.float64


class TinyPolicy(torch.nn.Module):
    """p(next | previous token): small enough to compare updates to 1e-6 in float64."""

    def __init__(self, seed=0, hidden=6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, hidden, generator=g, dtype=F64) * 0.8)
        self.head = torch.nn.Parameter(torch.randn(hidden, VOCAB, generator=g, dtype=F64) * 0.8)

    def next_log_probs(self, ids):
        """[L] ids → [L]: log p(ids[t+1] | ids[t]); the last position (no next token) is 0."""
        logits = torch.tanh(self.emb[ids[:-1]]) @ self.head
        lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
        return torch.cat([lp, lp.new_zeros(1)])

    def model_output(self, micro_batch: TensorDict) -> dict:
        """What verl's engine hands the loss: log-probs in the no-padding layout (flat tokens)."""
        ids = micro_batch["input_ids"]  # nested [B, j]
        offsets = ids.offsets().tolist()
        flat = ids.values()
        parts = [self.next_log_probs(flat[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        return {"log_probs": torch.cat(parts)}

    def response_log_probs(self, batch: DataProto) -> torch.Tensor:
        """Independent of verl: each row's response log-probs, [B, Lr] padded with 0."""
        prompts, responses = batch.batch["prompts"], batch.batch["responses"]
        attn = batch.batch["attention_mask"]
        lp_len = prompts.shape[1]
        rows = []
        for i in range(len(prompts)):
            p = prompts[i][attn[i, :lp_len].bool()]
            r = responses[i][attn[i, lp_len:].bool()]
            seq = torch.cat([p, r])
            lp = self.next_log_probs(seq)[len(p) - 1 : len(seq) - 1]
            rows.append(torch.nn.functional.pad(lp, (0, responses.shape[1] - len(r))))
        return torch.stack(rows)


def verl_compute_log_prob(model: TinyPolicy, data: DataProto) -> torch.Tensor:
    """The no-grad forward pass the way RayPPOTrainer._compute_old_log_prob runs it: no-padding
    conversion, forward, back to padded [B, Lr]."""
    td = left_right_2_no_padding(data.to_tensordict())
    with torch.no_grad():
        flat = model.model_output(td)["log_probs"]
    return no_padding_2_padding(flat, td)


def build_batch(model, prompt_ids, responses, rewards, uid, expert_responses=None, old_noise=0.0, seed=0,
                threshold=0.1) -> DataProto:
    """A GRPO batch the way verl's trainer holds it before the update: left-padded prompts
    (``PAD`` = padding), right-padded responses, outcome rewards on the last response token,
    GRPO advantages (verl's, unnormalised as in the paper), old log-probs, correctness, and each
    row's expert response log-probs from verl's compute_log_prob path."""
    p_mask = prompt_ids != PAD
    r_mask = responses != PAD
    attn = torch.cat([p_mask, r_mask], 1).long()
    data = DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": responses,
            "input_ids": torch.cat([prompt_ids, responses], 1),
            "attention_mask": attn,
            "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
            "response_mask": r_mask.long(),
        },
        non_tensors={"uid": np.asarray(uid, dtype=object)},
    )
    b = len(responses)
    scores = torch.zeros(responses.shape)
    scores[torch.arange(b), r_mask.sum(1) - 1] = rewards.float()  # verl: reward on the last token
    data.batch["token_level_scores"] = scores
    data.batch["token_level_rewards"] = scores.clone()
    adv, _ = compute_grpo_outcome_advantage(
        scores, data.batch["response_mask"], data.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=False
    )
    data.batch["advantages"] = adv
    old = verl_compute_log_prob(model, data).float()
    if old_noise:  # behaviour log-probs a little off the current policy, so clipping happens
        g = torch.Generator().manual_seed(seed + 1)
        old = old + old_noise * torch.randn(old.shape, generator=g) * r_mask
    data.batch["old_log_probs"] = old
    if expert_responses is not None:
        data.batch[calibrl_verl.EXPERT_RESPONSES] = expert_responses
        data.batch[calibrl_verl.EXPERT_MASK] = (expert_responses != PAD).long()
        calibrl_verl.attach_expert_log_probs(data, functools.partial(verl_compute_log_prob, model))
    calibrl_verl.attach_correctness(data, threshold=threshold)
    return data


def make_batch(model: TinyPolicy, prompts=4, n=4, seed=0, expert=True) -> DataProto:
    """A random batch: varied prompt, response and expert lengths; ~40 % correct rollouts."""
    g = torch.Generator().manual_seed(seed)
    b, lp_len, lr_len, le_len = prompts * n, 3, 5, 6
    p_len = torch.randint(1, lp_len + 1, (prompts,), generator=g).repeat_interleave(n)
    r_len = torch.randint(1, lr_len + 1, (b,), generator=g)
    e_len = torch.randint(2, le_len + 1, (prompts,), generator=g).repeat_interleave(n)
    p_tok = torch.randint(1, VOCAB, (prompts, lp_len), generator=g).repeat_interleave(n, 0)
    prompt_ids = torch.where(torch.arange(lp_len)[None] >= (lp_len - p_len)[:, None], p_tok, PAD)
    responses = torch.where(torch.arange(lr_len)[None] < r_len[:, None],
                            torch.randint(1, VOCAB, (b, lr_len), generator=g), PAD)
    e_tok = torch.randint(1, VOCAB, (prompts, le_len), generator=g).repeat_interleave(n, 0)
    experts = torch.where(torch.arange(le_len)[None] < e_len[:, None], e_tok, PAD) if expert else None
    rewards = (torch.rand(b, generator=g) < 0.4).float()
    uid = [f"p{i // n}" for i in range(b)]
    return build_batch(model, prompt_ids, responses, rewards, uid, experts, old_noise=0.3, seed=seed)


@functools.lru_cache(maxsize=None)
def actor_config(*overrides: str):
    """verl's actor config, composed by verl's Hydra config with the README's overrides."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=list(README_OVERRIDES) + list(overrides))
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


# The overrides of integration/verl/README.md (a test checks the README shows them).
README_OVERRIDES = (
    "actor_rollout_ref.actor.policy_loss._target_=calibrl.integrations.verl.CalibRLPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=calibrl",
    "+actor_rollout_ref.actor.policy_loss.calibrl={preset:paper,lambda:0.1,alpha:0.5}",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "algorithm.adv_estimator=grpo",
    "algorithm.norm_adv_by_std_in_grpo=False",
)


def update(model, optimizer, data: DataProto, config, *, micro_batch_size, dp_group=None, shuffle=True,
           dynamic_bsz=False, max_token_len=12, loss_fn=calibrl_verl.ppo_loss, seed=7):
    """One actor update on one mini-batch (this rank's share), as verl 0.9.1's
    ``TrainingWorker.train_mini_batch`` → ``FSDPEngine.forward_backward_batch`` do it: the
    trainer's non-tensor keys, the iterator (shuffle), the engine's global token count and
    dp_size, its micro-batches, the loss function per micro-batch, backward; then the DP
    gradient average (FSDP's reduce-scatter mean) and the optimizer step. Returns the
    micro-batch losses and metrics."""
    dp_size = torch.distributed.get_world_size(dp_group) if dp_group is not None else 1
    rank = torch.distributed.get_rank(dp_group) if dp_group is not None else 0
    td = left_right_2_no_padding(data.to_tensordict())
    rows = len(data)
    tu.assign_non_tensor(td, global_batch_size=rows * dp_size)  # the trainer: ppo_mini_batch_size * n
    (mini,) = list(tu.make_iterator(td, mini_batch_size=rows, epochs=1, seed=seed + rank,
                                    dataloader_kwargs={"shuffle": shuffle}))
    tokens = mini["loss_mask"].sum().to(F64)
    if dp_group is not None:
        torch.distributed.all_reduce(tokens, group=dp_group)
    tu.assign_non_tensor(mini, batch_num_tokens=tokens.item(), dp_size=dp_size, use_dynamic_bsz=dynamic_bsz,
                         micro_batch_size_per_gpu=micro_batch_size, max_token_len_per_gpu=max_token_len)
    micro_batches, _ = prepare_micro_batches(mini, dp_group=dp_group, same_micro_num_in_dp=True)
    optimizer.zero_grad()
    losses, metrics = [], []
    for mb in micro_batches:
        loss, m = loss_fn(config=config, model_output=model.model_output(mb), data=mb, dp_group=dp_group)
        loss.backward()
        losses.append(loss.item())
        metrics.append(m)
    if dp_group is not None:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG, group=dp_group)
    optimizer.step()
    return losses, metrics
