"""GRPO / DAPO pieces: group-normalized advantages and DAPO's dynamic-sampling filter."""
from rpo_engine.algos.grpo import group_advantages, informative_groups

__all__ = ["group_advantages", "informative_groups"]
