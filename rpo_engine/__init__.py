"""rpo_engine: GRPO/DAPO fine-tuning with Partial Reasoning Optimization (arXiv 2601.19404)."""
from rpo_engine.errors import UserError

__version__ = "0.1.0"

# The model, the rollout engine and the trainer import lazily: `import rpo_engine` stays cheap, without torch (a
# reward function's process, math-verify's helper, reads rpo_engine.rewards alone).
_LAZY = {
    "CausalLM": "rpo_engine.model",
    "ModelConfig": "rpo_engine.model",
    "load_model": "rpo_engine.model",
    "load_tokenizer": "rpo_engine.model",
    "RolloutEngine": "rpo_engine.rollout",
    "SamplingParams": "rpo_engine.rollout",
    "TrainConfig": "rpo_engine.config",
    "Trainer": "rpo_engine.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rpo_engine' has no attribute {name!r}")


def __dir__():  # the lazy names too, for dir() and tab completion
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["UserError", *_LAZY]
