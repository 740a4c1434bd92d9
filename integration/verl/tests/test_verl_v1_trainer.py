"""verl 0.9.1's default V1 trainer (``trainer.use_v1=True``) with CalibRL's trainer class: one
training step's old-log-prob pass, GRPO advantages and actor update (with the expert pass)
through verl's own code, on a real TransferQueue (local Ray), as far as verl runs on a CPU.

What runs is verl's: ``PPOTrainer._compute_old_log_prob`` / ``_compute_advantage`` /
``_update_actor`` (CalibRL's subclass adds the expert pass), the TransferQueue reads and writes,
the ``tqbridge`` of the worker methods (``KVBatchMeta`` → ``TensorDict`` → queue),
``ActorRolloutRefWorker.compute_log_prob`` / ``update_actor``, ``TrainingWorker.infer_batch`` /
``train_mini_batch`` / ``train_batch`` / ``_postprocess_output``, ``BaseEngine.train_batch`` /
``infer_batch``, ``FSDPEngine.forward_backward_batch`` (global token count, micro-batches,
backward, ``postprocess_batch_func``) and ``ppo_loss``.

Where verl stops on a CPU: its FSDP engine's model (``FSDPEngineWithLMHead.forward_step``, the
FSDP-wrapped HF model) and its device lookups, which fall back to CUDA (verl 0.9.1 has no CPU
platform). The engine here is verl's ``FSDPEngine`` with the tiny float64 policy's
``forward_step`` and an SGD step, and ``get_device_id`` / ``get_torch_device`` point at the
CPU; the worker group calls the one rank's worker in this process (what Ray's dispatch does
for dp=1). Reference: the float64 SPEC loss of the whole batch, computed from the rows.
"""

import contextlib
import functools
import os
import socket
import types

import pytest
import torch

pytest.importorskip("transfer_queue")
import ray  # noqa: E402
import transfer_queue as tq  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import calibrl.integrations.verl as cv  # noqa: E402
import spec_reference as ref  # noqa: E402
from verl_harness import F64, PAD, README_OVERRIDES, TinyPolicy, actor_config  # noqa: E402

PROMPTS, N = 2, 4
LR = 0.5


def trainer_config(*overrides):
    """verl's full trainer config (the DictConfig the V1 trainer holds)."""
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(README_OVERRIDES) + [
            f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}", f"actor_rollout_ref.rollout.n={N}",
            "actor_rollout_ref.actor.shuffle=False",
            "actor_rollout_ref.rollout.calculate_log_probs=False",  # no rollout log-probs without a rollout server
            *overrides])


@pytest.fixture(scope="module")
def queue():
    """A local Ray with verl's TransferQueue, and a one-rank gloo group (the engine's DP group)."""
    # logical CPUs: the queue's controller and its two storage units take one each
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tq.init()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield tq
    finally:
        torch.distributed.destroy_process_group()
        tq.close()
        ray.shutdown()


@pytest.fixture
def on_cpu(monkeypatch):
    """verl's device lookups fall back to CUDA without a GPU: point them at the CPU."""
    from verl.workers import engine_workers
    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    memory = types.SimpleNamespace(max_memory_allocated=lambda: 0, max_memory_reserved=lambda: 0)
    monkeypatch.setattr(engine_workers, "get_torch_device", lambda: memory)


def _engine_class():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    class TinyEngine(FSDPEngine):
        """verl's FSDPEngine with the tiny policy as its model (forward_step) and SGD as its
        optimizer step; forward_backward_batch, train_batch and infer_batch are verl's."""

        def __init__(self, model):  # FSDPEngine.__init__ builds the FSDP module: not on a CPU
            self.model = model
            self.optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            self.ulysses_sequence_parallel_size = 1

        def get_data_parallel_size(self):
            return 1

        def get_data_parallel_rank(self):
            return 0

        def get_data_parallel_group(self):
            return torch.distributed.group.WORLD

        def is_mp_src_rank_with_outputs(self):
            return True

        @contextlib.contextmanager
        def train_mode(self, **kwargs):
            yield

        eval_mode = train_mode

        def _gradient_sync_context(self, is_last_micro_batch):
            return contextlib.nullcontext()

        def optimizer_step(self):
            norm = torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm().item()
            self.optimizer.step()
            return norm

        def lr_scheduler_step(self):
            return LR

        def forward_step(self, micro_batch, loss_function, forward_only):
            ids = micro_batch["input_ids"]
            flat = self.model.model_output(micro_batch)["log_probs"]
            log_probs = torch.nested.nested_tensor_from_jagged(flat, offsets=ids.offsets())
            model_output = {"log_probs": log_probs}
            from verl.utils import tensordict_utils as tu

            if tu.get_non_tensor_data(micro_batch, "calculate_entropy", False):  # a metric (entropy_coeff 0)
                model_output["entropy"] = torch.nested.nested_tensor_from_jagged(torch.zeros_like(flat),
                                                                                 offsets=ids.offsets())
            if loss_function is not None:
                loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                              dp_group=self.get_data_parallel_group())
            else:
                loss, metrics = torch.tensor(1.0), {}
            detached = {k: v.detach() for k, v in model_output.items()}
            return loss, {"model_output": detached, "loss": loss.detach().item(), "metrics": metrics}

    return TinyEngine


