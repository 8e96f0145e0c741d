"""Group-level reward shaping: the paper's length-aware accuracy reward and DAPO's overlong penalty."""
from __future__ import annotations

import math


def length_aware_accuracy(correct: list[bool], lengths: list[int], alpha: float = 0.1) -> list[float]:
    """RPO's accuracy reward within one group: 0 if wrong; if correct,
    clip(sigmoid(alpha * (mean length of the group's correct answers - length)), 0.5, 1.0).

    Shorter-than-average correct answers earn up to 1, longer ones 0.5. Lengths are tokens of the
    whole answer (kept path + suffix); the paper's code counted space-separated words, and its
    grouping bug gave every correct answer 0.5 — here the group is the G answers of one prompt.
    """
    correct_lengths = [n for ok, n in zip(correct, lengths) if ok]
    if not correct_lengths:
        return [0.0] * len(correct)
    mean_len = sum(correct_lengths) / len(correct_lengths)

    def shaped(n):
        z = alpha * (mean_len - n)
        if z <= 0:  # sigmoid(z) <= 0.5, clipped to it; exp(-z) overflows a float past z = -709 (8k-token answers)
            return 0.5
        return min(1.0, max(0.5, 1.0 / (1.0 + math.exp(-z))))

    return [shaped(n) if ok else 0.0 for ok, n in zip(correct, lengths)]


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer, then linearly down to -penalty
    at max_length (and beyond)."""
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0
    return -penalty * min(1.0, (length - (max_length - buffer)) / buffer)
