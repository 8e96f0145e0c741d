"""The experience cache: per prompt id, the last kept reasoning path (token ids), its reward and step.

RPO (Yi et al., arXiv 2601.19404) regenerates only the tail of this path each step. Where we depart
from the paper's public code (yhz5613813/RPO), and why:
- we store token ids, not decoded text, so the prefix the engine continues is exactly the tokens
  the policy produced (re-tokenizing text can merge tokens differently);
- ties for the best reward are broken at random, and the random pick covers all G completions
  (the code's `argmax` always took the first of equal rewards and its `randint(0, G-1)` never the last);
- `correct-only` keeps the old path unless the chosen completion is correct (reward >= threshold), and
  drops a path not known to be correct (a cold start's, reward NaN) once none of the G answers grown from
  it is correct: for a weak model most first paths are wrong early on, every suffix of a wrong kept prefix
  is wrong too, and the prompt would give zero-advantage groups forever. Dropped, it cold-starts again.
The cache saves to / restores from a plain JSON-able dict, stored inside every checkpoint.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class CachedPath:
    token_ids: list[int]
    reward: float
    step: int


class ExperienceCache:
    def __init__(self, policy: str = "epsilon-greedy", epsilon: float = 0.5, correct_threshold: float = 0.5):
        self.policy, self.epsilon, self.correct_threshold = policy, epsilon, correct_threshold
        self.paths: dict[str, CachedPath] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.paths

    def get(self, prompt_id: str) -> CachedPath | None:
        return self.paths.get(prompt_id)

    def put(self, prompt_id: str, token_ids: list[int], reward: float, step: int) -> None:
        self.paths[prompt_id] = CachedPath(list(token_ids), float(reward), step)

    def choose(self, rewards: list[float], rng: random.Random) -> int | None:
        """Index of the completion to keep for a group, or None to keep the old path."""
        if rng.random() < self.epsilon:
            best = max(rewards)
            index = rng.choice([i for i, r in enumerate(rewards) if r == best])
        else:
            index = rng.randrange(len(rewards))
        if self.policy == "correct-only" and rewards[index] < self.correct_threshold:
            return None
        return index

    def drop_if_refuted(self, prompt_id: str, rewards: list[float]) -> bool:
        """correct-only: drop the path if it was never verified correct (reward NaN or low) and none of the
        G answers grown from it is correct. Returns whether it was dropped."""
        if self.policy != "correct-only" or max(rewards) >= self.correct_threshold:
            return False
        old = self.paths.get(prompt_id)
        if old is None or old.reward >= self.correct_threshold:  # NaN compares False: unverified
            return False
        del self.paths[prompt_id]
        return True

    def update(self, prompt_id: str, answers: list[list[int]], rewards: list[float], step: int,
               rng: random.Random) -> bool:
        """Keep one of a group's whole answers (kept path + suffix). Returns whether the path changed."""
        index = self.choose(rewards, rng)
        return self.apply(prompt_id, index, None if index is None else answers[index], rewards, step)

    def apply(self, prompt_id: str, index: int | None, answer: list[int] | None, rewards: list[float],
              step: int) -> bool:
        """The update once `choose` has picked `index` (None: keep) and its `answer`: a refuted path is
        dropped, else the answer is kept. Split from `update` for callers that choose before they hold
        the answer (under torchrun the answer lives on the rank that generated it)."""
        if self.drop_if_refuted(prompt_id, rewards):
            return True
        if index is None:
            return False
        self.put(prompt_id, answer, rewards[index], step)
        return True

    def state_dict(self) -> dict:
        return {"policy": self.policy, "epsilon": self.epsilon, "correct_threshold": self.correct_threshold,
                "paths": {k: [v.token_ids, v.reward, v.step] for k, v in self.paths.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.policy, self.epsilon = state["policy"], state["epsilon"]
        self.correct_threshold = state["correct_threshold"]
        self.paths = {k: CachedPath(list(ids), float(r), int(s)) for k, (ids, r, s) in state["paths"].items()}
