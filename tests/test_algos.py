"""GRPO/DAPO arithmetic, RPO truncation and cache rules, reward shaping: hand-computed cases."""
import io
import math
import numbers
import random
import re

import numpy
import pytest
import torch

from rpo_engine.algos.grpo import decoupled_rewards, group_advantages, informative_groups
from rpo_engine.config import AlgoConfig, RPOConfig, TrainConfig, config_from_dict
from rpo_engine.errors import UserError
from rpo_engine.rewards.shaping import length_aware_accuracy, overlong_penalty
from rpo_engine.rpo.cache import ExperienceCache
from rpo_engine.rpo.truncation import (Truncation, cut_cached_path, least_likely_truncation, sample_truncation,
                                      truncation_at)
from tests.helpers import legacy_cache_state


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-4)
    torch.testing.assert_close(adv[0:1], expected)
    assert torch.equal(adv[1], torch.zeros(4))
    torch.testing.assert_close(group_advantages(rewards, scale_rewards="none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # batch: the same centred rewards over the std of all eight rewards
    batch_std = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]).std().item()  # 1/sqrt(7): mean 0.5
    assert batch_std == pytest.approx(math.sqrt(1 / 7))
    torch.testing.assert_close(group_advantages(rewards, scale_rewards="batch")[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]) / (batch_std + 1e-4))
    # a rank's groups are scaled by the whole batch's std, which it is given
    everything = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards[:1], "batch", everything)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]) / (everything.std() + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards must be"):
        group_advantages(rewards, scale_rewards=True)


def _gdpo_as_trl_writes_it(per_func, weights, G):
    """TRL's normalize_then_sum branch (GRPOTrainer), in fp64 on [N * G, K] rewards: per function, within each
    group, (x - mean) / (unbiased std + 1e-4); the weighted sum; then (s - batch mean) / (batch std + 1e-4)."""
    grouped = per_func.view(-1, G, per_func.shape[1])
    mean_k = grouped.mean(dim=1, keepdim=True)
    std_k = grouped.std(dim=1, keepdim=True)
    rewards = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, per_func.shape[1]) * weights).sum(1)
    return ((rewards - rewards.mean()) / (rewards.std() + 1e-4)).view(-1, G)


def test_decoupled_rewards_are_trls_normalize_then_sum():
    """GDPO on fresh scores: 5 groups of 6, three terms (a 0/1 accuracy, a graded score, a penalty) with their
    weights; one group whose terms are all constant, one where only the penalty varies. The batch-scaled
    advantages of decoupled_rewards equal TRL's written-out branch; the constant group's are exactly 0."""
    g = torch.Generator().manual_seed(7)
    N, G = 5, 6
    parts = torch.stack([torch.randint(0, 2, (N, G), generator=g).double(), torch.rand(N, G, generator=g,
                         dtype=torch.float64), -torch.rand(N, G, generator=g, dtype=torch.float64)], -1)
    parts[1] = parts[1, :1]  # every term constant over the group
    parts[2, :, :2] = parts[2, :1, :2]  # only the penalty varies
    weights = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    sums = decoupled_rewards(parts, weights)
    ours = group_advantages(sums, "batch", sums)
    torch.testing.assert_close(ours, _gdpo_as_trl_writes_it(parts.view(-1, 3), weights, G), rtol=1e-9, atol=1e-9)
    assert torch.equal(ours[1], torch.zeros(G)) and bool((ours[2] != 0).all())
    assert torch.allclose(sums.mean(1), torch.zeros(N, dtype=torch.float64), atol=1e-12)  # centered in each group


def test_group_advantages_equal_rewards_are_exactly_zero():
    # 0.7 and 1/3 (fp32): eight equal values whose mean misses them by an ulp (the std + 1e-4
    # division made that ~6e-4 before the fix); the mixed group beside them keeps its advantages
    rewards = torch.tensor([[0.7] * 8, [1 / 3] * 8, [0.7] * 7 + [0.1]])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, scale_rewards=scale)
        assert torch.equal(adv[:2], torch.zeros(2, 8))
        assert (adv[2] != 0).all()


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.51]])
    assert informative_groups(rewards).tolist() == [False, False, True, True]


