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
The cache saves to / restores from a plain dict of strings, numbers and a few flat tensors (a cold start's reward
is NaN), stored inside every checkpoint's trainer_state.pt (torch.save, loaded with weights_only=True).

Storage at dataset scale: a path's token ids are kept as int32 and its log-probs as float32 (float64 where a
caller's values are not float32's: the least likely token must stay the one it was), not as Python lists: those
cost ~36 bytes a token for an id and ~32 for a log-prob, 5.3 GB for DAPO-Math-17k's prompts at 4k tokens, and a
checkpoint pickled and unpickled their ~1.4e8 objects one by one (benchmarks/bench_cache.py, README). A checkpoint
holds all paths' tokens concatenated, with their offsets (`packed_paths`); one written before (`paths`: per
prompt [token ids, reward, step, correct, logprobs]) loads as it did.
"""
from __future__ import annotations

import math
import numbers
import random

import numpy
import torch

from rpo_engine.config import CACHE_POLICIES
from rpo_engine.rpo.truncation import check_rng


class CachedPath:
    """A kept path. `token_ids` and `logprobs` read as lists (of ints, of floats: what generate() and the cut take);
    they are stored as arrays, `ids` (int32) and `logprob_array` (float32, or float64 where that would round)."""
    __slots__ = ("ids", "reward", "step", "correct", "logprob_array")

    def __init__(self, token_ids, reward: float, step: int, correct: bool = False, logprobs=None):
        self.reward, self.step, self.correct = reward, step, correct
        self.token_ids, self.logprobs = token_ids, logprobs

    @property
    def token_ids(self) -> list[int]:
        return self.ids.tolist()

    @token_ids.setter
    def token_ids(self, token_ids) -> None:
        self.ids = token_array(token_ids)

    @property
    def logprobs(self) -> list[float] | None:
        """Each token's sampling log-prob, when the caller gave them."""
        return None if self.logprob_array is None else self.logprob_array.tolist()

    @logprobs.setter
    def logprobs(self, logprobs) -> None:
        self.logprob_array = None if logprobs is None else logprob_array(logprobs)

    def __len__(self) -> int:
        """Its tokens (without making the list)."""
        return len(self.ids)

    def __bool__(self) -> bool:
        """A path, however short (without it __len__ made one of no tokens falsy, read as no path)."""
        return True

    def __eq__(self, other) -> bool:
        if not isinstance(other, CachedPath):
            return NotImplemented
        return self.entry() == other.entry()

    def entry(self) -> list:
        """[token ids, reward, step, correct, logprobs]: the path as the list format (`paths`) saved it."""
        return [self.token_ids, self.reward, self.step, self.correct, self.logprobs]

    def __repr__(self) -> str:
        return (f"CachedPath(token_ids={self.token_ids!r}, reward={self.reward!r}, step={self.step!r}, "
                f"correct={self.correct!r}, logprobs={self.logprobs!r})")


def token_array(token_ids) -> numpy.ndarray:
    """`token_ids` (a list, a tensor, any iterable of integers) as an int32 array; ids are int()-ed as they were
    when paths were lists. An id int32 cannot hold is a ValueError (no vocabulary comes near 2**31)."""
    if isinstance(token_ids, torch.Tensor):  # at C speed, not one 0-d tensor per id (int() truncates alike)
        token_ids = token_ids.detach().cpu().long().numpy()
    if not isinstance(token_ids, (list, tuple, numpy.ndarray)):
        token_ids = list(token_ids)
    try:  # numpy's conversion of a list of ints: 3x a loop of int()s (which it matches, floats truncated too)
        ids = numpy.array(token_ids, dtype=numpy.int64)
    except OverflowError:
        ids = None
    if ids is None or ids.ndim != 1 or (len(ids) and not (INT32.min <= ids.min() and ids.max() <= INT32.max)):
        bad = next((t for t in map(int, numpy.ravel(numpy.array(token_ids, dtype=object)))
                    if not INT32.min <= t <= INT32.max), None)
        raise ValueError(f"experience cache: token id {bad} does not fit in int32" if bad is not None else
                         "experience cache: token ids must be a flat sequence of integers")
    return ids.astype(numpy.int32)


