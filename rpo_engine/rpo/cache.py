"""The experience cache: per prompt id, the last kept reasoning path (token ids), its reward and step.

RPO (Yi et al., arXiv 2601.19404) regenerates only the tail of this path each step. Where we depart
from the paper's public code (yhz5613813/RPO), and why:
- we store token ids, not decoded text, so the prefix the engine continues is exactly the tokens
  the policy produced (re-tokenizing text can merge tokens differently);
- ties for the best reward are broken at random, and the random pick covers all G completions
  (the code's `argmax` always took the first of equal rewards and its `randint(0, G-1)` never the last);
- a path is *verified* when it was a correct answer: the trainer passes each answer's correctness (its
  accuracy reward, before any shaping: a length or overlong penalty can push a right answer's shaped
  reward low, and a format bonus a wrong one's high); callers without one get `reward >= correct_threshold`.
  The trainer cuts a verified path by at most `--rpo-max-cut-fraction` / `--rpo-max-cut`, and an
  unverified one (a cold start's, reward NaN, or a wrong answer kept in its place) anywhere along it, as
  the paper's code cuts a cold-start path: every suffix of a wrong kept prefix is usually wrong too, so a
  shallow cut of a wrong path teaches nothing;
- `correct-only` never replaces a verified path by a wrong answer (the paper's rule, `epsilon-greedy`, does,
  and a weak model then trades its few correct paths for wrong ones); an unverified path is replaced by
  the chosen answer whatever its reward, so a prompt is cold-started only once;
- a path may carry the log-probability each of its tokens was sampled with, so a wrong path can be cut at
  its least likely token (`--rpo-unverified-cut least-likely`). A path restored from a checkpoint that did
  not store them has none, nor do the answers grown from it: that prompt keeps the uniform cut.
- it counts, per prompt, the consecutive visits on which all G answers were right (`saturated`), so the
  trainer can cut a path that keeps coming back right deeper (`--rpo-saturated-cut-growth`).
The cache saves to / restores from a plain dict of strings, lists and numbers (a cold start's reward is
NaN), stored inside every checkpoint's trainer_state.pt (torch.save, loaded with weights_only=True).
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass

from rpo_engine.config import CACHE_POLICIES
from rpo_engine.rpo.truncation import check_rng


@dataclass
class CachedPath:
    token_ids: list[int]
    reward: float
    step: int
    correct: bool = False  # the answer was right (a cold start's is not known: False)
    logprobs: list[float] | None = None  # each token's sampling log-prob, when the caller gave them


class ExperienceCache:
    """policy: "epsilon-greedy" (the paper's rule, this class's default) or "correct-only" (the trainer's and
    RPORollout's default, --rpo-cache-policy); correct_threshold: the reward at which an answer counts as right
    where the caller does not say (`correct`)."""

    def __init__(self, policy: str = "epsilon-greedy", epsilon: float = 0.5, correct_threshold: float = 0.5):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"ExperienceCache policy must be one of {CACHE_POLICIES}, got {policy!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 <= epsilon <= 1:
            raise ValueError(f"ExperienceCache epsilon must be in [0, 1] (a number), got {epsilon!r}")
        if (isinstance(correct_threshold, bool) or not isinstance(correct_threshold, numbers.Real)
                or not math.isfinite(correct_threshold)):  # text would fail at the first put; NaN verifies nothing
            raise ValueError(f"ExperienceCache correct_threshold must be a finite number, got {correct_threshold!r}")
        self.policy, self.epsilon, self.correct_threshold = policy, epsilon, correct_threshold
        self.paths: dict[str, CachedPath] = {}
        self.saturated: dict[str, int] = {}  # consecutive visits whose G answers were all right
        # the digests a checkpoint stored with its paths: saved again (with the caller's `prompt_keys`) for a path
        # whose prompt the caller no longer has (a run resumed on fewer rows), which a later resume must tell apart
        self.restored_keys: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.paths

    def get(self, prompt_id: str) -> CachedPath | None:
        return self.paths.get(prompt_id)

    def put(self, prompt_id: str, token_ids: list[int], reward: float, step: int, correct: bool | None = None,
            logprobs: list[float] | None = None) -> None:
        """Store a path; `correct` defaults to reward >= correct_threshold (`is_correct`); `logprobs`, one per
        token, are optional."""
        if logprobs is not None and len(logprobs) != len(token_ids):
            raise ValueError(f"path of {len(token_ids)} tokens with {len(logprobs)} log-probs")
        # ints, not a tensor's 0-d elements: the path goes back into generate() and into a checkpoint
        self.paths[prompt_id] = CachedPath([int(t) for t in token_ids], float(reward), step,
                                           self.is_correct(reward, correct),
                                           None if logprobs is None else [float(x) for x in logprobs])

    def is_correct(self, reward: float, correct: bool | None) -> bool:
        """`correct` when the caller knows it, else reward >= correct_threshold (NaN, a cold start's, is not)."""
        return bool(reward >= self.correct_threshold) if correct is None else bool(correct)

    def verified(self, prompt_id: str) -> bool:
        """Whether the prompt's path is known to be a correct answer."""
        path = self.paths.get(prompt_id)
        return path is not None and path.correct

    def note_group(self, prompt_id: str, all_right: bool) -> None:
        """After a visit: one more consecutive visit whose answers were all right, or back to none."""
        self.saturated[prompt_id] = self.saturated.get(prompt_id, 0) + 1 if all_right else 0

    def saturation(self, prompt_id: str) -> int:
        """Consecutive visits, up to the last, on which all of the prompt's answers were right."""
        return self.saturated.get(prompt_id, 0)

    def choose(self, rewards: list[float], rng: random.Random) -> int:
        """Index of the completion to keep for a group: the best (ties at random; a NaN reward is never the
        best) with probability epsilon, else a random one. `rewards`: any sequence of numbers (a tensor row too)."""
        check_rng(rng)
        rewards = [float(r) for r in rewards]  # `not tensor` and `max` over 0-d tensors would fail or mislead
        if not rewards:
            raise ValueError("ExperienceCache.choose: a group of no completions")
        scored = [r for r in rewards if r == r]  # NaN != NaN
        if rng.random() < self.epsilon and scored:
            best = max(scored)
            return rng.choice([i for i, r in enumerate(rewards) if r == best])
        return rng.randrange(len(rewards))

    def update(self, prompt_id: str, answers: list[list[int]], rewards: list[float], step: int,
               rng: random.Random, correct: list[bool] | None = None,
               logprobs: list[list[float]] | None = None) -> bool:
        """Keep one of a group's whole answers (kept path + suffix), chosen by reward; `correct` says
        which answers are right (default: reward >= correct_threshold); `logprobs`, optional, each answer's
        per-token sampling log-probs. Returns whether the path changed."""
        for name, values in (("rewards", rewards), ("correct", correct), ("logprobs", logprobs)):
            if values is not None and len(values) != len(answers):
                raise ValueError(f"ExperienceCache.update: {len(answers)} answers with {len(values)} {name}")
        index = self.choose(rewards, rng)
        return self.apply(prompt_id, answers[index], float(rewards[index]), step,
                          None if correct is None else correct[index], None if logprobs is None else logprobs[index])

    def apply(self, prompt_id: str, answer: list[int], reward: float, step: int, correct: bool | None = None,
              logprobs: list[float] | None = None) -> bool:
        """The update once `choose` has picked an `answer` with `reward`. Split from `update`
        for callers that choose before they hold the answer (under torchrun the answer lives on the rank
        that generated it). Returns whether the path changed."""
        correct = self.is_correct(reward, correct)
        if self.policy == "correct-only" and self.verified(prompt_id) and not correct:
            return False
        self.put(prompt_id, answer, reward, step, correct, logprobs)
        return True

    def state_dict(self, prompt_keys: dict[str, str] | None = None) -> dict:
        """`prompt_keys`: prompt id -> a digest of the prompt (and answer) it stands for, stored with the paths so
        that a resumed run can tell a path from a prompt that has since changed under the same id."""
        state = {"policy": self.policy, "epsilon": self.epsilon, "correct_threshold": self.correct_threshold,
                 "paths": {k: [v.token_ids, v.reward, v.step, v.correct, v.logprobs] for k, v in self.paths.items()},
                 "saturated": dict(self.saturated)}
        if prompt_keys is not None:
            keys = {**self.restored_keys, **prompt_keys}
            state["prompt_keys"] = {k: keys[k] for k in self.paths if k in keys}
        return state

    def load_state_dict(self, state: dict, prompt_keys: dict[str, str] | None = None,
                        vocab_size: int | None = None) -> list[str]:
        """The checkpoint's paths; the update rule (policy, epsilon) stays this cache's: a resumed run's options
        govern from its first step, as its optimizer's do. With `prompt_keys` (as state_dict's), a path saved for
        another prompt than its id now names (another dataset, a file edited, the built-in task under another
        seed) is dropped: its prompt cold-starts again rather than continue an answer to another question.
        With `vocab_size`, a path of a token id outside [0, vocab_size) is a ValueError. -> the ids dropped."""
        check_saved_paths(state, vocab_size)
        self.correct_threshold = state["correct_threshold"]
        self.paths = {}
        self.saturated = {k: int(v) for k, v in state.get("saturated", {}).items()}  # older checkpoints: none
        # older checkpoints: no `correct` (judged by reward), no `logprobs`
        for k, (ids, r, s, *rest) in state["paths"].items():
            self.put(k, ids, r, int(s), bool(rest[0]) if rest else None, rest[1] if len(rest) > 1 else None)
        saved = state.get("prompt_keys", {})  # older checkpoints: none, every path kept
        stale = [k for k in self.paths if k in saved and k in (prompt_keys or {}) and saved[k] != prompt_keys[k]]
        for k in stale:
            del self.paths[k]
            self.saturated.pop(k, None)
        self.restored_keys = {k: saved[k] for k in self.paths if k in saved}
        return stale


def check_saved_paths(state: dict, vocab_size: int | None) -> None:
    """What state_dict writes, before any of it is used: a checkpoint file edited or from elsewhere may load
    (weights only) and still hold paths no run saved; their token ids would reach the rollout a step or an
    epoch later, as a traceback there (or an out-of-bounds embedding read on a GPU)."""
    paths, saturated = state["paths"], state.get("saturated", {})
    for name, value in (("paths", paths), ("saturated", saturated)):
        if not isinstance(value, dict):
            raise ValueError(f"experience cache: {name} is a {type(value).__name__}, not a dict by prompt id")
    limit = math.inf if vocab_size is None else vocab_size
    for key, entry in paths.items():
        if not isinstance(key, str) or not isinstance(entry, (list, tuple)) or not 3 <= len(entry) <= 5 \
                or not isinstance(entry[0], (list, tuple)):
            raise ValueError(f"experience cache: path {key!r} is not [token ids, reward, step, correct, logprobs]")
        ids = entry[0]
        # screened at C speed (a large cache holds 1e8 ids: a loop per id added ~40% to torch.load's time);
        # the loop below, run only on a failed screen, names the first bad id
        if not ids or (set(map(type, ids)) <= {int} and min(ids) >= 0 and max(ids) < limit):
            continue
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < limit:
                raise ValueError(f"experience cache: path {key!r} holds token id {t!r}, not in the model's "
                                 f"vocabulary [0, {limit})")
