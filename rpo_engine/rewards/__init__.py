"""Verifiable rewards. Every reward function has the signature ``fn(completion_text: str, answer: str) -> float``."""
from rpo_engine.rewards.answers import (
    BUILTIN_REWARDS,
    exact_answer_reward,
    extract_answer,
    format_reward,
    is_correct,
    load_reward_fn,
    math_answer_reward,
)

__all__ = [
    "BUILTIN_REWARDS",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "is_correct",
    "load_reward_fn",
    "math_answer_reward",
]
