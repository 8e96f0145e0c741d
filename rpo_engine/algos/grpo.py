"""GRPO / DAPO group arithmetic: advantages and DAPO's dynamic-sampling filter.

Advantages follow TRL and the paper's code: (r - mean) / (std + 1e-4) per group, with the unbiased
std; `scale_rewards=False` gives Dr.GRPO's unscaled (r - mean). A group whose rewards are all equal gets
exact zeros: its float mean can miss the common value by an ulp, which the division by std + 1e-4 would
turn into advantages of up to ~6e-4 (all rewards 0.7, fp32) that only fit noise.
"""
from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale_rewards: bool = True) -> torch.Tensor:
    """rewards [num_groups, G] -> advantages [num_groups, G]."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    centered = torch.where(informative_groups(rewards)[:, None], centered, 0.0)
    if not scale_rewards or rewards.shape[1] < 2:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + ADVANTAGE_EPS)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: bool [num_groups], False where every reward of the group is equal
    (its advantages are all zero, so it would only dilute the batch)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
