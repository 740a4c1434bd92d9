"""A tiny TRL world for the tests: a randomly initialised Llama saved to a folder (TRL loads the
policy, and with β > 0 the reference model, from its path), a word-level tokenizer built in
memory, a dataset with an ``expert`` column and a continuous reward. Nothing is downloaded."""

from __future__ import annotations

import torch

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "solve", "answer", "is"]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_model(path, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def dataset(n: int = 4, expert_as_ids: bool = False):
    from datasets import Dataset

    tok = tokenizer()
    prompts = [f"solve {WORDS[i % 8]} {WORDS[(i + 3) % 8]}" for i in range(n)]
    experts = [f"answer is {WORDS[(i + 1) % 8]} a" for i in range(n)]
    if expert_as_ids:
        experts = [tok(e, add_special_tokens=False)["input_ids"] for e in experts]
    return Dataset.from_dict({"prompt": prompts, "expert": experts})


def reward_a(completions, **kwargs):
    """The fraction of 'a' words: a continuous reward, so correctness (r > τ) and sign(A) differ."""
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]


def config(cls, out, **overrides):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        temperature=1.0,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return cls(**base)


def generation_batch(trainer, ds):
    """The rows TRL's RepeatSampler hands one process: each prompt num_generations times."""
    g = trainer.num_generations
    rows = [dict(ds[i]) for i in range(len(ds))]
    per_step = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    out = []
    for row in rows:
        out.extend(dict(row) for _ in range(g))
    return out[:per_step]