class OneRankWorkerGroup:
    """The actor worker group with one rank, called in this process: the trainer's
    ``actor_rollout_wg`` (Ray would dispatch the whole KVBatchMeta to rank 0 for dp=1)."""

    def __init__(self, worker):
        self.worker = worker
        self.calls = []

    def compute_log_prob(self, meta):
        self.calls.append(("compute_log_prob", list(meta.keys)))
        return type(self.worker).compute_log_prob(self.worker, meta)

    def update_actor(self, meta):
        self.calls.append(("update_actor", list(meta.keys)))
        return type(self.worker).update_actor(self.worker, meta)


def _worker(model, actor_cfg):
    """CalibRL's ActorRolloutRefWorker as init_model leaves it (verl's TrainingWorker around the
    engine, verl's ppo_loss as its loss), then ``install`` as its init_model does."""
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    training = object.__new__(TrainingWorker)
    training.engine = _engine_class()(model)
    training.engine_config = types.SimpleNamespace(
        forward_only=False, use_dynamic_bsz=False, max_token_len_per_gpu=64, micro_batch_size_per_gpu=2,
        use_fused_kernels=False, infer_max_token_len_per_gpu=64, infer_micro_batch_size_per_gpu=4)
    training.model_config = {}
    training.device_name = "cpu"
    training.profiler = types.SimpleNamespace(rank=0, step=lambda: None, check_enable=lambda: False)  # off
    training.flops_counter = types.SimpleNamespace(estimate_flops=lambda *a, **k: (1.0, 1.0))
    worker = object.__new__(cv.CalibRLActorRolloutRefWorker)  # Worker.__init__ joins the Ray/torch group
    worker._Worker__dispatch_dp_rank, worker._Worker__collect_dp_rank = {}, {}
    worker.set_dispatch_collect(mesh_name="actor", dispatch_dp_rank={"train": 0}, collect_dp_rank={"train": True})
    worker.enable_routing_replay = False
    worker.actor = training
    worker.loss_fn = functools.partial(ppo_loss, config=actor_cfg)
    training.set_loss_fn(worker.loss_fn)
    cv.install(worker)
    return worker


