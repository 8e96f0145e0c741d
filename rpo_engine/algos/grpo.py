"""GRPO / DAPO group arithmetic: advantages and DAPO's dynamic-sampling filter.

Advantages follow TRL and the paper's code: (r - mean) / (std + 1e-4) per group, with the unbiased
std; TRL's `scale_rewards="batch"` divides by the std of the whole batch's rewards instead (Lite PPO), and
"none" gives Dr.GRPO's unscaled (r - mean). A group whose rewards are all equal gets
exact zeros: its float mean can miss the common value by an ulp, which the division by std + 1e-4 would
turn into advantages of up to ~6e-4 (all rewards 0.7, fp32) that only fit noise.
"""
from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group",
                     batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [num_groups, G] -> advantages [num_groups, G]. scale_rewards: "group", "batch" or "none".
    `batch_rewards`: every reward of the batch, for "batch" (default: `rewards`; a rank passes the whole
    batch's, of which its groups are a share)."""
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if rewards.dim() != 2:  # one group of G is [1, G]: a flat batch would be taken for G groups of one
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():  # 0/1 correctness as integers: mean() takes no integer tensor
        rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    centered = torch.where(informative_groups(rewards)[:, None], centered, 0.0)
    if scale_rewards == "none" or rewards.shape[1] < 2:
        return centered
    if scale_rewards == "batch":
        everything = (rewards if batch_rewards is None else batch_rewards).flatten()
        return centered / (everything.std() + ADVANTAGE_EPS)
    return centered / (rewards.std(dim=1, keepdim=True) + ADVANTAGE_EPS)


def decoupled_rewards(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """GDPO's normalize-then-sum (arXiv 2601.05242; TRL's multi_objective_aggregation="normalize_then_sum"):
    parts [num_groups, G, K], each of the K reward terms' unweighted scores; each term normalized within its
    group, (x - mean) / (std + eps) (a term constant over the group gives 0), then summed with `weights` [K]
    -> [num_groups, G]. Each group's sum has mean 0, so the method's advantages are these over the whole
    batch's std: group_advantages(sums, "batch", every sum of the batch)."""
    centered = parts - parts.mean(dim=1, keepdim=True)
    std = parts.std(dim=1, keepdim=True) if parts.shape[1] > 1 else torch.zeros_like(centered)
    return (centered / (std + ADVANTAGE_EPS) * weights).sum(-1)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: bool [num_groups], False where every reward of the group is equal
    (its advantages are all zero, so it would only dilute the batch)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