def test_overlong_penalty_hand_computed():
    # budget 100, buffer 20: free up to 80, linear to -1 at 100, -1 beyond
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20, penalty=2.0) == pytest.approx(-2.0)
    assert overlong_penalty(130, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(130, 100, 0) == 0.0


def test_length_aware_accuracy_hand_computed():
    correct = [True, True, False, True]
    lengths = [10, 20, 5, 30]  # mean of correct lengths = 20
    r = length_aware_accuracy(correct, lengths, alpha=0.1)
    assert r[0] == pytest.approx(1 / (1 + math.exp(-1.0)))  # 10 shorter than mean: sigmoid(1) = 0.731
    assert r[1] == pytest.approx(0.5)  # at the mean
    assert r[2] == 0.0  # wrong
    assert r[3] == pytest.approx(0.5)  # longer: clipped to 0.5
    assert length_aware_accuracy([False, False], [3, 4]) == [0.0, 0.0]
    assert length_aware_accuracy([True], [1000], alpha=0.1) == [0.5]


@pytest.mark.parametrize("path_len", [0, 1, 3, 40, 200, 400, 5000])
def test_truncation_bounds(path_len):
    rng = random.Random(0)
    for _ in range(300):
        t = sample_truncation(path_len, rng, min_cut=2, max_cut=300, max_cut_fraction=0.25, extra_budget=16,
                              max_answer_length=400)
        assert 0 <= t.cut <= path_len and t.kept == path_len - t.cut
        assert 1 <= t.budget <= t.cut + 16 and t.kept + t.budget <= 400  # the answer limit holds, whatever the path
        if path_len <= 400:  # a path the limit holds is cut within the bounds
            assert t.cut <= max(2, int(0.25 * path_len)) and t.cut <= 300
            if path_len >= 2:
                assert t.cut >= 2
        else:  # one cached before the limit was lowered (on resume) is cut to leave the suffix one token
            assert (t.kept, t.budget) == (399, 1)
    with pytest.raises(ValueError, match="cannot cut 5 tokens of a 3-token path"):
        truncation_at(3, 5, 16, 400)
    with pytest.raises(ValueError, match="cannot cut 0 tokens of a -3-token path"):
        truncation_at(-3, 0, 16, 400)


def test_truncation_covers_its_range():
    rng = random.Random(1)
    cuts = {sample_truncation(1000, rng, 1, 10, 1.0, 0, 2000).cut for _ in range(2000)}
    assert cuts == set(range(1, 11))
    budgets = {sample_truncation(100, rng, 5, 5, 1.0, 16, 110).budget for _ in range(10)}
    assert budgets == {15}  # cut + 16 = 21 tokens, but kept (95) + suffix may only reach 110


def test_cut_cached_path_cuts_verified_paths_shallow_and_others_anywhere():
    rng = random.Random(2)
    quarter = RPOConfig(rpo_max_cut_fraction=0.25, rpo_unverified_cut_fraction=1.0)
    verified = [cut_cached_path(2000, True, rng, 4000, quarter).cut for _ in range(500)]
    assert max(verified) <= 300 and min(verified) >= 1  # the token cap binds before a quarter of 2000
    assert max(cut_cached_path(400, True, rng, 4000, quarter).cut for _ in range(500)) == 100  # a quarter of 400
    unverified = [cut_cached_path(2000, False, rng, 4000, quarter).cut for _ in range(500)]
    assert max(unverified) > 1500 and min(unverified) >= 1  # anywhere along the path, past the cap
    assert max(cut_cached_path(2000, False, rng, 4000, RPOConfig(rpo_unverified_cut_fraction=0.1)).cut for _ in range(500)) == 200
    # the defaults: a verified path loses at most a quarter (and 300 tokens), any other up to all of it
    assert 90 < max(cut_cached_path(400, True, rng, 4000).cut for _ in range(500)) <= 100
    assert 270 < max(cut_cached_path(2000, True, rng, 4000).cut for _ in range(500)) <= 300
    assert 1800 < max(cut_cached_path(2000, False, rng, 4000).cut for _ in range(500)) <= 2000


def test_least_likely_cut_regrows_from_the_least_likely_token_in_bounds():
    logprobs = [-0.1, -3.0, -0.2, -0.5, -3.0, -0.01, -0.3, -2.0]  # two equal minima: tokens 1 and 4
    t = least_likely_truncation(logprobs, 1, 8, 1.0, 4, 100)
    assert (t.kept, t.cut, t.budget) == (1, 7, 11)  # the earliest: regrow from token 1
    t = least_likely_truncation(logprobs, 1, 8, 0.5, 4, 100)  # at most 4 cut: tokens 4..7 may go
    assert (t.kept, t.cut) == (4, 4)
    t = least_likely_truncation(logprobs, 2, 8, 0.25, 0, 100)  # 2 cut exactly: token 7 may not be kept
    assert (t.kept, t.cut, t.budget) == (6, 2, 2)
    assert least_likely_truncation(logprobs, 1, 8, 1.0, 16, 10).budget == 9  # kept 1 + 9 = the answer length
    assert least_likely_truncation([], 1, 8, 1.0, 4, 100).cut == 0


def test_cut_cached_path_least_likely_applies_to_unverified_paths_with_logprobs():
    rpo = RPOConfig(rpo_unverified_cut="least-likely", rpo_min_cut=1)
    logprobs = [-0.1] * 40
    logprobs[30] = -5.0
    rng = random.Random(0)
    assert cut_cached_path(40, False, rng, 400, rpo, logprobs).kept == 30
    state = rng.getstate()  # no draw taken: the cut is a function of the path
    assert cut_cached_path(40, False, rng, 400, rpo, logprobs).kept == 30 and rng.getstate() == state
    # a verified path keeps the shallow uniform cut; without log-probs (an old checkpoint's path) a uniform one
    assert all(cut_cached_path(40, True, rng, 400, rpo, logprobs).cut <= 10 for _ in range(200))
    assert len({cut_cached_path(40, False, rng, 400, rpo, None).kept for _ in range(200)}) > 10
    uniform = RPOConfig(rpo_unverified_cut="uniform")
    assert len({cut_cached_path(40, False, rng, 400, uniform, logprobs).kept for _ in range(200)}) > 10
    assert RPOConfig().rpo_unverified_cut == "uniform"  # the default, measured on two starters (README)
    with pytest.raises(ValueError, match="log-probs"):
        cut_cached_path(41, False, rng, 400, rpo, logprobs)


def test_cut_cached_path_full_regrows_unverified_paths_whole():
    """--rpo-unverified-cut full: a path not known to be right keeps nothing and gets a full completion's
    budget (not path + extra); a verified one keeps its shallow uniform cut."""
    rpo = RPOConfig(rpo_unverified_cut="full")
    rng = random.Random(0)
    state = rng.getstate()
    t = cut_cached_path(40, False, rng, 300, rpo, [-0.5] * 40)
    assert (t.kept, t.cut, t.budget) == (0, 40, 300) and rng.getstate() == state  # no draw taken
    assert cut_cached_path(0, False, rng, 300, rpo).budget == 300
    assert all(30 <= cut_cached_path(40, True, rng, 300, rpo).kept < 40 for _ in range(200))


def test_saturated_paths_are_cut_deeper():
    """--rpo-saturated-cut-growth 2: a verified path whose last k visits all came back right has its cut
    bounds doubled k times (a quarter of 40 tokens: 10, then 20, then all 40); 1 never moves them, and an
    unverified path is cut anywhere whatever its count."""
    grow = RPOConfig(rpo_saturated_cut_growth=2.0, rpo_min_cut=1)
    rng = random.Random(0)
    for saturated, most in ((0, 10), (1, 20), (2, 40), (5, 40)):
        cuts = [cut_cached_path(40, True, rng, 400, grow, None, saturated).cut for _ in range(400)]
        assert max(cuts) == most and min(cuts) == 1
    fixed = RPOConfig(rpo_min_cut=1)
    assert max(cut_cached_path(40, True, rng, 400, fixed, None, 3).cut for _ in range(400)) == 10
    # the token cap grows too: 300 -> 600 for a 2000-token path once saturated
    long = [cut_cached_path(2000, True, rng, 4000, grow, None, 1).cut for _ in range(400)]
    assert 300 < max(long) <= 600
    assert max(cut_cached_path(40, False, rng, 400, grow, None, 0).cut for _ in range(400)) > 30
    assert cut_cached_path(40, True, rng, 400, RPOConfig(rpo_saturated_cut_growth=10.0), None, 5000).cut <= 40
    # the grown fraction is capped at 1 before it meets the path length: 20000 * 1e304 would be inf (int() raises)
    whole = RPOConfig(rpo_saturated_cut_growth=10.0, rpo_max_cut_fraction=1.0)
    assert 1 <= cut_cached_path(20000, True, rng, 40000, whole, None, 5000).cut <= 20000
    with pytest.raises(UserError, match="--rpo-saturated-cut-growth must be >= 1"):
        RPOConfig(rpo_saturated_cut_growth=0.5)


def test_cache_counts_saturated_visits_and_restores_them():
    cache = ExperienceCache("correct-only", epsilon=1.0)
    for all_right in (True, True, False, True):
        cache.note_group("p", all_right)
    assert cache.saturation("p") == 1 and cache.saturation("q") == 0
    cache.note_group("q", True)
    cache.note_group("q", True)
    restored = ExperienceCache()
    restored.load_state_dict(cache.state_dict())
    assert (restored.saturation("p"), restored.saturation("q")) == (1, 2)
    # the update rule stays the loading cache's: a resumed run's --rpo-cache-policy / --rpo-epsilon govern
    assert (restored.policy, restored.epsilon) == ("epsilon-greedy", 0.5)
    old = cache.state_dict()
    del old["saturated"]  # a checkpoint from before the count
    restored.load_state_dict(old)
    assert restored.saturation("q") == 0


def test_cache_epsilon_greedy_picks():
    rng = random.Random(0)
    greedy = ExperienceCache("epsilon-greedy", epsilon=1.0)
    picks = {greedy.choose([0.0, 1.0, 0.3, 1.0], rng) for _ in range(200)}
    assert picks == {1, 3}  # ties for the best broken at random, both reachable
    explore = ExperienceCache("epsilon-greedy", epsilon=0.0)
    picks = {explore.choose([0.0, 1.0, 0.3, 1.0], rng) for _ in range(400)}
    assert picks == {0, 1, 2, 3}  # uniform over all G, the last included


def test_cache_skips_nan_rewards_and_refuses_bad_arguments():
    """A NaN reward (a function that could not score) is never the best; a mistyped policy, an epsilon outside
    [0, 1] or a group whose lists disagree in length is an error, not a silent other behaviour."""
    cache = ExperienceCache(epsilon=1.0)
    for seed in range(20):
        assert cache.choose([float("nan"), 0.2, float("nan"), 0.7], random.Random(seed)) == 3
    assert cache.choose([float("nan")] * 3, random.Random(0)) in range(3)  # nothing scored: a random one
    assert cache.update("p", [[1], [2]], [float("nan"), 1.0], 0, random.Random(0)) and cache.get("p").token_ids == [2]
    with pytest.raises(ValueError, match="policy must be one of"):
        ExperienceCache("correct_only")
    with pytest.raises(ValueError, match="epsilon must be in"):
        ExperienceCache(epsilon=2.0)
    with pytest.raises(ValueError, match="2 answers with 3 rewards"):
        cache.update("p", [[1], [2]], [0.0, 1.0, 0.5], 0, random.Random(0))
    with pytest.raises(ValueError, match="a group of no completions"):
        cache.update("p", [], [], 0, random.Random(0))


def test_rpo_draws_refuse_an_rng_that_is_not_a_random_random():
    """The cut and the cache's choice draw from a random.Random. numpy's RandomState also has randint and random,
    but its randint excludes the upper bound: a verified path's deepest cut was never drawn, and a path whose
    bounds met (lower == upper) failed inside numpy; None or a seed failed with an AttributeError. A TypeError
    naming rng instead."""
    np = pytest.importorskip("numpy")
    for rng in (np.random.RandomState(0), None, 0):
        with pytest.raises(TypeError, match="rng must be a random.Random"):
            cut_cached_path(40, True, rng, 100)
        with pytest.raises(TypeError, match="rng must be a random.Random"):
            sample_truncation(40, rng, 1, 10, 0.25, 16, 100)
        with pytest.raises(TypeError, match="rng must be a random.Random"):
            ExperienceCache().update("p", [[1], [2]], [0.0, 1.0], 0, rng)
    assert cut_cached_path(40, True, random.Random(0), 100).cut in range(1, 11)


def test_cache_refuses_a_correct_threshold_that_is_not_a_number():
    """A threshold read from a config as text ("0.5") failed at the first put with a TypeError naming nothing,
    and NaN made every path unverified without a word: a ValueError naming correct_threshold at construction."""
    for bad in ("0.5", None, float("nan"), True):
        with pytest.raises(ValueError, match="correct_threshold must be a finite number"):
            ExperienceCache(correct_threshold=bad)
    assert ExperienceCache(correct_threshold=1).correct_threshold == 1


def test_cache_correct_only_keeps_old_path():
    rng = random.Random(0)
    cache = ExperienceCache("correct-only", epsilon=0.0)
    cache.put("p", [1, 2, 3], 1.0, step=0)
    assert not cache.update("p", [[7], [8]], [0.0, 0.0], step=1, rng=rng)
    assert cache.get("p").token_ids == [1, 2, 3]
    assert cache.update("p", [[7], [8]], [1.0, 1.0], step=2, rng=rng)
    assert cache.get("p").token_ids in ([7], [8]) and cache.get("p").step == 2


def test_cache_correct_only_replaces_an_unverified_path_by_any_answer():
    rng = random.Random(0)
    cache = ExperienceCache("correct-only", epsilon=1.0)
    cache.put("cold", [1, 2, 3], float("nan"), step=0)  # a cold start's path: never scored
    cache.put("good", [4, 5], 1.0, step=0)
    assert not cache.verified("cold") and cache.verified("good") and not cache.verified("absent")
    # an unverified path gives way to a wrong answer too (the prompt is not cold-started again) ...
    assert cache.update("cold", [[7], [8]], [0.0, 0.0], step=1, rng=rng)
    assert cache.get("cold").token_ids in ([7], [8]) and not cache.verified("cold")
    # ... and a correct answer verifies it
    assert cache.update("cold", [[7], [8]], [0.0, 0.6], step=2, rng=rng)
    assert cache.get("cold").token_ids == [8] and cache.verified("cold")
    # a verified path is never traded for a wrong answer
    assert not cache.update("good", [[7], [8]], [0.0, 0.0], step=1, rng=rng)
    assert cache.get("good").token_ids == [4, 5]
    paper = ExperienceCache("epsilon-greedy", epsilon=1.0)  # the paper's rule does trade it
    paper.put("good", [4, 5], 1.0, step=0)
    assert paper.update("good", [[7], [8]], [0.0, 0.0], step=1, rng=rng) and not paper.verified("good")


def test_cache_verified_follows_correctness_not_shaped_reward():
    rng = random.Random(0)
    cache = ExperienceCache("correct-only", epsilon=1.0)
    # DAPO's overlong penalty took a right answer to 0.2; a format bonus took a wrong one to 1.5
    assert cache.update("p", [[1], [2]], [0.2, 0.0], step=1, rng=rng, correct=[True, False])
    assert cache.get("p").token_ids == [1] and cache.verified("p")
    assert not cache.update("p", [[3], [4]], [1.5, 0.0], step=2, rng=rng, correct=[False, False])
    assert cache.get("p").token_ids == [1]
    cache.apply("q", [5], 1.5, step=3, correct=False)
    assert not cache.verified("q")


def test_cache_state_round_trip():
    cache = ExperienceCache("epsilon-greedy", 0.3)
    cache.put("a", [1, 2], 0.5, 3)
    cache.put("b", [3], 0.1, 4, correct=True)
    other = ExperienceCache()
    other.load_state_dict(cache.state_dict())
    assert other.get("a").token_ids == [1, 2] and len(other) == 2
    assert (other.policy, other.epsilon) == ("epsilon-greedy", 0.5)  # the loading cache's rule: this run's options
    assert other.verified("a") and other.verified("b")
    old = legacy_cache_state(cache.state_dict())  # a checkpoint written before paths carried `correct`: by reward
    old["paths"] = {k: v[:3] for k, v in old["paths"].items()}
    other.load_state_dict(old)
    assert other.verified("a") and not other.verified("b")
    cache.apply("c", [5, 6], 0.0, 5, logprobs=[-0.25, -1.5])
    other.load_state_dict(cache.state_dict())
    assert other.get("c").logprobs == [-0.25, -1.5] and other.get("a").logprobs is None
    with pytest.raises(ValueError, match="log-probs"):
        cache.put("d", [1, 2, 3], 0.0, 6, logprobs=[-1.0])


def random_cache(seed: int, size: int = 40) -> ExperienceCache:
    """Paths of 0-50 ids from a large vocabulary, with float32 log-probs, float64 ones, or none; NaN, right and wrong
    rewards; saturation counts."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cache = ExperienceCache("correct-only")
    for n in range(size):
        length = rng.choice([0, 1, rng.randrange(2, 50)])
        ids = torch.randint(0, 2 ** 31 - 1, (length,), generator=gen).tolist()
        logprobs = [None, torch.randn(length, generator=gen).tolist(),  # float32's values
                    torch.randn(length, generator=gen, dtype=torch.float64).tolist()][n % 3]
        cache.put(f"p{n}", ids, rng.choice([float("nan"), 0.0, 1.0, rng.random()]), rng.randrange(100),
                  rng.choice([None, True, False]), logprobs)
        cache.note_group(f"p{n}", rng.random() < 0.5)
    return cache


def test_packed_cache_state_is_the_list_state_it_replaced():
    """state_dict's packed paths (flat tensors) hold exactly what the list format did: each path loads back equal
    (ids, reward (NaN too), step, correct, log-probs to the bit, none where none) from either format, on random
    caches with float32 and float64 log-probs, empty paths, ids near 2**31."""
    for seed in range(5):
        cache = random_cache(seed)
        packed = cache.state_dict({"p0": "k"})
        assert set(packed) == {"policy", "epsilon", "correct_threshold", "packed_paths", "saturated", "prompt_keys"}
        legacy = legacy_cache_state(packed)
        expected = {k: [p.token_ids, p.reward, p.step, p.correct, p.logprobs] for k, p in cache.paths.items()}
        assert repr(legacy["paths"]) == repr(expected)  # repr: NaN rewards compare equal
        for state in (packed, legacy):
            other = ExperienceCache("correct-only")
            assert other.load_state_dict(state, {"p0": "k"}, 2 ** 31) == []
            assert repr(other.paths) == repr(cache.paths) and other.saturated == cache.saturated
            assert other.restored_keys == {"p0": "k"}
            assert all(type(t) is int for p in other.paths.values() for t in p.token_ids)
            assert all(p.ids.dtype == numpy.int32 for p in other.paths.values())
            assert [None if p.logprob_array is None else p.logprob_array.dtype for p in other.paths.values()] == \
                   [None if p.logprob_array is None else p.logprob_array.dtype for p in cache.paths.values()]
        # what torch.save writes and weights_only loads (mapped, as read_trainer_state reads it)
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        buffer.seek(0)
        other = ExperienceCache("correct-only")
        other.load_state_dict(torch.load(buffer, weights_only=True))
        assert repr(other.paths) == repr(cache.paths)


def test_a_cached_path_of_no_tokens_is_still_a_path():
    """CachedPath's __len__ (its tokens) made a path of none falsy, unlike the dataclass it was: a caller's
    `if cache.get(prompt_id):` (examples/custom_loop.py's `... if path else None`) took a kept empty answer for no
    path at all."""
    cache = ExperienceCache()
    cache.put("empty", [], 1.0, 0, correct=True)
    path = cache.get("empty")
    assert len(path) == 0 and bool(path) is True and cache.verified("empty")


def test_cached_logprobs_that_are_not_numbers_are_refused_as_before():
    """A None among a path's log-probs was a TypeError while paths were lists (float() of each); numpy's float64
    conversion made it a NaN, silently, and a NaN log-prob then steered the least-likely cut. Numbers of other
    kinds (ints, Decimals, numpy floats) are taken as float() takes them."""
    from decimal import Decimal

    cache = ExperienceCache()
    with pytest.raises(TypeError):
        cache.put("p", [1, 2, 3], float("nan"), 0, logprobs=[-0.5, None, -1.0])
    assert "p" not in cache.paths
    cache.put("p", [1, 2, 3], float("nan"), 0, logprobs=[-1, Decimal("-0.5"), numpy.float32(-0.25)])
    assert cache.get("p").logprobs == [-1.0, -0.5, -0.25]


def test_cached_logprobs_are_float32_only_where_that_moves_no_cut():
    """The rollout's log-probs (float32 values) are kept as float32, 4 bytes a token; a caller's float64 values
    that float32 would round into a tie are kept as float64: the least-likely cut stays the one the list gave."""
    near = [-1.0, -1.0 - 1e-12, -0.5, -0.25]  # float32: the first two tie, and the earliest (0) would be least likely
    assert numpy.float32(near[0]) == numpy.float32(near[1])
    config = RPOConfig(rpo_unverified_cut="least-likely", rpo_unverified_cut_fraction=1.0, rpo_min_cut=1)
    cache = ExperienceCache()
    cache.put("near", [1, 2, 3, 4], float("nan"), 0, logprobs=near)
    cache.put("sampled", [1, 2, 3, 4], float("nan"), 0, logprobs=torch.tensor(near).tolist())
    assert cache.get("near").logprob_array.dtype == numpy.float64 and cache.get("near").logprobs == near
    assert cache.get("sampled").logprob_array.dtype == numpy.float32
    other = ExperienceCache()
    other.load_state_dict(cache.state_dict())
    for key, kept in (("near", 1), ("sampled", 0)):
        path = other.get(key)
        cut = cut_cached_path(len(path), False, random.Random(0), 10, config, path.logprobs)
        assert cut.kept == kept == cut_cached_path(4, False, random.Random(0), 10, config,
                                                   cache.get(key).logprobs).kept, key
    with pytest.raises(ValueError, match="token id 2147483648 does not fit in int32"):
        cache.put("huge", [1, 2 ** 31], 0.0, 0)


def test_packed_paths_check_refuses_what_no_run_saved():
    """check_saved_paths on the packed format: a token id outside the vocabulary names its path and id (an int32
    one, or one past int32 in a wider tensor); fields of the wrong kind or count, offsets that do not split the
    tokens, a prompt id twice, log-probs of another count are each a ValueError naming the fault."""
    from rpo_engine.rpo.cache import check_saved_paths

    cache = ExperienceCache()
    for n, length in enumerate([3, 0, 4]):
        cache.put(f"p{n}", list(range(length)), 1.0, 0, logprobs=[-1.0] * length if n != 2 else None)
    check_saved_paths(cache.state_dict(), 4)

    def tampered(change):
        state = cache.state_dict()
        change(state["packed_paths"])
        return state

    def put_token(index, value, dtype=torch.int32):
        def change(packed):
            packed["tokens"] = packed["tokens"].to(dtype)
            packed["tokens"][index] = value
        return change
    cases = {"path 'p2' holds token id 4, not in the model's vocabulary": put_token(5, 4),
             "path 'p0' holds token id -1, not": put_token(2, -1),
             "path 'p2' holds token id 4294967296, not": put_token(6, 2 ** 32, torch.int64),
             "tokens is not a 1-d tensor of integers": put_token(0, 0, torch.float32),
             "correct is not a 1-d tensor of bools": lambda p: p.update(correct=torch.ones(3)),
             "rewards is not a 1-d tensor of floats": lambda p: p.update(rewards=[1.0, 1.0, 1.0]),
             "holds 3 paths and 2 steps": lambda p: p.update(steps=p["steps"][:2]),
             "offsets do not split its 7 tokens into 3 paths": lambda p: p["offsets"].__setitem__(1, 5),
             "offsets do not split": lambda p: p.update(offsets=p["offsets"][:3]),
             "names a prompt id twice": lambda p: p.update(ids=["p0", "p1", "p0"]),
             "no list of prompt ids": lambda p: p.update(ids=("p0", "p1", "p2")),
             "another count of log-probs": lambda p: p.update(has_logprobs=torch.ones(3, dtype=torch.bool))}
    for message, change in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            check_saved_paths(tampered(change), 4)


def test_algo_defaults():
    grpo, dapo = AlgoConfig("grpo"), AlgoConfig("dapo")
    assert (grpo.epsilon_high, grpo.loss_agg, grpo.dynamic_sampling) == (0.2, "seq-mean-token-mean", False)
    assert (dapo.epsilon_high, dapo.loss_agg, dapo.dynamic_sampling) == (0.28, "token-mean", True)
    # TRL's loss_type names the same aggregations
    assert [AlgoConfig(algo, loss_type=t).loss_agg for algo, t in [("dapo", "grpo"), ("grpo", "bnpo"), ("grpo", "dapo"),
                                                                   ("grpo", "dr_grpo")]] == [
        "seq-mean-token-mean", "token-mean", "token-mean", "seq-mean-token-sum-norm"]
    assert AlgoConfig("grpo", loss_agg="token-mean", loss_type="dapo").loss_agg == "token-mean"  # agreeing: fine


@pytest.mark.parametrize("values,message", [
    ({"algo": "ppo"}, "--algo must be grpo or dapo"),
    ({"loss_agg": "sum"}, "--loss-agg must be one of"),
    ({"loss_type": "ppo"}, "--loss-type must be one of"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "--chat-template-kwargs must be a JSON object"),
    ({"chat_template_kwargs": "[1]"}, "--chat-template-kwargs must be a JSON object"),
    ({"scale_rewards": "std"}, r"--scale-rewards must be one of \('group', 'batch', 'none'\), got 'std'"),
    ({"scale_rewards": 1}, "scale_rewards must be a string"),
    ({"importance_sampling_level": "group"}, "--importance-sampling-level must be one of"),
    ({"ppo_mini_batch_size": 0}, "--ppo-mini-batch-size must be >= 1, got 0"),
    ({"loss_type": "cispo"}, "--loss-type cispo caps each token's importance weight at --epsilon-high: give it"),
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "above 1 .got 0.28."),
    ({"loss_type": "cispo", "epsilon_high": 5.0, "delta": 6.0}, "--delta caps the clipped ratio; --loss-type cispo"),
    ({"loss_type": "sapo", "delta": 6.0}, "--delta caps the clipped ratio; --loss-type sapo has none"),
    ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "--sapo-temperature-pos and --sapo-temperature-neg must be > 0"),
    ({"loss_type": "cispo", "epsilon_high": 5.0, "importance_sampling_level": "sequence"}, "no sequence level"),
    ({"sync_ref_model": True}, "--sync-ref-model needs --beta > 0"),
    ({"sync_ref_model": True, "beta": 0.1, "use_peft": True}, "--sync-ref-model does not apply with --use-peft"),
    ({"ref_model_mixup_alpha": 0.0}, r"--ref-model-mixup-alpha must be in \(0, 1\], got 0.0"),
    ({"top_entropy_quantile": 1.5}, r"--top-entropy-quantile must be in \[0, 1\], got 1.5"),
    ({"delta": 1.1}, r"--delta must be > 1 \+ epsilon_high = 1.2 .*, got 1.1"),
    ({"entropy_coef": -0.1}, r"--entropy-coef must be >= 0, got -0.1"),
    ({"off_policy_mask_threshold": 0.0}, r"--off-policy-mask-threshold must be > 0, got 0.0"),
    ({"use_bias_correction_kl": True}, "--use-bias-correction-kl weights the KL term: it needs --beta > 0"),
    # an on-policy token's ratio is 1: a mask mode's cap at 0.5 masked every token (a run that trained nothing)
    ({"importance_sampling_correction": True, "importance_sampling_clip_max": 0.5},
     r"--importance-sampling-clip-max must be > 1 with --importance-sampling-mode sequence_mask .*, got 0.5"),
    ({"importance_sampling_correction": True, "importance_sampling_mode": "token_mask", "importance_sampling_clip_max": 1.0},
     "--importance-sampling-clip-max must be > 1 with --importance-sampling-mode token_mask"),
    ({"importance_sampling_correction": True, "importance_sampling_mode": "token_truncate",
      "importance_sampling_clip_max": 0.5}, "--importance-sampling-clip-max must be >= 1 with --importance-sampling-mode token_truncate"),
    # the lower bound mirrors it below 1: a mask mode's floor at 1 drops about half of the on-policy tokens, by
    # rounding; a truncate mode's above 1 raises every token's weight
    ({"importance_sampling_correction": True, "importance_sampling_clip_min": 1.0},
     r"^--importance-sampling-clip-min must be >= 0 and < 1 with --importance-sampling-mode sequence_mask "
     r"\(a ratio is positive, an on-policy token's is 1\), got 1.0$"),
    ({"importance_sampling_correction": True, "importance_sampling_mode": "token_mask",
      "importance_sampling_clip_min": -0.1}, r"^--importance-sampling-clip-min must be >= 0 and < 1 with "
                                             r"--importance-sampling-mode token_mask .*, got -0.1$"),
    ({"importance_sampling_correction": True, "importance_sampling_mode": "sequence_truncate",
      "importance_sampling_clip_min": 1.5}, r"^--importance-sampling-clip-min must be >= 0 and <= 1 with "
                                            r"--importance-sampling-mode sequence_truncate .*, got 1.5$"),
    ({"importance_sampling_correction": True, "importance_sampling_mode": "token_truncate",
      "importance_sampling_clip_min": -1}, r"^--importance-sampling-clip-min must be >= 0 and <= 1 with .*, got -1.0$"),
    # TRL's rule: truncating to [1, 1] makes every weight 1, a correction that corrects nothing
    ({"importance_sampling_correction": True, "importance_sampling_mode": "token_truncate",
      "importance_sampling_clip_min": 1.0, "importance_sampling_clip_max": 1.0},
     r"^--importance-sampling-clip-min \(1.0\) must be < --importance-sampling-clip-max \(1.0\)"),
    ({"importance_sampling_correction": True, "importance_sampling_clip_min": "inf"},
     "--importance-sampling-clip-min must be a finite number, got inf"),
    ({"importance_sampling_clip_min": 0.5},
     r"^--importance-sampling-clip-min does nothing without --importance-sampling-correction$"),
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "--loss-type vespo weighs each sequence"),
    ({"loss_type": "vespo", "vespo_lambda_neg": -1.0}, "--vespo-lambda-neg must be >= 0"),
    ({"loss_type": "vespo", "delta": 4.0}, "--delta caps the clipped ratio; --loss-type vespo has none"),
    ({"use_bias_correction_kl": True, "beta": 0.1, "importance_sampling_level": "sequence"}, "--importance-sampling-level token"),
    ({"use_adaptive_entropy": True, "entropy_coef": 2.0}, r"--entropy-coef \(2.0\) must lie in \[--entropy-coef-min"),
    ({"use_adaptive_entropy": True, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "--entropy-coef-min .0.5."),
    ({"use_adaptive_entropy": True, "entropy_coef_delta": 0.0}, "--entropy-coef-delta must be > 0"),
    ({"algo": "dapo", "delta": 1.25}, r"--delta must be > 1 \+ epsilon_high = 1.28"),
    ({"algo": "dapo", "max_completion_length": 3, "overlong_penalty": 2.0},  # its buffer, L // 4, is 0
     r"^--overlong-penalty does nothing with --max-completion-length 3 \(--algo dapo's overlong buffer"),
    ({"reward": "math,"}, "--reward must name one function or a comma-separated list"),
    ({"reward": "auto,math"}, "--reward must name one function or a comma-separated list"),
    ({"reward": "math,m:f", "reward_weights": "1"}, "--reward-weights must be 2 comma-separated number"),
    ({"reward_weights": "x"}, "--reward-weights must be 1 comma-separated number"),
    ({"reward_weights": "nan"}, "--reward-weights must be 1"),
    ({"loss_type": "grpo", "loss_agg": "token-mean"}, "--loss-type grpo is --loss-agg seq-mean-token-mean, not token-mean"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"num_generations": 1}, "--num-generations must be >= 2"),
    ({"rpo_max_cut": 0}, r"--rpo-max-cut \(0\) must be >= --rpo-min-cut"),
    ({"temperature": 0}, "--temperature must be >= 1e-05"),
    ({"bogus": 1}, "unknown option 'bogus'"),
    ({"rpo_cache_policy": "best"}, "--rpo-cache-policy must be one of"),
    ({"rpo_unverified_cut": "random"}, "--rpo-unverified-cut must be one of"),
    ({"rpo_unverified_cut": "full", "rpo_unverified_cut_fraction": 0.5},  # cut_cached_path never read it
     r"^--rpo-unverified-cut-fraction does nothing with --rpo-unverified-cut full \(it regrows"),
    ({"lr_scheduler_type": "exponential"}, "--lr-scheduler-type must be one of"),
    ({"adam_beta2": 1.0}, r"--adam-beta1 and --adam-beta2 must be in \[0, 1\)"),
    ({"adam_epsilon": 0}, "--adam-epsilon must be > 0"),
    ({"reward_workers": -1}, "--reward-workers must be >= 0, got -1"),
    ({"multi_objective_aggregation": "mean"}, "--multi-objective-aggregation must be one of"),
    ({"dynamic_sampling_metric": "score"}, "--dynamic-sampling-metric must be one of"),
    ({"steps": "ten"}, "steps must be an integer, got 'ten'"),  # a YAML file's values arrive untyped
    ({"steps": 2.5}, "steps must be an integer"),
    ({"rpo": "no"}, "rpo must be true or false"),
    ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"model": 3}, "model must be a string or null"),
])
def test_bad_options(values, message):
    with pytest.raises(UserError, match=message):
        config_from_dict(values)


def test_config_values_take_their_option_type():
    # YAML 1.1 reads 1e-5 (no dot) as a string; an int where a float is expected is that float
    c = config_from_dict({"learning_rate": "1e-5", "temperature": 1, "model": None, "eval_size": 7})
    assert c.learning_rate == 1e-5 and c.temperature == 1.0 and isinstance(c.temperature, float)
    assert c.model is None and c.eval_size == 7


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps="10"), "TrainConfig: steps must be an integer, got '10'"),
    (dict(steps=2.5), "TrainConfig: steps must be an integer, got 2.5"),
    (dict(steps=True), "TrainConfig: steps must be an integer, got True"),
    (dict(seed=1.5), "TrainConfig: seed must be an integer, got 1.5"),
    (dict(progress="false"), "TrainConfig: progress must be true or false, got 'false'"),  # truthy: bars shown
    (dict(resume="no"), "TrainConfig: resume must be true or false, got 'no'"),
    (dict(learning_rate="fast"), "TrainConfig: learning_rate must be a number, got 'fast'"),
    (dict(eval_steps=None), "TrainConfig: eval_steps must be an integer, got None"),
    (dict(reward=["exact", "math"]), "TrainConfig: reward must be a string, got"),
    (dict(push_to_hub=True, hub_private_repo="false"), "TrainConfig: hub_private_repo must be true or false or null"),
    (dict(algo="dapo"), r"TrainConfig: algo must be an AlgoConfig \(rpo_engine.config.AlgoConfig\(algo='dapo'\)\), got 'dapo'"),
    (dict(rpo={"rpo_max_cut": 8}), r"TrainConfig: rpo must be an RPOConfig \(rpo_engine.config.RPOConfig\(rpo_max_cut=300\)\), got"),
])
def test_a_config_built_in_python_names_a_value_of_the_wrong_type(kwargs, message):
    """TrainConfig built directly (a script's `train(TrainConfig(...))`) is not typed by config_from_dict: a string
    for a number was a TypeError deep in the checks, a nested section given as its name an AttributeError, and a
    string for a bool ("false", truthy) was taken as true without a word."""
    with pytest.raises(UserError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("make,message", [
    (lambda: AlgoConfig(epsilon="0.2x"), "AlgoConfig: epsilon must be a number, got '0.2x'"),
    (lambda: AlgoConfig(num_iterations=2.0), "AlgoConfig: num_iterations must be an integer, got 2.0"),
    (lambda: RPOConfig(rpo_max_cut="8"), "RPOConfig: rpo_max_cut must be an integer, got '8'"),
    (lambda: RPOConfig(rpo="no"), "RPOConfig: rpo must be true or false, got 'no'"),
])
def test_a_section_built_in_python_names_a_value_of_the_wrong_type(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_a_config_built_in_python_takes_what_its_options_mean(tmp_path):
    """What the YAML file's reading takes (an int for a float, a number as text for a float) and a path object for a
    path, each stored as the option's type; its record (a run's config.json) reads back as the same options."""
    import dataclasses
    import json

    from rpo_engine.config import config_to_dict, parse_args

    c = TrainConfig(learning_rate="1e-5", temperature=1, output=tmp_path / "run", model=tmp_path / "m", steps=3,
                    algo=AlgoConfig(algo="dapo", beta=0), rpo=RPOConfig(rpo_max_cut=8))
    assert (c.learning_rate, c.temperature, c.output, c.model) == (1e-5, 1.0, str(tmp_path / "run"), str(tmp_path / "m"))
    assert isinstance(c.temperature, float) and isinstance(c.algo.beta, float)
    (tmp_path / "c.json").write_text(json.dumps(config_to_dict(c)))
    assert dataclasses.replace(parse_args(["--config", str(tmp_path / "c.json")]), config=None) == c


def test_a_config_built_in_python_takes_numpy_scalars_as_their_values():
    """A sweep's values from numpy (numpy.arange steps, numpy.linspace rates, a numpy bool) are the numbers they
    hold: "steps must be an integer, got np.int64(10)" refused an integer; stored as Python's, so config.json and
    metrics write them (json refuses numpy's)."""
    import json

    from rpo_engine.config import config_to_dict

    c = TrainConfig(steps=numpy.int64(10), seed=numpy.int32(3), learning_rate=numpy.float32(0.25),
                    progress=numpy.bool_(False), algo=AlgoConfig(beta=numpy.float64(0.5)),
                    rpo=RPOConfig(rpo_max_cut=numpy.int16(8)))
    assert (c.steps, c.seed, c.learning_rate, c.progress, c.algo.beta, c.rpo.rpo_max_cut) == (10, 3, 0.25, False, 0.5, 8)
    assert [type(v) for v in (c.steps, c.seed, c.learning_rate, c.progress, c.rpo.rpo_max_cut)] == \
        [int, int, float, bool, int]
    json.dumps(config_to_dict(c))
    with pytest.raises(UserError, match=r"TrainConfig: steps must be an integer, got 2.5$"):
        TrainConfig(steps=numpy.float64(2.5))


def test_config_sections_route_flat_names():
    c = config_from_dict({"algo": "dapo", "rpo": False, "rpo_max_cut": 40, "steps": 3})
    assert isinstance(c, TrainConfig) and isinstance(c.rpo, RPOConfig)
    assert (c.algo.algo, c.rpo.rpo, c.rpo.rpo_max_cut, c.steps) == ("dapo", False, 40, 3)


def test_trl_scale_rewards_values():
    for value in ("group", "batch", "none"):
        assert config_from_dict({"scale_rewards": value}).algo.scale_rewards == value
    # TRL's booleans (and this project's before it took TRL's strings)
    assert config_from_dict({"scale_rewards": True}).algo.scale_rewards == "group"
    assert config_from_dict({"scale_rewards": False}).algo.scale_rewards == "none"


def test_yaml_lists_and_mappings(tmp_path):
    from rpo_engine.config import parse_args, reward_names, reward_weights

    path = tmp_path / "run.yaml"
    path.write_text("reward: [math, 'tests.reward_fns:hash_reward']\nreward_weights: [1, 0.5]\n"
                    "chat_template_kwargs: {enable_thinking: false}\n")
    config = parse_args(["--config", str(path)])
    assert reward_names(config) == ["math", "tests.reward_fns:hash_reward"] and reward_weights(config) == [1.0, 0.5]
    assert config.chat_template_kwargs == '{"enable_thinking": false}'  # a YAML mapping, as the flag's JSON


# ---- mutation audit (audit_mut_algo): cases the hand-computed tests above left open ----------------------

def test_group_advantages_center_each_group_on_its_own_mean():
    """Kills `rewards - rewards.mean()` (the batch's mean): two groups whose means (0.25, 0.75) differ from the
    batch's (0.5), so each centre shows; G = 2 is still scaled by its std (kills `shape[1] <= 2`)."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, "none"),
                               torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, 0.25, -0.75]]))
    std = math.sqrt(0.75 / 3)  # unbiased std of [1, 0, 0, 0] and of [1, 1, 1, 0]
    torch.testing.assert_close(group_advantages(rewards),
                               torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, 0.25, -0.75]]) / (std + 1e-4))
    pair = group_advantages(torch.tensor([[1.0, 0.0]]))  # std of [1, 0]: sqrt(1/2)
    torch.testing.assert_close(pair, torch.tensor([[0.5, -0.5]]) / (math.sqrt(0.5) + 1e-4))
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))  # G = 1: nothing to compare


def test_truncation_of_empty_and_one_token_paths():
    """An empty path (a cold start that ended at once) with --rpo-extra-budget 0 still gets a one-token
    suffix (kills dropping `max(1, ...)` from the budget); a one-token path is cut whole (its only cut,
    1, is within every bound: kills drawing only when `upper > 1`)."""
    rng = random.Random(0)
    assert truncation_at(0, 0, 0, 100) == Truncation(cut=0, kept=0, budget=1)
    assert sample_truncation(0, rng, 1, 300, 0.25, 0, 100).budget == 1
    assert least_likely_truncation([], 1, 8, 1.0, 0, 100).budget == 1
    for min_cut in (1, 2):
        cuts = {sample_truncation(1, rng, min_cut, 300, 0.25, 16, 400) for _ in range(20)}
        assert cuts == {Truncation(cut=1, kept=0, budget=17)}
    assert cut_cached_path(1, True, rng, 400).kept == 0


def test_least_likely_cut_reaches_as_far_as_the_unverified_fraction():
    """--rpo-unverified-cut least-likely bounds the cut of a path not known right by
    --rpo-unverified-cut-fraction (default 1: anywhere), not by the verified paths' --rpo-max-cut-fraction
    (0.25): its least likely token, token 5 of 40, is reached, and at a fraction of 0.5 the least likely of the
    last 20."""
    logprobs = [-0.1] * 40
    logprobs[5], logprobs[25] = -6.0, -3.0
    rng = random.Random(0)
    assert cut_cached_path(40, False, rng, 400, RPOConfig(rpo_unverified_cut="least-likely"), logprobs).kept == 5
    half = RPOConfig(rpo_unverified_cut="least-likely", rpo_unverified_cut_fraction=0.5)
    assert cut_cached_path(40, False, rng, 400, half, logprobs).kept == 25
    # nor by --rpo-max-cut (300 tokens), which bounds verified paths only: token 10 of 400 is reached
    long = [-0.1] * 400
    long[10] = -6.0
    assert cut_cached_path(400, False, rng, 800, RPOConfig(rpo_unverified_cut="least-likely"), long).kept == 10


def test_cache_update_keeps_the_chosen_answers_correctness_and_logprobs():
    """update() stores the picked answer's own `correct` and `logprobs` (kills indexing them by 0): the right
    answer is the second, with the higher reward and epsilon 1."""
    cache = ExperienceCache("correct-only", epsilon=1.0)
    assert cache.update("p", [[1], [2, 3]], [0.0, 1.0], 0, random.Random(0), correct=[False, True],
                        logprobs=[[-1.0], [-0.5, -0.25]])
    path = cache.get("p")
    assert (path.token_ids, path.correct, path.logprobs) == ([2, 3], True, [-0.5, -0.25])


def test_cache_load_drops_stale_paths_with_their_saturation_and_keeps_its_threshold():
    """load_state_dict with prompt digests keeps a path whose prompt is unchanged and drops (and returns) one
    whose prompt changed, its saturation count with it (kills `==` for `!=` and a missing pop); the saved
    correct_threshold judges an old checkpoint's paths (kills not restoring it)."""
    cache = ExperienceCache(correct_threshold=0.8)
    cache.put("same", [1], 1.0, 0)
    cache.put("changed", [2], 1.0, 0)
    for pid in ("same", "changed"):
        cache.note_group(pid, True)
    state = cache.state_dict({"same": "a", "changed": "b"})
    other = ExperienceCache()
    assert other.load_state_dict(state, {"same": "a", "changed": "c"}) == ["changed"]
    assert "same" in other and "changed" not in other
    assert (other.saturation("same"), other.saturation("changed")) == (1, 0)
    old = legacy_cache_state(cache.state_dict())
    old["paths"] = {"p": [[3], 0.6, 0]}  # before paths carried `correct`: judged by the saved threshold
    other.load_state_dict(old)
    assert other.correct_threshold == 0.8 and not other.verified("p")


def test_saved_path_check_refuses_exactly_the_ids_outside_the_vocabulary():
    """check_saved_paths screens each path's ids at C speed (type set, min, max) and names a bad one by the loop: it
    refuses a path iff some id is no integer (a bool, a float) or outside [0, vocab) (the per-id rule), and names
    that id; ids of another integer type (numpy's) still pass, as the per-id rule lets them."""
    import numpy

    from rpo_engine.rpo.cache import check_saved_paths

    def bad(t, vocab):
        return isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab

    cases = [[], [0, 9], [3, -1, 4], [3, 10], [3, 10 ** 30], [True, 2], [2.0, 3], [1, 2.5], [1, "2"],
             [numpy.int64(4), 5], [1, numpy.int64(12)], (1, 2)]
    for ids in cases:
        state = {"paths": {"p": [ids, 1.0, 0]}}
        wrong = [t for t in ids if bad(t, 10)]
        if wrong:
            with pytest.raises(ValueError, match=rf"path 'p' holds token id {re.escape(repr(wrong[0]))}, not in"):
                check_saved_paths(state, 10)
        else:
            check_saved_paths(state, 10)


def test_dapo_overlong_buffer_defaults_to_a_quarter_of_the_budget():
    """The trainer's overlong buffer: DAPO's default is a quarter of --max-completion-length, GRPO's none, and a
    given --overlong-buffer is used as given (kills a wrong default fraction or algorithm name)."""
    from types import SimpleNamespace

    from rpo_engine.trainer import Trainer

    def buffer(algo, given=None, length=320):
        return Trainer.overlong_buffer(SimpleNamespace(algo=AlgoConfig(algo, overlong_buffer=given),
                                                       config=SimpleNamespace(max_completion_length=length)))

    assert (buffer("dapo"), buffer("dapo", length=100), buffer("grpo")) == (80, 25, 0)
    assert (buffer("dapo", 0), buffer("grpo", 8), buffer("dapo", 8)) == (0, 8, 8)


def test_trainer_counts_a_visit_saturated_only_when_every_answer_was_right():
    """Trainer.update_cache: a group with one wrong answer resets the prompt's saturation count, an all-right one
    adds to it (kills `any(right)` for `all(right)`); the kept answer is the best by the rewards it is given."""
    from types import SimpleNamespace

    from rpo_engine.distributed import Dist
    from rpo_engine.trainer import Group, Trainer

    cache = ExperienceCache("correct-only", epsilon=1.0)
    trainer = SimpleNamespace(cache=cache, rng=random.Random(0), dist=Dist(), step_num=3)
    rows = [{"id": "mixed"}, {"id": "right"}]
    groups = [Group(row, [9], [], [[1], [2, 2]], [[-0.5], [-0.5, -0.5]], ["stop", "stop"]) for row in rows]
    for _ in range(2):
        Trainer.update_cache(trainer, rows, groups, [[1.0, 0.0], [0.6, 1.0]], [[True, False], [True, True]])
    assert (cache.saturation("mixed"), cache.saturation("right")) == (0, 2)
    assert cache.get("mixed").token_ids == [1] and cache.get("right").token_ids == [2, 2] and cache.get("right").step == 3


def test_trainer_subtracts_the_overlong_penalty_from_the_reward():
    """Trainer.shape_rewards with DAPO's overlong buffer (8 of a 16-token budget, penalty 1) and no length
    shaping: answers of 4, 12 and 16 tokens lose 0, 0.5 and 1 (kills adding the penalty's negation); the
    penalty is kept as the last reward term."""
    from types import SimpleNamespace

    from rpo_engine.trainer import Group, Trainer

    trainer = SimpleNamespace(config=SimpleNamespace(max_completion_length=16, format_reward_weight=0.0),
                              rpo=SimpleNamespace(length_shaping=False), reward_weights=[1.0],
                              algo=SimpleNamespace(overlong_penalty=1.0), overlong_buffer=lambda: 8)
    group = Group({"id": "p"}, [9], [], [[1] * 4, [1] * 12, [1] * 16], [[]] * 3, ["stop"] * 3)
    Trainer.shape_rewards(trainer, group, [4, 12, 16], ["a", "b", "c"], [[1.0, 1.0, 0.0]])
    assert group.rewards == pytest.approx([1.0, 0.5, -1.0]) and group.correct == [True, True, False]
    assert group.terms[-1] == pytest.approx([0.0, -0.5, -1.0])


def test_trainer_penalizes_the_whole_answer_kept_path_included():
    """Trainer.score_groups: under RPO an answer is the kept path plus its suffix, and DAPO's overlong penalty
    reads its whole length (8 kept + 4 or 8 generated of a 16-token budget, buffer 8: -0.5 and -1), not the
    suffix's (4 and 8: no penalty)."""
    from types import SimpleNamespace

    from rpo_engine.trainer import Group, Trainer

    trainer = SimpleNamespace(config=SimpleNamespace(max_completion_length=16, format_reward_weight=0.0),
                              rpo=SimpleNamespace(length_shaping=False), reward_weights=[1.0],
                              algo=SimpleNamespace(overlong_penalty=1.0), overlong_buffer=lambda: 8,
                              tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens: str(ids)),
                              reward_fn=lambda text, answer: 1.0, extra_rewards=[], reward_metrics={},
                              reward_trainer_state=lambda: None)
    trainer.shape_rewards = lambda *args: Trainer.shape_rewards(trainer, *args)
    group = Group({"id": "p", "answer": "1"}, [9], [7] * 8, [[1] * 4, [1] * 8], [[]] * 2, ["stop"] * 2)
    Trainer.score_groups(trainer, [group])
    assert group.rewards == pytest.approx([0.5, 0.0])


def test_partial_accuracy_is_not_a_right_answer_under_length_shaping():
    """Trainer.shape_rewards: a partial accuracy (0.5) is not a right answer (`is_correct` needs full marks): it
    is marked wrong and shaped to 0, and takes no share of the right answers' length mean (kills is_correct's
    `>= 1.0` -> `> 0.0`)."""
    from types import SimpleNamespace

    from rpo_engine.rewards.answers import is_correct
    from rpo_engine.trainer import Group, Trainer

    trainer = SimpleNamespace(config=SimpleNamespace(max_completion_length=16, format_reward_weight=0.0),
                              rpo=SimpleNamespace(length_shaping=True, length_alpha=0.1), reward_weights=[1.0],
                              algo=SimpleNamespace(overlong_penalty=1.0), overlong_buffer=lambda: 0,
                              warned_partial_scores=True)
    group = Group({"id": "p"}, [9], [], [[1] * 10, [1] * 30, [1] * 5], [[]] * 3, ["stop"] * 3)
    Trainer.shape_rewards(trainer, group, [10, 30, 5], ["a", "b", "c"], [[1.0, 0.5, 0.0]])
    assert group.correct == [True, False, False]
    assert group.rewards == pytest.approx([0.5, 0.0, 0.0])
    assert is_correct(1.0) and not is_correct(0.999) and not is_correct(0.0)
