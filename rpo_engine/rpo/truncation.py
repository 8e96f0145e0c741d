"""Truncation policy: how many tokens to cut from a cached path, and the prefix and budget that follow.

The paper's code draws cut ~ U{1..299} tokens and gives the suffix a budget of exactly `cut`.
We draw cut ~ U{min_cut..max_cut}, additionally bounded by `max_cut_fraction` of the path (so a
short path is never regenerated almost whole; at paper lengths, 2k tokens, the 300 cap binds first)
and by the path itself, and give the suffix `cut + extra_budget` tokens so a suffix slightly longer
than what it replaces can still finish its answer. These bounds are for a path verified correct;
`cut_cached_path` cuts any other path anywhere (up to `rpo_unverified_cut_fraction` of it, no token cap),
as the paper's code cuts a cold-start completion: at a uniform draw, or at the path's least likely token.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rpo_engine.config import RPOConfig


@dataclass(frozen=True)
class Truncation:
    cut: int  # tokens removed from the end of the cached path
    kept: int  # tokens of the path kept in the prefix
    budget: int  # max_new_tokens for the suffixes


def check_rng(rng) -> None:
    """The draws need a random.Random: numpy's RandomState has randint and random too, but its randint leaves out
    the upper bound (the deepest cut never drawn) and fails where the bounds meet."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random (e.g. random.Random(seed)), got {type(rng).__name__}")


def cut_bounds(path_len: int, min_cut: int, max_cut: int, max_cut_fraction: float) -> tuple[int, int]:
    """The fewest and most tokens a path of `path_len` tokens may lose (0, 0 for an empty path)."""
    upper = min(max_cut, max(min_cut, int(path_len * max_cut_fraction)), path_len)
    return min(min_cut, upper), upper


def truncation_at(path_len: int, cut: int, extra_budget: int, max_answer_length: int) -> Truncation:
    """Cut `cut` tokens; kept path + suffix never exceeds `max_answer_length`, and the suffix gets at least one
    token: a path longer than that allows (cached before the limit was lowered on resume) is cut further."""
    if not (0 <= cut <= path_len and max_answer_length >= 1):
        raise ValueError(f"cannot cut {cut} tokens of a {path_len}-token path for answers of at most "
                         f"{max_answer_length} tokens")
    cut = max(cut, path_len - (max_answer_length - 1))
    kept = path_len - cut
    return Truncation(cut=cut, kept=kept, budget=max(1, min(cut + extra_budget, max_answer_length - kept)))


def sample_truncation(path_len: int, rng: random.Random, min_cut: int, max_cut: int, max_cut_fraction: float,
                      extra_budget: int, max_answer_length: int) -> Truncation:
    """A cut drawn uniformly within the bounds for a path of `path_len` tokens."""
    check_rng(rng)
    lower, upper = cut_bounds(path_len, min_cut, max_cut, max_cut_fraction)
    cut = rng.randint(lower, upper) if upper > 0 else 0
    return truncation_at(path_len, cut, extra_budget, max_answer_length)


def least_likely_truncation(logprobs: list[float], min_cut: int, max_cut: int, max_cut_fraction: float,
                            extra_budget: int, max_answer_length: int) -> Truncation:
    """The cut that regenerates the path from its least likely token within the bounds (the earliest of
    equals). `logprobs[t]` is token t's log-prob under the policy (at the sampling temperature) when it was
    sampled. A wrong path most often went wrong at a token the policy itself found unlikely: on the default
    task's starter model, suffixes regrown from there were right 2.5x as often as after a uniform cut, for
    ~10% more tokens (bench_cut.py, README)."""
    path_len = len(logprobs)
    lower, upper = cut_bounds(path_len, min_cut, max_cut, max_cut_fraction)
    if upper == 0:
        return truncation_at(path_len, 0, extra_budget, max_answer_length)
    first = min(range(path_len - upper, path_len - lower + 1), key=logprobs.__getitem__)
    return truncation_at(path_len, path_len - first, extra_budget, max_answer_length)


def cut_cached_path(path_len: int, verified: bool, rng: random.Random, max_answer_length: int,
                    rpo: RPOConfig | None = None, logprobs: list[float] | None = None,
                    saturated: int = 0) -> Truncation:
    """RPO's cut for a cached path, by the `rpo` settings (the CLI's defaults when None): a path verified
    correct loses at most `rpo_max_cut` tokens and `rpo_max_cut_fraction` of it; any other (a cold start's,
    or a wrong answer kept in its place) may be wrong anywhere, so it is cut anywhere, up to
    `rpo_unverified_cut_fraction` of it: uniformly, or with `rpo_unverified_cut="least-likely"` at its
    least likely token (by the path's sampling `logprobs`; uniformly when they are not known), or with
    "full" whole, with a full completion's budget. A verified path whose last `saturated` visits all came
    back right has both its bounds multiplied by `rpo_saturated_cut_growth` that many times (the fraction
    up to 1)."""
    check_rng(rng)
    rpo = rpo or RPOConfig()
    if verified:
        # growth ** saturated, kept finite for a prompt saturated thousands of times (the bounds cap it anyway)
        growth = math.exp(min(saturated * math.log(rpo.rpo_saturated_cut_growth), 700.0))
        return sample_truncation(path_len, rng, rpo.rpo_min_cut, int(min(rpo.rpo_max_cut * growth, path_len)),
                                 min(1.0, rpo.rpo_max_cut_fraction * growth), rpo.rpo_extra_budget,
                                 max_answer_length)
    if rpo.rpo_unverified_cut == "full":  # no prefix kept: the prompt's G samples are full completions
        return Truncation(cut=path_len, kept=0, budget=max_answer_length)
    if rpo.rpo_unverified_cut == "least-likely" and logprobs is not None:
        if len(logprobs) != path_len:
            raise ValueError(f"path of {path_len} tokens has {len(logprobs)} log-probs")
        return least_likely_truncation(logprobs, rpo.rpo_min_cut, path_len, rpo.rpo_unverified_cut_fraction,
                                       rpo.rpo_extra_budget, max_answer_length)
    return sample_truncation(path_len, rng, rpo.rpo_min_cut, path_len, rpo.rpo_unverified_cut_fraction,
                             rpo.rpo_extra_budget, max_answer_length)
