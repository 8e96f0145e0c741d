"""User reward functions loaded by path (`--reward tests.reward_fns:hash_reward`) in the CLI tests."""
import hashlib


def hash_reward(completion_text: str, answer: str) -> float:
    """Varied, deterministic rewards for a random model: a coin flip keyed by the text."""
    return float(hashlib.sha256(completion_text.encode()).digest()[0] % 2)
