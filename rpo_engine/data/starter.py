"""The starter model: a tiny Qwen2-shaped decoder taught the built-in arithmetic task by SFT, cached on disk.

It is the default model of `python -m rpo_engine.train`: trained on the task's worked traces for a
fixed number of steps (about two and a half minutes on 2 CPU cores), it reaches a partial greedy accuracy
and leaves room for RL to show. The directory is a real Hugging Face model directory (config.json,
model.safetensors, tokenizer.json), built once per recipe and reused; the recipe's hash names it,
so changing the recipe builds a new one instead of reusing a stale one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rpo_engine.data.arithmetic import ArithmeticConfig, make_split
from rpo_engine.errors import UserError, refusals_named
from rpo_engine.data.tokenizer import build_task_tokenizer
from rpo_engine.model.atomic import private_to_umask
from rpo_engine.model.config import ModelConfig
from rpo_engine.model.decoder import CausalLM

# Small on purpose: on 2 CPU cores, SFT steps are what buy accuracy in a few minutes, and a 128-wide model
# takes ~4x the steps of a 256-wide one in the same time (measured: 88% greedy after 1000 steps at width
# 128, 2-8% after 300-1200 steps at width 256).
STARTER_ARCH = dict(model_type="qwen2", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


@dataclass(frozen=True)
class StarterRecipe:
    seed: int = 0
    num_train_rows: int = 20000
    steps: int = 700  # mid-way up the learning curve: 56% greedy, room for RL (batch 32: 500 steps 8%, 1000 steps 88%)
    batch_size: int = 24
    # Batches sorted by length within pools of this many (1: plain random batches). Measured at 700 steps:
    # pools of 8 halve the padded tokens but stall learning (2% greedy); pools of 2: 52%; plain: 56%.
    bucket_pool: int = 1
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    init_std: float = 0.02

    def key(self) -> str:
        # A sample trace stands for the task's format: a format change builds a new starter model.
        sample = make_split("train", 4, 0, ArithmeticConfig())
        blob = json.dumps({"recipe": dataclasses.asdict(self), "arch": STARTER_ARCH,
                           "task": dataclasses.asdict(ArithmeticConfig()), "sample": sample}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """RPO_ENGINE_CACHE, else rpo_engine/ in XDG_CACHE_HOME or ~/.cache, where Hugging Face's and torch's caches go.
    An empty variable counts as unset (XDG's rule; "" would be the current directory), and ~ is expanded."""
    chosen = os.environ.get("RPO_ENGINE_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "rpo_engine"
    try:
        return Path.home() / ".cache" / "rpo_engine"
    except RuntimeError:  # no HOME and no password entry: a container run under an arbitrary uid
        raise UserError("no home directory to keep the starter model in (HOME is not set and the user has none); "
                        "set RPO_ENGINE_CACHE to a writable directory") from None


def starter_model_dir(cache_dir=None, recipe: StarterRecipe = StarterRecipe()) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"starter-{recipe.key()}"


def new_starter_model(tokenizer, init_std: float) -> CausalLM:
    config = ModelConfig.from_hf_dict(dict(STARTER_ARCH, vocab_size=len(tokenizer),
                                           eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    model = CausalLM(config).init_weights(init_std)
    return model


def tiny_task_model(hidden_size: int = 32, seed: int = 0) -> tuple[CausalLM, object]:
    """(model, tokenizer): a 2-layer random Qwen2-shaped model (tied embeddings, N(0, 0.02) weights) with the task
    tokenizer, seeded by `seed`: built in a second, for smoke tests and examples; its samples vary."""
    tokenizer = build_task_tokenizer()
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed)
    return CausalLM(config).init_weights(0.02), tokenizer


def tokenize_rows(tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, solution_ids + eos) per row, tokenized apart as RL will see them (prompt alone)."""
    eos = tokenizer.eos_token_id
    return [(tokenizer.encode(r["prompt"], add_special_tokens=False),
             tokenizer.encode(r["solution"], add_special_tokens=False) + [eos]) for r in rows]


def sft_batch(examples, pad_id: int):
    """Right-padded input_ids [B, T] and labels [B, T] (-100 on the prompt and on padding)."""
    T = max(len(p) + len(s) for p, s in examples) - 1
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (p, s) in enumerate(examples):
        seq = p + s
        input_ids[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        labels[i, len(p) - 1:len(seq) - 1] = torch.tensor(s)  # predict every solution token
    return input_ids, labels


def length_bucketed_batches(examples, batch_size: int, rng: random.Random, pool_batches: int = 8):
    """Endless random batches, each drawn from a pool of `pool_batches` batches' worth of examples sorted by
    length, so rows in a batch have similar lengths. Trace lengths vary ~5x (2-digit addition to 2x2-digit
    multiplication), and a random batch pads to its longest row. With `pool_batches` = 1 these are plain
    random batches."""
    while True:
        pool = sorted(rng.sample(examples, batch_size * pool_batches), key=lambda e: len(e[0]) + len(e[1]))
        chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def train_starter_model(directory, recipe: StarterRecipe = StarterRecipe(), progress: bool = True) -> dict:
    """Train the starter model by SFT and save it (with tokenizer) to `directory`. Returns a summary."""
    from rpo_engine.progress import progress_bar

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tokenizer = build_task_tokenizer()
    rows = make_split("train", recipe.num_train_rows, recipe.seed, ArithmeticConfig())
    examples = tokenize_rows(tokenizer, rows)
    model = new_starter_model(tokenizer, recipe.init_std).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.learning_rate, betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < recipe.warmup_steps:
            return recipe.learning_rate * (step + 1) / recipe.warmup_steps
        t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    batches = length_bucketed_batches(examples, recipe.batch_size, rng, recipe.bucket_pool)
    start = time.perf_counter()
    bar = progress_bar(range(recipe.steps), desc="starter SFT", disable=not progress, dynamic_ncols=True)
    num_tokens = 0
    for step in bar:
        input_ids, labels = sft_batch(next(batches), tokenizer.pad_token_id)
        logits = model(input_ids)  # [B, T, V]; right padding needs no mask under causal attention
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.step()
        num_tokens += int((labels != -100).sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{num_tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    model.save_pretrained(directory, tokenizer=tokenizer)
    summary = {"recipe": dataclasses.asdict(recipe), "final_loss": loss.item(),
               "train_seconds": round(time.perf_counter() - start, 1),
               "num_parameters": model.num_parameters()}
    (Path(directory) / "starter.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ensure_starter_model(cache_dir=None, progress: bool = True, recipe: StarterRecipe = StarterRecipe()) -> Path:
    """The cached starter model directory, built first if it is not there yet."""
    directory = starter_model_dir(cache_dir, recipe)
    if not (directory / "starter.json").is_file():
        _check_writable(directory)  # before minutes of training, not at the save after them
        if progress:
            print(f"building the starter model in {directory} (once; about 3 minutes on 2 CPU cores)")
        # Built beside it and renamed into place whole: another run (or node, on a shared cache) may be building
        # or loading it meanwhile, and must never see a half-written directory.
        building = private_to_umask(Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.building-")))
        try:
            with refusals_named(directory):  # a full disk at the save: one line, not safetensors' traceback
                train_starter_model(building, recipe, progress=progress)
            if directory.is_dir() and not (directory / "starter.json").is_file():
                shutil.rmtree(directory, ignore_errors=True)  # an interrupted build of an older version
            try:
                building.rename(directory)
            except OSError:  # another builder got there first: theirs is whole, keep it
                if not (directory / "starter.json").is_file():
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return directory


def _check_writable(directory: Path) -> None:
    """The starter can be saved at `directory`: its cache directory is (or can be made) a writable directory and
    nothing but a directory is in the way; else a UserError naming the path (and RPO_ENGINE_CACHE)."""
    fix = ("set RPO_ENGINE_CACHE to a writable directory for the starter model (default $XDG_CACHE_HOME/rpo_engine "
           "or ~/.cache/rpo_engine)")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory; remove it, or {fix}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory.parent}: cannot be made a directory ({e.strerror or e}); {fix}") from None
    if not os.access(directory.parent, os.W_OK | os.X_OK):
        raise UserError(f"{directory.parent}: not writable; {fix}")