def _rows(seed=4):
    """Rows as verl's agent loop puts them in the queue (unpadded per row), plus each
    sample's expert response (``[S*]`` padded with its mask, from the dataset)."""
    g = torch.Generator().manual_seed(seed)
    rows, keys = [], []
    for p in range(PROMPTS):
        prompt = torch.randint(1, 12, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        expert = torch.randint(1, 12, (4,), generator=g)
        expert_len = int(torch.randint(2, 5, (1,), generator=g))
        expert_mask = (torch.arange(4) < expert_len).long()
        for s in range(N):
            response = torch.randint(1, 12, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
            # prompt 0: a mixed group; prompt 1: rewards 1, 1, 1, 0.5, all correct (> τ): the 0.5
            # row is below its group's mean, so its correctness must come from verl's rm_scores
            reward = (0.5 if s == N - 1 else 1.0) if p == 1 else float(s % 2 == 0)
            seq = torch.cat([prompt, response])
            scores = torch.zeros(len(response))
            scores[-1] = reward
            keys.append(f"p{p}_{s}_0")
            rows.append({
                "prompts": prompt, "responses": response, "input_ids": seq,
                "attention_mask": torch.ones_like(seq), "position_ids": torch.arange(len(seq)),
                "response_mask": torch.ones_like(response), "loss_mask": torch.ones_like(response),
                "rm_scores": scores, "uid": f"p{p}",
                cv.EXPERT_RESPONSES: torch.where(expert_mask.bool(), expert, PAD), cv.EXPERT_MASK: expert_mask,
            })
    return keys, rows


def _reference_step(model, rows, cfg):
    """The float64 SPEC loss of the whole batch from the rows (old = current policy, GRPO
    advantages unnormalised, correctness = reward > τ) and the SGD step it gives."""
    lps, olds, advs, signs, experts = [], [], [], [], []
    rewards = torch.tensor([float(r["rm_scores"].sum()) for r in rows], dtype=F64)
    groups = [r["uid"] for r in rows]
    for i, r in enumerate(rows):
        seq = torch.cat([r["prompts"], r["responses"]])
        lp = model.next_log_probs(seq)[len(r["prompts"]) - 1: -1]
        lps.append(lp)
        olds.append(lp.detach())
        same = torch.tensor([g == groups[i] for g in groups])
        advs.append(rewards[i] - rewards[same].mean())
        signs.append(1.0 if rewards[i] > cfg["correct_threshold"] else -1.0)
        tokens = r[cv.EXPERT_RESPONSES][r[cv.EXPERT_MASK].bool()]
        with torch.no_grad():
            experts.append(model.next_log_probs(torch.cat([r["prompts"], tokens]))[len(r["prompts"]) - 1: -1])
    pad = torch.nn.utils.rnn.pad_sequence
    lp, old = pad(lps, batch_first=True), pad(olds, batch_first=True)
    mask = pad([torch.ones(len(x), dtype=F64) for x in lps], batch_first=True)
    expert_lp = pad(experts, batch_first=True)
    expert_mask = pad([torch.ones(len(x), dtype=F64) for x in experts], batch_first=True)
    adv = torch.stack(advs)
    total, parts = ref.loss(cfg, lp, mask, adv, adv.abs(), torch.tensor(signs, dtype=F64), old=old,
                            expert_lp=expert_lp, expert_mask=expert_mask, expert_index=torch.arange(len(rows)))
    grads = torch.autograd.grad(total, list(model.parameters()))
    return [p.detach() - LR * g for p, g in zip(model.parameters(), grads)], parts, experts


def test_v1_training_step_with_the_expert_pass_equals_the_reference(queue, on_cpu):
    from tensordict import TensorDict  # noqa: F401  (verl's queue payloads)
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    keys, rows = _rows()
    config = trainer_config()
    model = TinyPolicy(seed=2)
    want, parts, experts = _reference_step(model, rows, cv.config_from_verl(actor_config(), "token-mean").to_dict())
    assert parts["explore_loss"] != 0

    tags = [{"status": "success", "prompt_len": len(r["prompts"]), "response_len": len(r["responses"]),
             "seq_len": len(r["input_ids"])} for r in rows]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows), tags=tags)
    batch = KVBatchMeta(partition_id="train", keys=keys, tags=tags)

    trainer_cls = cv.trainer_class(PPOTrainerSync)
    trainer = object.__new__(trainer_cls)  # PPOTrainer.__init__/init build the Ray workers and servers
    trainer.config = config
    trainer.use_critic = False
    trainer.actor_rollout_wg = OneRankWorkerGroup(_worker(model, actor_config()))
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    batch = trainer._compute_advantage(batch, metrics)
    batch = trainer._update_actor(batch, metrics)

    calls = trainer.actor_rollout_wg.calls
    assert [c[0] for c in calls] == ["compute_log_prob", "compute_log_prob", "update_actor"]
    assert calls[1][1] == [f"{k}/calibrl_expert" for k in keys]  # the expert pass, on temporary keys
    assert not any(k.endswith("/calibrl_expert") for k in tq.kv_list("train").get("train", {}))
    stored = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=[cv.EXPERT_LOG_PROBS, cv.EXPERT_MASK])
    for lp, expert in zip(stored[cv.EXPERT_LOG_PROBS].unbind(), experts):  # log p(expert | the row's prompt)
        torch.testing.assert_close(lp[: len(expert)].to(F64), expert, rtol=1e-6, atol=1e-6)
    assert metrics["actor/calibrl_explore_loss"] != 0 and "actor/pg_loss" in metrics
    for got, expect in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), expect, rtol=1e-6, atol=1e-9)
    tq.kv_clear(keys=keys, partition_id="train")


def test_the_actor_roles_run_calibrls_worker_also_with_the_kl_loss():
    """``_init_resource_pool_mgr`` maps the actor role to CalibRL's worker: ActorRollout without
    a reference policy, ActorRolloutRef with ``use_kl_loss=True`` (no user wiring)."""
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import PPOTrainerSync

    for overrides, role in (((), Role.ActorRollout),
                            (("actor_rollout_ref.actor.use_kl_loss=True",), Role.ActorRolloutRef)):
        trainer = object.__new__(cv.trainer_class(PPOTrainerSync))
        trainer.config = trainer_config(*overrides)
        trainer._init_resource_pool_mgr()
        assert set(trainer.role_worker_mapping) == {role}
        cls = trainer.role_worker_mapping[role].__ray_metadata__.modified_class
        assert issubclass(cls, cv.CalibRLActorRolloutRefWorker)


def test_the_task_runner_gives_calibrls_trainer_for_the_configured_mode():
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSync, get_trainer_cls, trainer_base

    runner = cv.CalibRLTaskRunnerV1
    assert issubclass(runner, TaskRunnerV1.__ray_metadata__.modified_class.__ray_actor_class__)
    saved = dict(trainer_base.TRAINER_REGISTRY)
    try:
        for mode, base in (("sync", PPOTrainerSync), ("colocate_async", PPOTrainerColocateAsync)):
            cls = cv.use_trainer(mode)
            assert get_trainer_cls(mode) is cls and issubclass(cls, base) and cls is not base
            assert cv.use_trainer(mode) is cls  # idempotent
    finally:
        trainer_base.TRAINER_REGISTRY.clear()
        trainer_base.TRAINER_REGISTRY.update(saved)
