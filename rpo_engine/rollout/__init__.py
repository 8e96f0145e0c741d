"""Rollout engine: paged K/V cache, block manager, scheduler, sampler and RolloutEngine."""
from rpo_engine.rollout.engine import RolloutEngine, RolloutStats
from rpo_engine.rollout.sequence import Completion, SamplingParams

__all__ = ["Completion", "RolloutEngine", "RolloutStats", "SamplingParams"]
