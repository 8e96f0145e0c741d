"""Tiny random Hugging Face checkpoints for tests: built with transformers, saved as safetensors."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

# Where tests marked `gpu` put their tensors and models (tests/conftest.py checks the value).
DEVICE = torch.device(os.environ.get("RPO_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"

FAMILIES = {
    # GQA 4:2, untied, Llama-3 RoPE scaling, every bias on, odd sizes
    "llama": dict(model_type="llama", hidden_size=48, intermediate_size=97, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=131, attention_bias=True, mlp_bias=True,
                  tie_word_embeddings=False, rope_theta=50000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # MQA (4:1), q/k/v biases, tied embeddings
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=127, tie_word_embeddings=True, rope_theta=1e6),
    # q/k norm, head_dim not hidden/heads, no GQA, untied
    "qwen3": dict(model_type="qwen3", hidden_size=40, intermediate_size=72, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=16, vocab_size=113, tie_word_embeddings=False),
}


# The rope scalings long-context users put in config.json, with an original context of 16 tokens so that
# longer inputs run past it: YaRN as Qwen's model cards give it (a factor of 4), YaRN with its optional keys
# (factors that are no power of two; beta_slow 0.25 puts a ramp end where truncation would round), and linear.
SCALED_ROPES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 16,
                              "attention_factor": 0.8, "beta_fast": 8, "beta_slow": 2},
    "yarn-mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 4, "beta_slow": 0.25, "truncate": False},
    "linear": {"rope_type": "linear", "factor": 3.0},
}


def hf_config(family: str, num_layers: int = 2, **overrides):
    from transformers import AutoConfig

    kwargs = dict(FAMILIES[family], num_hidden_layers=num_layers, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with every weight random (norms around 1, biases nonzero), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def save_hf_checkpoint(family: str, directory, seed: int = 0, **overrides):
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(str(directory))
    return model


def check_tables(bm, seqs):
    """The host mirror holds each live sequence's block table in its own row, padding elsewhere."""
    tables, live = bm.tables, [s for s in seqs if s.block_table]
    assert all(s.slot is None for s in seqs if not s.block_table)
    slots = [s.slot for s in live]
    assert len(set(slots)) == len(slots) and not set(slots) & set(tables.free_slots)
    assert len(slots) + len(tables.free_slots) == tables.rows.shape[0]
    for s in live:
        row = tables.rows[s.slot].tolist()
        assert row == s.block_table + [tables.pad] * (tables.width - len(s.block_table))
    for slot in tables.free_slots:
        assert tables.rows[slot].eq(tables.pad).all()


def hub_snapshot(cache, repo_id: str, source, repo_type: str = "model") -> Path:
    """Put the directory `source` (a model's, or a dataset repository's) into a Hugging Face hub cache at `cache`
    as `repo_id`'s main revision (the layout huggingface_hub's downloads leave: refs/main names the commit,
    snapshots/<commit>/ holds the files); -> the snapshot directory."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(shutil.copytree(source, repo / "snapshots" / commit))


def with_chat_template(source, directory, template: str) -> Path:
    """A copy of the model directory `source` at `directory` whose tokenizer has the chat template `template`."""
    from rpo_engine import load_tokenizer

    shutil.copytree(source, directory)
    tokenizer = load_tokenizer(directory)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def process_ended(pid: int, timeout: float) -> bool:
    """Whether process `pid` ends within `timeout` s, read from /proc (a zombie counts as ended): a reward pool's
    own thread reaps its workers, so Process.is_alive or join in a test races it (its waitpid fails, and the
    process reads as alive)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def legacy_cache_state(state: dict) -> dict:
    """An ExperienceCache state as the code before packed paths wrote it: `paths`, per prompt id [token ids, reward,
    step, correct, logprobs] as lists (the old state_dict, verbatim)."""
    from rpo_engine.rpo.cache import saved_paths

    old = {k: v for k, v in state.items() if k != "packed_paths"}
    old["paths"] = saved_paths(state)
    return old
