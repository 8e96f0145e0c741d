"""Truncation policy: how many tokens to cut from a cached path, and the prefix and budget that follow.

The paper's code draws cut ~ U{1..299} tokens and gives the suffix a budget of exactly `cut`.
We draw cut ~ U{min_cut..max_cut}, additionally bounded by `max_cut_fraction` of the path (so a
short path is never regenerated almost whole; at paper lengths, 2k tokens, the 300 cap binds first)
and by the path itself, and give the suffix `cut + extra_budget` tokens so a suffix slightly longer
than what it replaces can still finish its answer. These bounds are for a path verified correct;
`cut_cached_path` cuts any other path anywhere (up to `rpo_unverified_cut_fraction` of it, no token cap),
as the paper's code cuts a cold-start completion.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from rpo_engine.config import RPOConfig


@dataclass(frozen=True)
class Truncation:
    cut: int  # tokens removed from the end of the cached path
    kept: int  # tokens of the path kept in the prefix
    budget: int  # max_new_tokens for the suffixes


def sample_truncation(path_len: int, rng: random.Random, min_cut: int, max_cut: int, max_cut_fraction: float,
                      extra_budget: int, max_answer_length: int) -> Truncation:
    """A cut for a path of `path_len` tokens; kept path + suffix never exceeds `max_answer_length`."""
    upper = min(max_cut, max(min_cut, int(path_len * max_cut_fraction)), path_len)
    lower = min(min_cut, upper)
    cut = rng.randint(lower, upper) if upper > 0 else 0
    kept = path_len - cut
    budget = min(cut + extra_budget, max_answer_length - kept)
    return Truncation(cut=cut, kept=kept, budget=max(budget, 1))


def cut_cached_path(path_len: int, verified: bool, rng: random.Random, max_answer_length: int,
                    rpo: RPOConfig | None = None) -> Truncation:
    """RPO's cut for a cached path, by the `rpo` settings (the CLI's defaults when None): a path verified
    correct loses at most `rpo_max_cut` tokens and `rpo_max_cut_fraction` of it; any other (a cold start's,
    or a wrong answer kept in its place) may be wrong anywhere, so it is cut anywhere, up to
    `rpo_unverified_cut_fraction` of it."""
    rpo = rpo or RPOConfig()
    if verified:
        max_cut, max_cut_fraction = rpo.rpo_max_cut, rpo.rpo_max_cut_fraction
    else:
        max_cut, max_cut_fraction = path_len, rpo.rpo_unverified_cut_fraction
    return sample_truncation(path_len, rng, rpo.rpo_min_cut, max_cut, max_cut_fraction, rpo.rpo_extra_budget,
                             max_answer_length)
