"""Verifiable rewards. A reward function has the signature ``fn(completion_text: str, answer: str) -> float``,
or TRL's (``fn(prompts, completions, completion_ids, **columns) -> list[float]``): see answers.py."""
from rpo_engine.rewards.answers import (
    BUILTIN_REWARDS,
    exact_answer_reward,
    extract_answer,
    format_reward,
    is_correct,
    load_reward_fn,
    math_answer_reward,
    RewardLog,
    score_completions,
    TRLStyleReward,
)

__all__ = [
    "BUILTIN_REWARDS",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "is_correct",
    "load_reward_fn",
    "math_answer_reward",
    "RewardLog",
    "score_completions",
    "TRLStyleReward",
]