def logprob_array(logprobs) -> numpy.ndarray:
    """float32 where that holds each value exactly (the rollout's log-probs are float32's), else float64: a
    rounded log-prob could tie with another and move a least-likely cut."""
    if isinstance(logprobs, torch.Tensor):  # float64 holds any float dtype's values exactly (bfloat16's too)
        logprobs = logprobs.detach().cpu().double().numpy()
    if not isinstance(logprobs, (list, tuple, numpy.ndarray)):
        logprobs = list(logprobs)
    values = numpy.asarray(logprobs)
    if values.dtype == object:  # mixed kinds: float() each, as before (numpy's float64 made a None a NaN, silently)
        values = numpy.array([float(x) for x in values.ravel()]).reshape(values.shape)
    values = values.astype(numpy.float64)
    if values.ndim != 1:
        raise ValueError("experience cache: log-probs must be a flat sequence of numbers")
    single = values.astype(numpy.float32)
    return single if numpy.array_equal(single, values, equal_nan=True) else values


INT32 = numpy.iinfo(numpy.int32)


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
        self.paths[prompt_id] = CachedPath(token_ids, float(reward), step, self.is_correct(reward, correct), logprobs)

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
        that a resumed run can tell a path from a prompt that has since changed under the same id. The paths are
        `packed_paths` (pack_paths): a few flat tensors, which torch.save writes and weights_only loads at
        memory speed."""
        state = {"policy": self.policy, "epsilon": self.epsilon, "correct_threshold": self.correct_threshold,
                 "packed_paths": pack_paths(self.paths), "saturated": dict(self.saturated)}
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
        With `vocab_size`, a path of a token id outside [0, vocab_size) is a ValueError. -> the ids dropped.
        `state`: state_dict's, or an older checkpoint's (`paths` as lists)."""
        check_saved_paths(state, vocab_size)
        self.correct_threshold = state["correct_threshold"]
        self.paths = {}
        self.saturated = {k: int(v) for k, v in state.get("saturated", {}).items()}  # older checkpoints: none
        if "packed_paths" in state:
            self.paths = unpack_paths(state["packed_paths"])
        else:  # older checkpoints: lists; before those, no `correct` (judged by reward), no `logprobs`
            for k, (ids, r, s, *rest) in state["paths"].items():
                self.put(k, ids, r, int(s), bool(rest[0]) if rest else None, rest[1] if len(rest) > 1 else None)
        saved = state.get("prompt_keys", {})  # older checkpoints: none, every path kept
        stale = [k for k in self.paths if k in saved and k in (prompt_keys or {}) and saved[k] != prompt_keys[k]]
        for k in stale:
            del self.paths[k]
            self.saturated.pop(k, None)
        self.restored_keys = {k: saved[k] for k in self.paths if k in saved}
        return stale


def pack_paths(paths: dict[str, CachedPath]) -> dict:
    """`paths` as flat tensors: `tokens` (int32) holds path i's ids at [offsets[i], offsets[i+1]); `logprobs`
    (float32, float64 if any path's are) those of the paths with `has_logprobs`, concatenated in the same order;
    `rewards`, `steps`, `correct` one per path; `ids` the prompt ids, a list of strings."""
    values = list(paths.values())
    offsets = numpy.zeros(len(values) + 1, dtype=numpy.int64)
    numpy.cumsum([len(p.ids) for p in values], out=offsets[1:])
    logprobs = [p.logprob_array for p in values if p.logprob_array is not None]
    dtype = numpy.float32 if all(a.dtype == numpy.float32 for a in logprobs) else numpy.float64
    return {"ids": list(paths), "offsets": torch.from_numpy(offsets),
            "tokens": torch.from_numpy(numpy.concatenate([p.ids for p in values] or [numpy.zeros(0, numpy.int32)])),
            "rewards": torch.tensor([p.reward for p in values], dtype=torch.float64),
            "steps": torch.tensor([int(p.step) for p in values], dtype=torch.int64),
            "correct": torch.tensor([bool(p.correct) for p in values], dtype=torch.bool),
            "has_logprobs": torch.tensor([p.logprob_array is not None for p in values], dtype=torch.bool),
            "logprobs": torch.from_numpy(numpy.concatenate([a.astype(dtype) for a in logprobs] or
                                                           [numpy.zeros(0, dtype)]))}


def unpack_paths(packed: dict) -> dict[str, CachedPath]:
    """pack_paths' inverse (on a packed dict check_saved_paths let through); each path's arrays are its own copies,
    not views of the (mapped) checkpoint."""
    tokens, offsets = packed["tokens"].numpy(), packed["offsets"].tolist()
    logprobs = packed["logprobs"].numpy()
    single = logprobs.dtype == numpy.float32
    paths, at = {}, 0
    for n, (key, reward, step, correct, has_logprobs) in enumerate(zip(
            packed["ids"], packed["rewards"].tolist(), packed["steps"].tolist(), packed["correct"].tolist(),
            packed["has_logprobs"].tolist())):
        path = CachedPath.__new__(CachedPath)
        start, end = offsets[n], offsets[n + 1]
        path.ids = tokens[start:end].astype(numpy.int32)  # a copy (astype copies), of whatever integer dtype
        path.reward, path.step, path.correct, path.logprob_array = float(reward), int(step), bool(correct), None
        if has_logprobs:
            values = logprobs[at:at + end - start]
            path.logprob_array = values.copy() if single else logprob_array(values)
            at += end - start
        paths[key] = path
    return paths


def saved_path_ids(state: dict) -> list[str]:
    """The prompt ids of the paths a saved cache holds (either format), for the caller's prompt digests; a
    packed_paths whose `ids` are no list of strings is a ValueError (check_saved_paths checks the rest)."""
    if "packed_paths" not in state:
        return list(state["paths"])
    packed = state["packed_paths"]
    if not isinstance(packed, dict) or not isinstance(packed.get("ids"), list) \
            or not all(isinstance(k, str) for k in packed["ids"]):
        raise ValueError("experience cache: packed_paths holds no list of prompt ids")
    return packed["ids"]


def saved_paths(state: dict) -> dict[str, list]:
    """A saved cache's paths (either format) as the older one held them: prompt id -> [token ids, reward, step,
    correct, logprobs] (lists; the last two missing from the oldest checkpoints): for reading a checkpoint."""
    if "packed_paths" not in state:
        return dict(state["paths"])
    check_saved_paths(state, None)
    return {k: p.entry() for k, p in unpack_paths(state["packed_paths"]).items()}


def check_saved_paths(state: dict, vocab_size: int | None) -> None:
    """What state_dict writes, before any of it is used: a checkpoint file edited or from elsewhere may load
    (weights only) and still hold paths no run saved; their token ids would reach the rollout a step or an
    epoch later, as a traceback there (or an out-of-bounds embedding read on a GPU). Either format."""
    if "packed_paths" in state:
        paths = {}  # checked below, the saturation counts here
        check_packed_paths(state["packed_paths"], vocab_size)
    else:
        paths = state["paths"]
    saturated = state.get("saturated", {})
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


def check_packed_paths(packed, vocab_size: int | None) -> None:
    """check_saved_paths for pack_paths' format: each field there, of its kind and length, the offsets a split of
    the tokens, every token id in [0, vocab_size) (and an int32), at tensor speed."""
    ids = saved_path_ids({"packed_paths": packed})
    if len(set(ids)) != len(ids):
        raise ValueError("experience cache: packed_paths names a prompt id twice")
    kinds = {"offsets": "integer", "tokens": "integer", "steps": "integer", "rewards": "float", "logprobs": "float",
             "correct": "bool", "has_logprobs": "bool"}
    for name, kind in kinds.items():
        value = packed.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or kind != (
                "bool" if value.dtype == torch.bool else "float" if value.dtype.is_floating_point
                else "integer" if not value.dtype.is_complex else "complex"):
            raise ValueError(f"experience cache: packed_paths {name} is not a 1-d tensor of {kind}s")
    for name in ("rewards", "steps", "correct", "has_logprobs"):
        if len(packed[name]) != len(ids):
            raise ValueError(f"experience cache: packed_paths holds {len(ids)} paths and {len(packed[name])} {name}")
    offsets, tokens = packed["offsets"], packed["tokens"]
    if len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"experience cache: packed_paths offsets do not split its {len(tokens)} tokens "
                         f"into {len(ids)} paths")
    lengths = offsets[1:] - offsets[:-1]
    if int(lengths[packed["has_logprobs"]].sum()) != len(packed["logprobs"]):
        raise ValueError("experience cache: packed_paths holds another count of log-probs than its paths' tokens")
    limit = INT32.max + 1 if vocab_size is None else min(vocab_size, INT32.max + 1)
    # two reductions screen them (1e8 ids in well under a second); compared as Python ints, past any int32 wrap
    if len(tokens) and not (int(tokens.min()) >= 0 and int(tokens.max()) < limit):
        wide = tokens.long()
        first = int(((wide < 0) | (wide >= limit)).nonzero()[0, 0])
        key = ids[int(torch.searchsorted(offsets, first, right=True)) - 1]
        raise ValueError(f"experience cache: path {key!r} holds token id {int(tokens[first])!r}, not in the model's "
                         f"vocabulary [0, {limit})")
