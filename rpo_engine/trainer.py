"""The training loop: prefixes -> rollout -> rewards -> advantages -> cache update -> policy update -> log.

One step, `Trainer.step()`, reads top to bottom. With RPO on, each prompt's prefix is the prompt plus
its cached reasoning path minus a sampled tail (rpo/), and only the G suffixes are generated; with
RPO off the prefix is the prompt and the same code is full-path GRPO/DAPO. Both roll out with our
RolloutEngine on the live weights of the model being trained, prefilling each prefix once; the update
likewise runs each group's shared prefix once in forward and backward where that costs fewer FLOPs
(model/shared_prefix.py; `--no-prefix-sharing` runs one padded row per sample, the reference it must equal).

Under torchrun each rank rolls out its share of the step's prompts and trains on its own groups;
everything that steers the step (rewards, cache choices, DAPO's filter, loss normalisers, metrics) is
reduced across ranks so that N ranks take the same step as one process (rpo_engine/distributed.py).

Where we depart from the RPO paper's code, see rpo/cache.py, rpo/truncation.py and
rewards/shaping.py; in addition the loss covers the generated suffix tokens only (the code trained
on the cached prefix too, weighted by each sample's advantage; `--rpo-loss-on-prefix` restores it).
"""
from __future__ import annotations

import array
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from rpo_engine.algos.grpo import decoupled_rewards, group_advantages, informative_groups
from rpo_engine.config import (TrainConfig, config_to_dict, overlong_buffer, reward_weights, stop_strings,
                               warmup_length)
from rpo_engine.distributed import Dist, consolidated_optimizer_state, full_tensor, load_consolidated_optimizer_state
from rpo_engine.errors import UserError, refusals_named
from rpo_engine.kernels import policy_loss
from rpo_engine.model.lora import adapters_disabled, lora_settings, save_adapter
from rpo_engine.model.shared_prefix import PrefixGroup, group_logprobs, plan_micro_batches
from rpo_engine.optim import load_adamw_state, lr_multiplier, make_adamw, params_with_gradients
from rpo_engine.rewards.answers import RewardLog, TRLStyleReward, is_correct, score_functions, score_groups
from rpo_engine.rewards.pool import PooledReward
from rpo_engine.rewards.shaping import length_aware_accuracy, overlong_penalty
from rpo_engine.rpo.cache import ExperienceCache, saved_path_ids
from rpo_engine.rpo.truncation import cut_cached_path

EVAL_SALT = 4999  # seed_for's salt of a sampled eval's answers
TOKEN_DIGEST = "ids:"  # marks Trainer.prompt_keys' digests of prompt token ids (a checkpoint's before them: of rows)


@dataclass
class Group:
    """One prompt's G samples: the shared prefix (prompt + kept path) and the generated suffixes."""
    row: dict
    prompt_ids: list[int]
    kept_ids: list[int]  # the cached path's kept part ([] with RPO off)
    suffix_ids: list[list[int]]
    suffix_logprobs: list[list[float]]
    finish_reasons: list[str]
    kept_logprobs: list[float] | None = None  # the kept part's sampling log-probs, when the cache has them
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    # each reward function's scores, unweighted; NaN where a later TRL-style one returned None ("does not apply")
    scores: list[list[float]] = field(default_factory=list)
    terms: list[list[float]] = field(default_factory=list)  # each term of the reward, unweighted (Trainer.reward_terms)
    extra_columns: dict[str, list] = field(default_factory=dict)  # what TRL-style rewards logged (log_extra)

    def answer_ids(self, i: int) -> list[int]:
        return self.kept_ids + self.suffix_ids[i]

    def answer_logprobs(self, i: int) -> list[float] | None:
        """Each answer token's sampling log-prob (None when the kept part's are not known)."""
        return None if self.kept_logprobs is None else self.kept_logprobs + self.suffix_logprobs[i]


class GroupResult(NamedTuple):
    """What every rank learns of each group of a round (gathered from the rank that generated it)."""
    rewards: list[float]
    correct: list[bool]
    suffix_lens: list[int]
    truncated: int  # samples that ran out of budget
    score_sums: list[float]  # each reward function's scores, summed over the samples it applies to
    score_counts: list[int]  # how many samples each function applies to (a TRL-style None does not)
    advantage_rewards: list[float]  # what the advantages are taken from (Trainer.advantage_rewards)
    accuracy: list[float]  # the accuracy function's scores, before shaping (DAPO's filter)
    shaped_accuracy: list[float]  # after length shaping, weighed by nothing else: what RPO's cache keeps the best of


class Trainer:
    def __init__(self, config: TrainConfig, model, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                 reward_fn, device: torch.device, dist: Dist | None = None, reference=None, extra_rewards=()):
        """`reward_fn`: the accuracy (its full marks make a right answer); `extra_rewards`: more reward
        functions, each adding its score to the reward, all weighted by config.reward_weights (1 each by
        default); any may be a rewards.pool.PooledReward (scored in worker processes; `close()` shuts its
        pool down). `reference`: the frozen KL reference when it is not `model` (on resume, the starting model)."""
        self.config, self.tokenizer, self.dist = config, tokenizer, dist or Dist()
        self.train_rows, self.eval_rows, self.reward_fn, self.device = train_rows, eval_rows, reward_fn, device
        self.algo, self.rpo = config.algo, config.rpo
        self.extra_rewards = list(extra_rewards)
        self.warned_partial_scores = False
        self.reward_metrics: dict[str, list[float]] = {}  # log_metric's values this step (score_groups)
        self.reward_weights = reward_weights(config) if config.reward_weights is not None else \
            [1.0] * (1 + len(self.extra_rewards))
        if len(self.reward_weights) != 1 + len(self.extra_rewards):
            raise ValueError(f"{len(self.reward_weights)} reward weights for {1 + len(self.extra_rewards)} functions")
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # model: full weights, read live by the engine (and evaluated, saved); policy: the gradient
        # forward, under torchrun wrapped in DDP or FSDP2 (then `model` is a replica of the shards), or under ddp
        # with bf16 weights left plain: the trainer all-reduces their fp32 masters' gradients itself.
        self.sums_master_gradients = self.dist.sums_master_gradients(model)
        self.model, self.policy = self.dist.wrap(model, config.temperature)
        self.replica_stale = False
        # training prompts by id (the experience cache's key); eval rows by position: the two files' ids may
        # overlap, and reward functions see each row's own id (TRL-style ones read the `id` column)
        # (--filter-overlong-prompts: without the rows whose prompts are too long)
        say = self.dist.is_main
        self.train_rows, train_ids = encode_run_prompts(tokenizer, train_rows, config, self.model,
                                                        config.dataset or "built-in task", say)
        self.eval_rows, self.eval_prompt_ids = encode_run_prompts(tokenizer, eval_rows, config, self.model,
                                                                  config.eval_dataset or "built-in task's eval split", say)
        self.row_index = {row["id"]: i for i, row in enumerate(self.train_rows)}
        self.prompt_ids = TokensById(train_ids, self.row_index)
        self.engine = rollout_engine(self.model, config.gpu_memory_utilization, config.max_num_seqs,
                                     config.enforce_eager, max(train_ids.longest(), self.eval_prompt_ids.longest()),
                                     config.max_completion_length, async_scheduling=config.async_scheduling,
                                     merge_lora=config.lora_merged_rollout, tokenizer=tokenizer)
        self.stop = stop_strings(config.stop)  # --stop, for the rollout and the evals
        # The KL reference: with LoRA the base model itself, its adapters switched off (no second model);
        # else a frozen copy of the initial policy.
        self.lora = lora_settings(self.model) is not None
        self.reference = None
        if self.algo.beta > 0 and not self.lora:
            if reference is not None:  # loaded by each rank (a resume's): rank 0's, as the policy is
                self.dist.broadcast_weights(reference)
            self.reference = (reference or copy.deepcopy(self.model)).eval().requires_grad_(False)
        # bf16 weights (GPU default) are stepped through fp32 masters inside the optimizer (rpo_engine/optim.py),
        # their micro-batches' gradients summed in fp32 there, and under ddp all-reduced in fp32 from there
        # (Dist.sum_gradients); fsdp's shards are fp32, summed and reduced in fp32 by FSDP2 (no masters)
        self.optimizer = make_adamw(self.policy, config.learning_rate, config.weight_decay,
                                    (config.adam_beta1, config.adam_beta2), config.adam_epsilon,
                                    fp32_grad_accumulation=True)
        warmup = warmup_length(config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, config.steps, warmup, config.lr_scheduler_type))
        self.cache = ExperienceCache(self.rpo.rpo_cache_policy, self.rpo.rpo_epsilon)
        self.rng = random.Random(config.seed)  # cuts and cache choices: saved in checkpoints
        # torch's, Python's and numpy's global generators are a run's state too (checkpointed; a stochastic reward
        # reads them): seeded by --seed, as TRL's set_seed does, or each process would start them from the OS
        seed_global_rngs(config.seed)
        self.step_num = 0
        # --entropy-coef, moved by --use-adaptive-entropy after each optimizer step, which also gates the bonus
        # on the entropy the last step measured (inf: none yet, so no bonus on the first); both checkpointed
        self.entropy_coef, self.last_entropy = self.algo.entropy_coef, math.inf
        self.completions: list[dict] = []  # the last step's sampled completions, with --log-completions
        self.rows_drawn = 0  # training rows handed out so far, over all epochs
        self.epoch_orders: dict[int, list[int]] = {}
        self.eos_ids = stop_ids(model, tokenizer)

    # ---- data --------------------------------------------------------------------------------
    def encode_prompt(self, row: dict) -> list[int]:
        return encode_prompt(self.tokenizer, row, prompt_token_limit(self.config, self.model),
                             chat_template_kwargs(self.config), self.config.chat_template)

    def row_at(self, position: int) -> dict:
        """The training row handed out at `position` (counted over all epochs). Each epoch's order is a
        shuffle seeded by (run seed, epoch), so rows can be read ahead without touching any RNG; with
        --no-shuffle-dataset, the file's order."""
        epoch, index = divmod(position, len(self.train_rows))
        if not self.config.shuffle_dataset:
            return self.train_rows[index]
        if epoch not in self.epoch_orders:
            order = list(range(len(self.train_rows)))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            # keep the epoch before (a read-ahead may straddle the boundary), drop older ones
            self.epoch_orders = {e: o for e, o in self.epoch_orders.items() if e >= epoch - 1}
            self.epoch_orders[epoch] = order
        return self.train_rows[self.epoch_orders[epoch][index]]

    def next_rows(self, n: int) -> list[dict]:
        rows = self.peek_rows(n)
        self.rows_drawn += n
        return rows

    def peek_rows(self, n: int) -> list[dict]:
        """The rows the next `next_rows(n)` will return."""
        return [self.row_at(self.rows_drawn + j) for j in range(n)]

    # ---- rollout -----------------------------------------------------------------------------
    def sampling_params(self, n: int, budget: int, seed: int, kept: int = 0):
        """`kept`: the tokens of an RPO kept path at the prompt's end: part of the answer, so --stop reads them."""
        from rpo_engine.rollout import SamplingParams

        c = self.config
        return SamplingParams(n=n, max_new_tokens=budget, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, min_p=c.min_p, repetition_penalty=c.repetition_penalty,
                              stop_token_ids=self.eos_ids, stop=self.stop, stop_prompt_tokens=kept, seed=seed)

    def seed_for(self, row_index: int, salt: int, step: int | None = None) -> int:
        # Sampling seeds derive from (run seed, step, position): resumed runs draw the same samples. Salts: the
        # sampling round (suffixes), 7919 + round (cold starts), EVAL_SALT (a sampled eval).
        step = self.step_num if step is None else step
        return (self.config.seed * 1_000_003 + step * 10_007 + row_index * 101 + salt) % (2**31)

    def generate(self, prompts: list[list[int]], params: list) -> list:
        return self.engine.generate(prompts, params) if prompts else []

    def cold_start_requests(self, rows: list[dict], indices, salt: int, step: int | None = None):
        """One full completion for each of `rows[i]`, i in `indices`: the prompt's first path."""
        prompts = [self.prompt_ids[rows[i]["id"]] for i in indices]
        params = [self.sampling_params(1, self.config.max_completion_length, self.seed_for(i, salt, step))
                  for i in indices]
        return prompts, params

    def cache_cold_paths(self, rows: list[dict], indices, my_indices, outs: list, counters: dict) -> None:
        """Cache the cold-start completions of `rows[i]`, i in `indices`; this rank generated `outs` for
        its `my_indices` of them and counts those. Every rank caches every rank's new paths."""
        my_paths = {i: (out[0].token_ids, out[0].logprobs) for i, out in zip(my_indices, outs)}
        counters["generated"] += sum(len(p) for p, _ in my_paths.values())
        counters["cold_starts"] += len(my_paths)
        paths = {}
        for part in self.dist.gather(my_paths):
            paths.update(part)
        for i in indices:
            token_ids, logprobs = paths[i]
            self.cache.put(rows[i]["id"], token_ids, float("nan"), self.step_num, logprobs=logprobs)

    def rollout(self, rows: list[dict], round_index: int, upcoming: list[dict] = ()) -> tuple[list[Group], dict]:
        """Generate G samples for this rank's share of `rows` (the round's prompts, the same list on
        every rank): suffixes of cached paths (RPO) or full completions. A prompt's seed follows its
        position in `rows`, never the rank, so any rank count draws the same samples.

        RPO: a prompt without a path first gets one full completion (its cold start), which takes a
        decode loop of its own before the suffixes can start. `upcoming`, uncached prompts of the next
        step, have theirs generated here, in the same loop as this round's suffixes; so their path
        comes from weights one update older, as any cached path does."""
        c, G = self.config, self.config.num_generations
        mine = self.dist.share(len(rows))
        counters = {"generated": 0, "cold_starts": 0, "cache_hits": 0, "verified": 0}
        prompts = [self.prompt_ids[row["id"]] for row in rows]
        kept, kept_logprobs = [[] for _ in rows], [None] * len(rows)
        budgets = [c.max_completion_length] * len(rows)
        if self.rpo.rpo:
            uncached = [i for i, row in enumerate(rows) if row["id"] not in self.cache]
            if uncached and self.cold_starts_needed():
                my_cold = [i for i in uncached if i in mine]
                outs = self.generate(*self.cold_start_requests(rows, my_cold, 7919 + round_index))
                self.cache_cold_paths(rows, uncached, my_cold, outs, counters)
            # Every rank draws every cut, in order, so the RNG stays the same on all ranks.
            for i, row in enumerate(rows):
                path = self.cache.get(row["id"])
                if path is None:  # --rpo-unverified-cut full: no path yet, a full-path group (as a wrong one is)
                    continue
                logprobs = path.logprobs  # a list made from the stored array: once
                cut = cut_cached_path(len(path), path.correct, self.rng, c.max_completion_length,
                                      self.rpo, logprobs, self.cache.saturation(row["id"]))
                kept[i], budgets[i] = path.token_ids[:cut.kept], cut.budget
                # a hit: the group grows from a path cached before this round (not a cut that kept none of it,
                # as --rpo-unverified-cut full regrows a wrong one, nor a cold start just made)
                counters["cache_hits"] += bool(kept[i]) and i in mine and i not in uncached
                counters["verified"] += path.correct and i in mine
                if logprobs is not None:
                    kept_logprobs[i] = logprobs[:cut.kept]
        params = [self.sampling_params(G, budgets[i], self.seed_for(i, round_index), len(kept[i])) for i in mine]
        my_upcoming = self.dist.share(len(upcoming))
        ahead_prompts, ahead_params = self.cold_start_requests(upcoming, my_upcoming, 7919, self.step_num + 1)
        outs = self.generate([prompts[i] + kept[i] for i in mine] + ahead_prompts, params + ahead_params)
        outs, ahead = outs[:len(mine)], outs[len(mine):]
        if upcoming:
            self.cache_cold_paths(upcoming, range(len(upcoming)), my_upcoming, ahead, counters)
        groups = []
        for i, out in zip(mine, outs):
            groups.append(Group(rows[i], prompts[i], kept[i], [o.token_ids for o in out], [o.logprobs for o in out],
                                [o.finish_reason for o in out], kept_logprobs=kept_logprobs[i]))
            counters["generated"] += sum(len(o.token_ids) for o in out)
        return groups, counters

    # ---- rewards -----------------------------------------------------------------------------
    def reward_names(self) -> list[str]:
        """A name for each reward function (its own, numbered where two share one)."""
        def name(fn):  # TRL's get_callable_name: a partial's function's, an object's class's
            fn = fn.fn if isinstance(fn, TRLStyleReward) else fn
            while isinstance(fn, functools.partial):
                fn = fn.func
            return getattr(fn, "__name__", type(fn).__name__)

        names = [name(fn) for fn in [self.reward_fn, *self.extra_rewards]]
        return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]

    def score(self, group: Group) -> None:
        self.score_groups([group])

    def score_groups(self, groups: list[Group]) -> None:
        """Each group's rewards (and correct answers, and each reward function's scores). A PooledReward
        scores every group's answers in one call, spread over its pool's workers; a TRL-style function is
        called once for all of them (TRL's once a batch; the async ones awaited together), a reward model on
        all of them in its batches, ours one completion at a time, in this process (score_functions). What
        TRL-style functions log goes to the step's metrics (log_metric) and the groups' completions (log_extra)."""
        answers = [[g.answer_ids(i) for i in range(len(g.suffix_ids))] for g in groups]
        texts = [[self.tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in answers]
        log = RewardLog()
        scores = score_functions([self.reward_fn, *self.extra_rewards], texts, [g.row for g in groups], answers,
                                 trainer_state=self.reward_trainer_state(), log=log)  # [function][group][sample]
        for j, g in enumerate(groups):
            g.extra_columns = log.columns.get(j, {})
            self.shape_rewards(g, [len(ids) for ids in answers[j]], texts[j], [s[j] for s in scores])
        for name, values in log.metrics.items():
            self.reward_metrics.setdefault(name, []).extend(values)

    def reward_kwargs_taken(self, keyword: str) -> bool:
        """Whether a reward function takes TRL's `keyword` (trainer_state, log_metric, log_extra): the same on
        every rank, so what depends on it may be a collective."""
        return any(isinstance(fn, TRLStyleReward) and keyword in fn.trainer_kwargs
                   for fn in [self.reward_fn, *self.extra_rewards])

    def reward_trainer_state(self):
        """What a TRL-style reward function gets as `trainer_state`: transformers' TrainerState as TRL's
        GRPOTrainer has it while it scores a step, global_step the optimizer steps done before this one; None
        (not built) where no reward function takes it."""
        if not self.reward_kwargs_taken("trainer_state"):
            return None
        from transformers import TrainerState

        c = self.config
        return TrainerState(global_step=self.step_num, max_steps=c.steps,
                            epoch=self.step_num * c.prompts_per_step / len(self.train_rows),
                            num_train_epochs=math.ceil(c.steps * c.prompts_per_step / len(self.train_rows)),
                            logging_steps=1, eval_steps=c.eval_steps, save_steps=c.save_steps,
                            train_batch_size=len(self.dist.share(c.prompts_per_step)) * c.num_generations,  # a rank's
                            is_local_process_zero=self.dist.local_rank == 0, is_world_process_zero=self.dist.is_main)

    def logged_reward_metrics(self, logged: dict[str, list[float]], metrics: dict, prefix: str = "") -> dict:
        """`metrics` with the mean of each metric that reward functions logged (every rank's values), under its
        own name (TRL's) after `prefix`; a name the trainer logs itself is an error, not a silent overwrite."""
        if not self.reward_kwargs_taken("log_metric"):
            return metrics
        means = RewardLog.metric_means(self.dist.gather(logged), prefix)
        # an eval_ name from a step would be overwritten by an eval's metrics at an eval step
        taken = sorted(set(means) & set(metrics) | {name for name in means if not prefix and name.startswith("eval_")})
        if taken:
            raise UserError(f"a reward function logged the metric {taken[0]!r} (log_metric), a name the trainer "
                            f"logs itself (or an eval's, eval_*): give it another name")
        return {**metrics, **means}

    def shape_rewards(self, group: Group, lengths: list[int], texts: list[str], scores: list[list[float]]) -> None:
        """The group's rewards from each reward function's `scores` (the accuracy's first): the accuracy,
        length-shaped among the right answers, plus each other function's weighted score, the format bonus and
        DAPO's overlong penalty."""
        c = self.config
        accuracy = scores[0]
        group.correct = [is_correct(a) for a in accuracy]
        if self.rpo.length_shaping:
            partial = next((a for a in accuracy if a not in (0.0, 1.0)), None)
            if partial is not None and not self.warned_partial_scores:
                self.warned_partial_scores = True
                warnings.warn(f"the first reward ({self.reward_names()[0]}) gave a score other than 0 or 1 ({partial:g}); "
                              f"length shaping (on by default) counts a score of 1 or more as right and any other as 0: "
                              f"pass --no-length-shaping to train on its scores as they are", stacklevel=2)
            rewards = length_aware_accuracy(group.correct, lengths, self.rpo.length_alpha)
        else:
            rewards = accuracy
        weight, *extra_weights = self.reward_weights
        # a later function's None (NaN) adds 0, as TRL's nansum over the functions
        extras = [[0.0 if math.isnan(x) else x for x in extra] for extra in scores[1:]]
        rewards, group.scores, group.terms = [weight * r for r in rewards], list(scores), [rewards, *extras]
        for extra, w in zip(extras, extra_weights):
            rewards = [r + w * x for r, x in zip(rewards, extra)]
        if c.format_reward_weight:
            from rpo_engine.rewards import format_reward

            group.terms.append([format_reward(t) for t in texts])
            rewards = [r + c.format_reward_weight * f for r, f in zip(rewards, group.terms[-1])]
        buffer = self.overlong_buffer()
        if buffer:
            group.terms.append([overlong_penalty(n, c.max_completion_length, buffer, self.algo.overlong_penalty)
                                for n in lengths])
            rewards = [r + p for r, p in zip(rewards, group.terms[-1])]
        group.rewards = rewards

    def advantage_rewards(self, group: Group) -> list[float]:
        """What the group's advantages are taken from: its rewards, or under GDPO (--multi-objective-aggregation
        normalize_then_sum) its terms normalized within the group and summed."""
        if self.algo.multi_objective_aggregation == "sum_then_normalize":
            return group.rewards
        parts = torch.tensor(group.terms, dtype=torch.float64).T[None]  # [1, G, terms]
        return decoupled_rewards(parts, torch.tensor(self.reward_terms(), dtype=torch.float64))[0].tolist()

    def overlong_buffer(self) -> int:
        return overlong_buffer(self.algo, self.config.max_completion_length)

    def reward_terms(self) -> list[float]:
        """The weight of each term of the reward, in Group.terms' order: the (length-shaped) accuracy, each
        other --reward function, the format bonus (with --format-reward-weight), DAPO's overlong penalty (with
        a buffer). The reward is their weighted sum; GDPO normalizes each term before the sum."""
        return [*self.reward_weights, *([self.config.format_reward_weight] if self.config.format_reward_weight else []),
                *([1.0] if self.overlong_buffer() else [])]

    def update_cache(self, rows: list[dict], groups: list[Group], rewards: list[list[float]],
                     correct: list[list[bool]]) -> None:
        """Keep one answer per group of the round (rows, rewards, correct: every rank's; groups: this rank's).
        Every rank draws every group's choice from the same RNG, in order; each group's rank sends the
        chosen answer, so every rank ends with the whole cache."""
        picks = [self.cache.choose(r, self.rng) for r in rewards]
        chosen = [(g.answer_ids(picks[i]), g.answer_logprobs(picks[i]))
                  for i, g in zip(self.dist.share(len(rows)), groups)]
        answers = [a for part in self.dist.gather(chosen) for a in part]
        for row, pick, (answer, logprobs), r, right in zip(rows, picks, answers, rewards, correct):
            self.cache.apply(row["id"], answer, r[pick], self.step_num, right[pick], logprobs)
            self.cache.note_group(row["id"], all(right))

    # ---- update ------------------------------------------------------------------------------
    def training_batch(self, groups: list[Group]) -> list[PrefixGroup]:
        """One entry per group: the shared prefix, the suffixes, the loss start, advantages, rollout log-probs."""
        mask_truncated = self.algo.mask_truncated_completions
        return [PrefixGroup(g.prompt_ids + g.kept_ids, g.suffix_ids,
                            len(g.prompt_ids) + (0 if self.rpo.rpo_loss_on_prefix else len(g.kept_ids)),
                            advantages=g.advantages, rollout_logp=g.suffix_logprobs,
                            trained=[r != "length" for r in g.finish_reasons] if mask_truncated else None)
                for g in groups]

    def sequence_logprobs(self, model, batch: list[PrefixGroup], shared: bool, with_entropy: bool = False):
        """Per-token log p of each sample's tokens from loss_start on: logp [b, span], mask [b, span] (and the
        entropy [b, span] with_entropy)."""
        return group_logprobs(model, batch, self.config.temperature, shared=shared, with_entropy=with_entropy)

    @staticmethod
    def loss_mask(batch: list[PrefixGroup], mask: torch.Tensor) -> torch.Tensor:
        """The forward's mask [b, span] less the samples --mask-truncated-completions leaves out."""
        if all(g.trained is None for g in batch):
            return mask
        trained = [g.is_trained(i) for g in batch for i in range(len(g.suffix_ids))]
        return mask & torch.tensor(trained, device=mask.device)[:, None]

    def entropy_threshold(self, batches, entropies: list[torch.Tensor]) -> float:
        """--top-entropy-quantile: the (1 - quantile) quantile of the entropies of every rank's trained tokens
        of samples with a nonzero advantage (the others carry no policy gradient, so they neither count
        here nor change with the zero-advantage skip or the micro-batching); inf if there are none."""
        own = []
        for (batch, _), entropy in zip(batches, entropies):  # entropy [b, span]: NaN outside the loss mask
            moving = torch.tensor([a != 0 for g in batch for a in g.advantages], device=entropy.device)
            own += entropy[moving[:, None] & ~entropy.isnan()].tolist()
        values = torch.tensor([x for part in self.dist.gather(own) for x in part], dtype=torch.float64)
        if not values.numel():
            return math.inf
        return float(torch.quantile(values, 1.0 - self.algo.top_entropy_quantile))

    def reference_logprobs(self, batch: list[PrefixGroup], shared: bool) -> torch.Tensor:
        """The KL reference's logp [b, span]: the base model (adapters off) under LoRA, else the frozen copy."""
        if self.lora:
            with adapters_disabled(self.model):
                return self.sequence_logprobs(self.model, batch, shared)[0]
        return self.sequence_logprobs(self.reference, batch, shared)[0]

    @staticmethod
    def rollout_logp_layout(batch: list[PrefixGroup], like: torch.Tensor) -> torch.Tensor:
        """[b, span] laid out as the training log-probs: each sample's rollout log-probs at its generated
        suffix tokens, NaN elsewhere (a kept prefix, padding)."""
        rollout = torch.full_like(like, float("nan"))
        b = 0
        for g in batch:
            for i, suffix in enumerate(g.suffix_ids):
                n, span = len(suffix), g.span(i)
                if n:
                    rollout[b, span - n:span] = torch.tensor(g.rollout_logp[i], device=like.device)
                b += 1
        return rollout

    def importance_weights(self, batch: list[PrefixGroup], old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """--importance-sampling-correction: [b, span] weights p_train / p_rollout of the loss tokens, per token
        or per sequence (the product), truncated or masked at the cap and at the floor if one is given (TRL's
        modes). old_logp: the training forward's log-probs under the rollout's weights. Tokens without a
        rollout log-prob (a kept prefix trained with --rpo-loss-on-prefix) count as ratio 1."""
        algo = self.algo
        rollout = self.rollout_logp_layout(batch, old_logp)  # [b, span]
        diff = torch.nan_to_num(old_logp - rollout, nan=0.0) * mask  # [b, span]
        if algo.importance_sampling_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)  # [b, 1]
        ratio = diff.exp()
        cap, floor = algo.importance_sampling_clip_max, algo.importance_sampling_clip_min  # floor None: none
        ratio = ratio.clamp(min=floor, max=cap) if algo.importance_sampling_mode.endswith("truncate") else \
            ratio.masked_fill((ratio > cap) | (ratio < (-math.inf if floor is None else floor)), 0.0)
        return ratio.expand_as(old_logp)

    def surrogate_weights(self, batch: list[PrefixGroup], logp: torch.Tensor, mask: torch.Tensor,
                          advantages: torch.Tensor, is_weights: torch.Tensor | None, keep: torch.Tensor | None):
        """The policy-gradient term's weights [b, span] (None: all ones; never the KL's): the importance-sampling
        weights (not under --loss-type vespo, which folds them into its sequence weight: vespo_log_is), times
        the tokens --top-entropy-quantile keeps (`keep`), times the samples --off-policy-mask-threshold keeps.
        Also which samples that mask dropped ([b] bool, or None)."""
        weights = None if self.algo.surrogate == "vespo" else is_weights
        if keep is not None:
            weights = keep.float() * (1.0 if weights is None else weights)
        dropped = None
        if self.algo.off_policy_mask_threshold is not None:
            kept_rows = self.off_policy_mask(batch, logp.detach(), mask, advantages)  # [b, 1]
            dropped = kept_rows[:, 0] == 0
            weights = kept_rows.expand_as(logp) if weights is None else kept_rows * weights
        return weights, dropped

    def vespo_log_is(self, is_weights: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
        """--loss-type vespo with --importance-sampling-correction: each sample's log importance ratio [b],
        which VESPO adds to its sequence log-ratio (TRL's fold: the log of each truncated or masked ratio,
        clamped to [log 1e-8, 20], summed over the tokens; a sequence mode's one ratio counted once)."""
        if self.algo.surrogate != "vespo" or is_weights is None:
            return None
        logs = torch.clamp(torch.log(is_weights), math.log(1e-8), 20.0)  # [b, span]
        if self.algo.importance_sampling_mode.startswith("sequence"):
            # the row's ratio, laid over its tokens; a micro-batch without a scored token (a group of empty
            # suffixes) has no column to read it from: its rows' ratio is 1
            return logs[:, :1].sum(-1)
        return (logs * mask).sum(-1)

    def off_policy_mask(self, batch: list[PrefixGroup], logp: torch.Tensor, mask: torch.Tensor,
                        advantages: torch.Tensor) -> torch.Tensor:
        """--off-policy-mask-threshold (DeepSeek-V3.2's sequence masking, TRL's rule): [b, 1], 0 for a sample
        with a negative advantage whose mean log p_rollout - log p_current over its loss tokens is above the
        threshold, else 1. Tokens without a rollout log-prob (a kept prefix trained with
        --rpo-loss-on-prefix) count as 0; logp is the current forward's, detached."""
        rollout = self.rollout_logp_layout(batch, logp)  # [b, span]
        drift = torch.nan_to_num(rollout - logp, nan=0.0) * mask  # [b, span]
        mean_drift = drift.sum(-1) / mask.sum(-1).clamp(min=1)  # [b]
        keep = (advantages >= 0) | (mean_drift <= self.algo.off_policy_mask_threshold)
        return keep.to(logp.dtype)[:, None]

    def rollout_mismatch(self, batch: list[PrefixGroup], logp: torch.Tensor) -> tuple[float, int]:
        """(sum of |rollout log-prob - training log-prob| over the generated tokens, how many there are): summed
        over micro-batches and ranks, a mean over tokens (verl's rollout_probs_diff_mean), so a long sample counts
        by its length."""
        rollout = self.rollout_logp_layout(batch, logp)  # [b, span]
        generated = ~rollout.isnan()
        return float(torch.where(generated, logp - rollout, 0.0).abs().sum()), int(generated.sum())

    def plan_update(self, batch_groups: list[PrefixGroup], positions: list[int], skip_zero_advantage: bool):
        """-> (micro-batches, normalisers, M). Micro-batches: (groups, shared layout?, mini-batch, real?) in run
        order, each mini-batch's own, then the zero-weight padding that gives every rank as many as the
        busiest (DDP and FSDP2 communicate in every forward/backward; a rank with no group still joins).
        At least one runs per mini-batch, so every parameter gets a (zero) gradient and AdamW's step, which
        moves the weights by its running moments even at zero gradient, is the one the full batch would
        have taken. Normalisers: each mini-batch's tokens and rows over all its groups and ranks, so
        skipping, micro-batching and ranks give the same loss as one big batch."""
        algo = self.algo
        M = 1
        if algo.ppo_mini_batch_size:  # every rank's groups count (a collective only when mini-batches are asked for)
            M = max(1, -(-int(self.dist.sum([len(batch_groups)])[0]) // algo.ppo_mini_batch_size))
        minis = [[g for g, p in zip(batch_groups, positions) if p % M == j] for j in range(M)]
        counts = []
        for mini in minis:
            spans = [g.span(i) for g in mini for i in range(len(g.suffix_ids)) if g.is_trained(i)]
            counts += [sum(spans), sum(1 for n in spans if n)]
        counts = self.dist.sum(counts)
        if skip_zero_advantage and algo.beta == 0 and not algo.entropy_bonus:  # then the gradient is 0
            minis = [[g for g in mini if any(g.advantages)] for mini in minis]
        # (micro-batch, shared layout?) pairs: a group's prefix runs once where that costs fewer FLOPs
        plans = [plan_micro_batches(mini, self.model.config, self.config.micro_batch_tokens, self.config.prefix_sharing)
                 for mini in minis]
        sizes = [max(1, int(n)) for n in self.dist.max([len(plan) for plan in plans])]
        batches = []
        for j, plan in enumerate(plans):
            batches += [(batch, shared, j, True) for batch, shared in plan]
            batches += [([self.padding_group()], True, j, False)] * (sizes[j] - len(plan))
        return batches, counts, M

    def update(self, groups: list[Group], skip_zero_advantage: bool = True, positions: list[int] | None = None) -> dict:
        """num_iterations passes over the batch (this rank's groups, maybe none). The batch is split into
        mini-batches of --ppo-mini-batch-size groups (one by default), by each group's position in the
        whole step's batch (`positions`, every rank's groups counted; default: 0, 1, ...): group i goes to
        mini-batch i mod M, so the split is the same on any number of ranks. Each mini-batch is one
        optimizer step; after the first, the ratio is taken against the log-probs the rollout's weights gave.
        Without a KL term a group whose advantages are all zero (its rewards were equal) has a zero
        gradient, so `skip_zero_advantage` leaves it out of the forward and backward; it still counts in
        the loss normalisers, so the step is the one the whole mini-batch gives. The policy's entropy and
        `logprob_mismatch` are then measured over the groups that were run. --entropy-coef subtracts the
        coefficient times the mean entropy of the mini-batch's trained tokens (every rank's, those
        --top-entropy-quantile keeps) from each optimizer step's loss."""
        algo = self.algo
        positions = list(range(len(groups))) if positions is None else positions
        batches, counts, M = self.plan_update(self.training_batch(groups), positions, skip_zero_advantage)
        num_real = sum(1 for b in batches if b[3])
        # The loss is already normalised globally: DDP and FSDP2 average gradients over ranks, so each rank's is
        # scaled by their number; Dist.sum_gradients (ddp, bf16 weights) sums them, unscaled.
        grad_scale = 1 if self.sums_master_gradients else self.dist.world_size
        ddp_reducer = self.dist.parallel == "ddp" and not self.sums_master_gradients
        # Old log-probs need a no-grad pass only when the weights move before a micro-batch runs (several
        # optimizer steps); with one they are the gradient pass's own values, detached.
        moves = algo.num_iterations > 1 or M > 1
        old, ref, mismatch = [None] * len(batches), [None] * len(batches), [0.0, 0]
        # --top-entropy-quantile: which tokens the surrogate keeps, from every micro-batch's entropies at once
        select = algo.top_entropy_quantile < 1
        keep, entropies = [None] * len(batches), []
        # the logged entropy is the policy's before the update: a later mini-batch's forward runs on weights already
        # stepped, so with several its entropy comes from this pass, as its old log-probs do
        entropy_before = [None] * len(batches)
        if moves or algo.beta > 0 or select:
            with torch.no_grad():  # self.model holds the weights the rollout used
                for k, (batch, shared, _, _) in enumerate(batches):
                    if moves or select:
                        logp, mask, *entropy = self.sequence_logprobs(self.model, batch, shared,
                                                                      with_entropy=select or M > 1)
                        old[k] = logp if moves else None
                        entropy_before[k] = entropy[0] if M > 1 else None
                        if select:
                            entropies.append(entropy[0].masked_fill(~self.loss_mask(batch, mask), math.nan))
                    if algo.beta > 0:
                        ref[k] = self.reference_logprobs(batch, shared)
        if select:
            threshold = self.entropy_threshold([(b[0], b[1]) for b in batches if b[3]],
                                               [e for b, e in zip(batches, entropies) if b[3]])
            keep = [at_or_above(entropy, threshold) for entropy in entropies]  # NaN (outside the loss): False
        bonus = algo.entropy_bonus
        bonus_tokens = [counts[2 * j] for j in range(M)]  # the tokens each mini-batch's entropy is averaged over
        if bonus and select:
            bonus_tokens = [0] * M
            for k, (_, _, j, real) in enumerate(batches):
                bonus_tokens[j] += int(keep[k].sum()) if real else 0
            bonus_tokens = self.dist.sum(bonus_tokens)
        stats = {"loss": 0.0, "clip_frac": 0.0, "clip_low_frac": 0.0, "clip_high_frac": 0.0, "kl": 0.0}
        is_weights, is_sum, is_count, is_min, is_max = [None] * len(batches), 0.0, 0, math.inf, -math.inf
        grad_norms, skipped, num_steps = [], 0, algo.num_iterations * M
        entropy_sum, entropy_tokens = 0.0, 0  # the policy's entropy over the loss tokens, before the update
        policy_loss_total = 0.0  # the loss less the entropy bonus (logged when there is one)
        opsm = [0, 0]  # --off-policy-mask-threshold: samples masked, samples seen (every optimizer step)
        for iteration in range(algo.num_iterations):
            for j in range(M):
                self.optimizer.zero_grad(set_to_none=True)
                step_loss, num_tokens, num_rows = 0.0, counts[2 * j], counts[2 * j + 1]
                step_policy_loss, window = 0.0, [0.0, 0]  # the bonus's entropy over this step's tokens: sum, count
                coef = self.bonus_coef()
                members = [k for k, b in enumerate(batches) if b[2] == j]
                for k in members:
                    (batch, shared, _, real), old_logp, ref_logp = batches[k], old[k], ref[k]
                    # DDP: gradients are all-reduced once, in the mini-batch's last backward
                    last = k == members[-1] or not ddp_reducer
                    with contextlib.nullcontext() if last else self.policy.no_sync():
                        logp, mask, *entropy = self.policy(batch, shared, iteration == 0 or bonus)
                        mask = self.loss_mask(batch, mask)  # --mask-truncated-completions
                        if iteration == 0 and real:  # the weights the rollout used (the mini-batch's first step)
                            # a later mini-batch's forward runs on weights already stepped: its old_logp was taken
                            # before the update, on the rollout's weights
                            gap, tokens = self.rollout_mismatch(batch, logp.detach() if old_logp is None else old_logp)
                            mismatch = [mismatch[0] + gap, mismatch[1] + tokens]
                            before = entropy[0].detach() if entropy_before[k] is None else entropy_before[k]
                            entropy_sum += float((before * mask).sum())
                            entropy_tokens += int(mask.sum())
                        if old_logp is None:
                            old_logp = logp.detach()  # one step: the weights have not moved since the rollout
                        if algo.importance_sampling_correction and iteration == 0:
                            is_weights[k] = self.importance_weights(batch, old_logp, mask)
                            if real and mask.any():
                                values = is_weights[k][mask]
                                is_sum, is_count = is_sum + float(values.sum()), is_count + values.numel()
                                is_min, is_max = min(is_min, float(values.min())), max(is_max, float(values.max()))
                        adv = torch.tensor([a for g in batch for a in g.advantages], device=self.device)
                        surrogate_weights, masked = self.surrogate_weights(batch, logp, mask, adv, is_weights[k],
                                                                           keep[k])
                        if masked is not None and real:  # --off-policy-mask-threshold's count
                            trained_rows = mask.any(-1)
                            opsm = [opsm[0] + int(masked[trained_rows].sum()), opsm[1] + int(trained_rows.sum())]
                        loss, st = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, eps_low=algo.epsilon,
                                               eps_high=algo.loss_eps_high, kl_coef=algo.beta,
                                               loss_agg=algo.loss_agg, norm_length=self.config.max_completion_length,
                                               is_weights=surrogate_weights, delta=algo.delta,
                                               ratio_level=algo.importance_sampling_level, surrogate=algo.surrogate,
                                               sapo_temperatures=(algo.sapo_temperature_pos, algo.sapo_temperature_neg),
                                               kl_ratio_weighted=algo.use_bias_correction_kl, kl_type=algo.kl_loss_type,
                                               vespo_params=(algo.vespo_k_pos, algo.vespo_lambda_pos,
                                                             algo.vespo_k_neg, algo.vespo_lambda_neg),
                                               vespo_log_is=self.vespo_log_is(is_weights[k], mask))
                        # the statistics below are token means over the step whatever the loss's aggregation: a
                        # row share would weigh each micro-batch's token mean by how the groups happened to be packed
                        token_share = int(mask.sum()) / max(1, num_tokens) if real else 0.0
                        if not real or algo.loss_agg == "token-mean":
                            share = token_share
                        else:
                            share = int(mask.any(-1).sum()) / max(1, num_rows)
                        objective = loss * share
                        if bonus and real:  # the mean entropy over the mini-batch's (kept) trained tokens
                            tokens = mask if keep[k] is None else mask & keep[k]
                            entropy_in = (entropy[0] * tokens).sum()
                            window = [window[0] + float(entropy_in.detach()), window[1] + int(tokens.sum())]
                            objective = objective - coef * entropy_in / max(1, bonus_tokens[j])
                        (objective * grad_scale).backward()
                    step_loss += objective.item()
                    step_policy_loss += loss.item() * share
                    weight = token_share / num_steps
                    stats["clip_frac"] += st["clip_frac"].item() * weight
                    stats["clip_low_frac"] += st["clip_low_frac"].item() * weight
                    stats["clip_high_frac"] += st["clip_high_frac"].item() * weight
                    stats["kl"] += st["kl_mean"].item() * weight
                if self.sums_master_gradients:  # every rank's, in fp32, before the norm and the step read them
                    self.dist.sum_gradients(params_with_gradients(self.optimizer))
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params_with_gradients(self.optimizer),
                                                                       self.config.max_grad_norm or math.inf))
                step_loss, step_policy_loss = self.dist.sum([step_loss, step_policy_loss])  # every rank skips, or none
                if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
                    # step_num counts the steps done: this one is logged (metrics.jsonl, the bar) as step_num + 1
                    warnings.warn(f"step {self.step_num + 1}: non-finite loss or gradient; update skipped")
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                if algo.use_adaptive_entropy:  # a skipped step leaves the coefficient where it was
                    self.adapt_entropy_coef(*self.dist.sum(window))
                self.optimizer.step()
                self.replica_stale = True
                grad_norms.append(grad_norm.item())
                stats["loss"] += step_loss
                policy_loss_total += step_policy_loss
        # means over the optimizer steps taken, as grad_norm's: a skipped (non-finite) step has no loss to count, and
        # with none taken nothing was measured (None, as a DAPO step without groups logs)
        taken = len(grad_norms)
        stats["loss"] = stats["loss"] / taken if taken else None
        policy_loss_total = policy_loss_total / taken if taken else None
        stats["grad_norm"] = sum(grad_norms) / taken if taken else None
        if bonus:  # TRL's names: the surrogate (and KL) part of the loss; the coefficient after this update
            stats["policy_loss"], stats["entropy_coef"] = policy_loss_total, self.entropy_coef
        stats["skipped_updates"] = skipped
        shared_groups = len({id(g.prefix_ids) for batch, shared, _, real in batches if real and shared for g in batch})
        keys = ("clip_frac", "clip_low_frac", "clip_high_frac", "kl")
        totals = self.dist.sum([stats[k] for k in keys] + [*mismatch, num_real, shared_groups,
                                                           entropy_sum, entropy_tokens])
        stats.update(zip(keys, totals[:4]))
        stats["logprob_mismatch"] = totals[4] / totals[5] if totals[5] else None
        stats["entropy"] = totals[8] / totals[9] if totals[9] else None  # None (both): no group was run
        stats["num_micro_batches"], stats["prefix_shared_groups"] = int(totals[6]), int(totals[7])
        if select:  # the entropy a kept token has at least
            stats["entropy_threshold"] = threshold if math.isfinite(threshold) else None
        if algo.off_policy_mask_threshold is not None:  # the share of trained samples it masked, over the passes
            masked, seen = self.dist.sum(opsm)
            stats["off_policy_masked_frac"] = masked / seen if seen else None
        if algo.importance_sampling_correction:  # TRL's names
            is_sum, is_count = self.dist.sum([is_sum, is_count])
            neg_min, is_max = self.dist.max([-is_min, is_max])
            stats["sampling/importance_sampling_ratio/mean"] = is_sum / is_count if is_count else None
            stats["sampling/importance_sampling_ratio/min"] = -neg_min if is_count else None
            stats["sampling/importance_sampling_ratio/max"] = is_max if is_count else None
        return stats

    def bonus_coef(self) -> float:
        """The entropy bonus's coefficient for the next optimizer step: --entropy-coef, or under
        --use-adaptive-entropy its adapted value, applied only while the last step's entropy was at most the target
        (TRL's gate; before any step, inf: off)."""
        if self.algo.use_adaptive_entropy and not self.last_entropy <= self.algo.entropy_target:
            return 0.0
        return self.entropy_coef

    def adapt_entropy_coef(self, entropy_sum: float, tokens: int) -> None:
        """--use-adaptive-entropy (Skywork-OR1, TRL's rule): after an optimizer step, the coefficient moves by
        --entropy-coef-delta toward more bonus if the entropy its tokens had is at or below --entropy-target,
        toward less otherwise; that entropy also decides whether the next step applies the bonus."""
        if not tokens or not math.isfinite(entropy_sum):
            return
        algo = self.algo
        self.last_entropy = entropy_sum / tokens
        if self.last_entropy <= algo.entropy_target:
            self.entropy_coef = min(self.entropy_coef + algo.entropy_coef_delta, algo.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - algo.entropy_coef_delta, algo.entropy_coef_min)

    def padding_group(self) -> PrefixGroup:
        """A one-token group for a rank with fewer micro-batches than another; its loss weight is 0."""
        return PrefixGroup([self.eos_ids[0]], [[self.eos_ids[0]]], 1, advantages=[0.0], rollout_logp=[[0.0]])

    def cold_starts_needed(self) -> bool:
        """RPO gives an uncached prompt one full completion to cut, unless a path not known to be right is
        regrown whole anyway (--rpo-unverified-cut full): then its first group is a full-path one."""
        return self.rpo.rpo and self.rpo.rpo_unverified_cut != "full"

    def upcoming_cold_rows(self, rows: list[dict]) -> list[dict]:
        """RPO: the next step's prompts that will need a cold start (not cached, not among `rows`), to
        generate their paths alongside this step's suffixes. The last step reads ahead too, so a run
        resumed with more steps finds its next prompts' paths ready, as they would have been (its
        learning-rate schedule, which spans --steps, changes all the same). (DAPO's extra sampling
        rounds may draw other prompts next step; those paths wait in the cache for their turn.)"""
        if not self.cold_starts_needed():
            return []
        now = {row["id"] for row in rows}
        ahead = {row["id"]: row for row in self.peek_rows(self.config.prompts_per_step)
                 if row["id"] not in self.cache and row["id"] not in now}
        return list(ahead.values())

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> dict:
        c, algo = self.config, self.algo
        start = time.perf_counter()
        self.sync_rollout_weights()
        before = self.engine_counters()
        # 1. rollout (DAPO: keep sampling until the batch has enough groups with signal: accuracy scores not all equal,
        # or with --dynamic-sampling-metric reward the advantages' rewards).
        # Ranks roll out their share of each round's rows; `kept` counts every rank's kept groups,
        # `kept_groups` are this rank's (the round asks for at most what is missing, so never too many).
        kept_groups, kept_positions, kept = [], [], []
        totals = {"generated": 0, "cold_starts": 0, "cache_hits": 0, "verified": 0}
        completions = []  # --log-completions: this rank's groups of each round (gathered once advantages are set)
        self.reward_metrics = {}  # what reward functions logged through log_metric this step, by name
        sampled = []  # every group's GroupResult, every round's (DAPO's dropped groups too): the rollout's statistics
        for round_index in range(1 + (algo.max_resample_rounds if algo.dynamic_sampling else 0)):
            rows = self.next_rows(c.prompts_per_step - len(kept))
            upcoming = self.upcoming_cold_rows(rows) if round_index == 0 else []
            groups, counters = self.rollout(rows, round_index, upcoming)
            for key in counters:
                totals[key] += counters[key]
            # 2. rewards; every rank sees every group's (rewards, correct, suffix lengths)
            self.score_groups(groups)
            results = [r for part in self.dist.gather([
                GroupResult(g.rewards, g.correct, [len(s) for s in g.suffix_ids], g.finish_reasons.count("length"),
                            [sum(v for v in x if not math.isnan(v)) for x in g.scores],
                            [sum(not math.isnan(v) for v in x) for x in g.scores],
                            self.advantage_rewards(g), g.scores[0], g.terms[0])
                for g in groups]) for r in part]
            sampled += results
            # 3. cache update (every group, kept or not)
            if self.rpo.rpo:  # the best by accuracy (length-shaped), as the paper's code: never a wrong answer that
                # a format bonus or the overlong penalty ranked above a right one
                self.update_cache(rows, groups, [r.shaped_accuracy for r in results], [r.correct for r in results])
            informative = [True] * len(results)
            if algo.dynamic_sampling:  # DAPO: a group is kept when its accuracy scores (or, by the metric, rewards) differ
                signal = [r.accuracy if algo.dynamic_sampling_metric == "acc" else r.advantage_rewards
                          for r in results]
                informative = informative_groups(torch.tensor(signal, dtype=torch.float64)).tolist()
            mine = self.dist.share(len(rows))
            kept_groups += [g for g, keep in zip(groups, informative[mine.start:mine.stop]) if keep]
            # each of this rank's kept groups' place among every rank's (the update's mini-batches follow it)
            kept_positions += [len(kept) + sum(informative[:i]) for i in mine if informative[i]]
            kept += [r for r, keep in zip(results, informative) if keep]
            if c.log_completions:
                completions.append(groups)
            if len(kept) >= c.prompts_per_step:
                break
        rollout_time = time.perf_counter() - start
        # 4. advantages
        if kept_groups:
            scale = "batch" if algo.multi_objective_aggregation == "normalize_then_sum" else algo.scale_rewards
            # this rank's kept groups are kept[p] for p in kept_positions: their advantage rewards, already computed.
            # In fp64, as the rewards came: float32 would merge 1e8 and 1e8 + 1 (no advantage) and make 1e39 inf (NaN)
            own = torch.tensor([kept[p].advantage_rewards for p in kept_positions], dtype=torch.float64)
            batch_rewards = torch.tensor([x for r in kept for x in r.advantage_rewards], dtype=torch.float64)  # every rank's
            adv = group_advantages(own, scale, batch_rewards)
            for g, a in zip(kept_groups, adv.tolist()):
                g.advantages = a
        # 5. policy update over the generated suffix tokens
        if c.enable_sleep_mode:  # the K/V cache's memory is the update's until the next rollout
            self.engine.sleep()
        update_start = time.perf_counter()
        if kept:  # every rank updates, or none (a rank with no kept group joins with a zero-weight pass)
            stats = self.update(kept_groups, positions=kept_positions)
        else:  # DAPO found no group with signal within its resampling bound: nothing to learn
            # no token was trained, so nothing an update measures was: None (a gap in TensorBoard and W&B), not 0
            stats = dict.fromkeys(("loss", "clip_frac", "clip_low_frac", "clip_high_frac", "kl", "grad_norm",
                                   "entropy", "logprob_mismatch"))
            stats["num_micro_batches"] = stats["prefix_shared_groups"] = 0  # counts, as an update's are
            stats["skipped_updates"] = algo.num_iterations
            if algo.entropy_bonus:
                stats["policy_loss"], stats["entropy_coef"] = None, self.entropy_coef
        lr = self.scheduler.get_last_lr()[0]  # the rate this step trained at (the schedule moves on below)
        with warnings.catch_warnings():  # a step without an optimizer step (DAPO found no signal) still moves the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.step_num += 1
        if algo.sync_ref_model and self.step_num % algo.ref_model_sync_steps == 0:
            self.sync_reference()
        if c.log_completions:  # after the advantages are set; a rank's share of a round is a run of its rows
            self.completions = [r for groups in completions
                                for part in self.dist.gather(self.completion_records(groups)) for r in part]
        after = self.engine_counters()
        generated, cold_starts, cache_hits, verified, prefill, reused = map(int, self.dist.sum(
            [totals["generated"], totals["cold_starts"], totals["cache_hits"], totals["verified"],
             after["prefill"] - before["prefill"], after["reused"] - before["reused"]]))
        num_prompts, all_rewards = len(sampled), [x for r in sampled for x in r.rewards]
        # no advantage, no gradient: what the advantages are taken from is all equal (under GDPO every term, not the sum)
        zero_std = sum(1 for r in sampled if max(r.advantage_rewards) == min(r.advantage_rewards))
        suffix_lens = [n for r in sampled for n in r.suffix_lens]
        rollout_time, update_time, step_time, decode_steps = self.dist.max(  # the slowest rank's
            [rollout_time, time.perf_counter() - update_start, time.perf_counter() - start,
             after["decode_steps"] - before["decode_steps"]])
        metrics = {
            "step": self.step_num,
            "reward_mean": sum(all_rewards) / len(all_rewards),
            "reward_std": float(torch.tensor(all_rewards, dtype=torch.float64).std()) if len(all_rewards) > 1 else 0.0,
            "accuracy_mean": sum(x for r in sampled for x in r.correct) / len(suffix_lens),
            "rollout_generated_tokens": generated,
            "rollout_prefill_tokens": prefill,
            "rollout_reused_tokens": reused,
            "rollout_decode_steps": int(decode_steps),  # the rollout's depth: its longest completion sets it
            "suffix_len_mean": sum(suffix_lens) / max(1, len(suffix_lens)),
            "frac_truncated": sum(r.truncated for r in sampled) / len(suffix_lens),  # out of budget (TRL: clipped_ratio)
            "num_prompts_sampled": num_prompts,
            "num_groups_trained": len(kept),
            "frac_reward_zero_std": zero_std / num_prompts,
            "cache_hit_rate": cache_hits / num_prompts if self.rpo.rpo else 0.0,
            "cache_verified_rate": verified / num_prompts if self.rpo.rpo else 0.0,
            "cold_starts": cold_starts,
            "lr": lr,
            "rollout_time_s": rollout_time,
            "update_time_s": update_time,
            "step_time_s": step_time,
            **stats,
        }
        if not algo.beta:  # no reference, so no KL was measured: not a KL of 0 (TRL logs none)
            metrics["kl"] = None
        if self.extra_rewards:  # each function's mean score, unweighted, over the samples it applies to (TRL's
            # rewards/<name>/mean, a nanmean; None where it applied to none)
            for i, name in enumerate(self.reward_names()):
                total, count = sum(r.score_sums[i] for r in sampled), sum(r.score_counts[i] for r in sampled)
                metrics[f"rewards/{name}/mean"] = total / count if count else None
        return self.logged_reward_metrics(self.reward_metrics, metrics)

    def completion_records(self, groups: list[Group]) -> list[dict]:
        """One record per sampled completion of `groups`, as text: the prompt, the kept part of its cached
        path (RPO; "" on the full path), the generated text, and what the step made of it. `advantage` is
        None for a group DAPO's dynamic sampling dropped. The prompt is the text the model read, chat-template
        markers and all; `kept` + `completion` is the answer's text as the reward functions read it."""
        def decode(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        records, names = [], self.reward_names() if self.extra_rewards else None
        for g in groups:
            prompt, kept_alone = self.tokenizer.decode(g.prompt_ids), decode(g.kept_ids)
            for i, suffix in enumerate(g.suffix_ids):
                # split the whole answer's text, not decode each part: a cut inside a character's bytes (a
                # byte-level BPE's) would show it as two U+FFFD halves that the reward never read
                answer = decode(g.kept_ids + suffix)
                cut = len(os.path.commonprefix([kept_alone, answer]))
                records.append({"step": self.step_num, "prompt_id": g.row["id"], "prompt": prompt,
                                "kept": answer[:cut], "kept_tokens": len(g.kept_ids), "completion": answer[cut:],
                                "completion_tokens": len(suffix), "finish_reason": g.finish_reasons[i],
                                "reward": g.rewards[i], "correct": g.correct[i],
                                "advantage": g.advantages[i] if g.advantages else None})
                if names:  # several reward functions: each one's score, unweighted (TRL's table has a column each)
                    records[-1]["scores"] = {name: None if math.isnan(scores[i]) else scores[i]  # None: not applied
                                             for name, scores in zip(names, g.scores)}
                add_columns(records[-1], g.extra_columns, i)
        return records

    @torch.no_grad()
    def sync_reference(self) -> None:
        """--sync-ref-model (TR-DPO; TRL's SyncRefModelCallback): ref = alpha * policy + (1 - alpha) * ref."""
        self.sync_rollout_weights()  # fsdp: the replica holds the step's weights
        alpha = self.algo.ref_model_mixup_alpha
        for ref, policy in zip(self.reference.parameters(), self.model.parameters()):
            ref.lerp_(policy, alpha)

    def engine_counters(self) -> dict:
        s = self.engine.stats
        return {"prefill": s.prefill_tokens, "reused": s.reused_tokens, "decode_steps": s.decode_steps}

    def sync_rollout_weights(self) -> None:
        """fsdp: refresh the rollout replica from the shards after an update (a collective)."""
        if self.dist.parallel == "fsdp" and self.replica_stale:
            self.dist.copy_to_replica(self.policy, self.model)
            self.replica_stale = False

    def close(self) -> None:
        """Shut down the worker processes of any PooledReward (the trainer still evaluates and saves after,
        scoring those functions in this process)."""
        functions = [self.reward_fn, *self.extra_rewards]
        for pool in {id(fn.pool): fn.pool for fn in functions if isinstance(fn, PooledReward)}.values():
            pool.close()
        self.reward_fn, *self.extra_rewards = [fn.fn if isinstance(fn, PooledReward) else fn for fn in functions]

    # ---- eval --------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """The eval accuracy (evaluate_metrics' eval_accuracy)."""
        return self.evaluate_metrics()["eval_accuracy"]

    def evaluate_metrics(self) -> dict:
        """`_evaluate_metrics` under forked global RNGs: an eval between steps must leave the training's random
        streams as they were, and torch's, Python's and numpy's global generators are (checkpointed as the run's
        state, read by a stochastic reward), which a greedy eval's unseeded requests and any eval's reward calls
        draw from."""
        device = torch.device(self.device)
        states = global_rng_states()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                return self._evaluate_metrics()
        finally:  # Python's and numpy's too (fork_rng forks torch's alone)
            restore_global_rng_states(states)

    @torch.no_grad()
    def _evaluate_metrics(self) -> dict:
        """Accuracy on the eval rows: greedy, or the mean over --num-generations-eval answers sampled at
        --eval-temperature (then also eval_pass_at_k, the share of rows answered right at least once). Each rank
        evaluates its share (rank 0's with a progress bar: a large eval set takes minutes). Sampled answers are
        seeded by (run seed, step, row), so a resumed run evaluates as the uninterrupted one did."""
        from rpo_engine.rollout import SamplingParams

        c = self.config
        self.sync_rollout_weights()
        share = self.dist.share(len(self.eval_rows))
        rows = [self.eval_rows[i] for i in share]
        if c.eval_temperature == 0:
            params = SamplingParams(n=1, max_new_tokens=c.max_completion_length, temperature=0.0,
                                    stop_token_ids=self.eos_ids, stop=self.stop)
        else:
            params = [SamplingParams(n=c.num_generations_eval, max_new_tokens=c.max_completion_length,
                                     temperature=c.eval_temperature, top_p=c.eval_top_p, top_k=c.eval_top_k,
                                     stop_token_ids=self.eos_ids, stop=self.stop, seed=self.seed_for(i, EVAL_SALT))
                      for i in share]
        log = RewardLog()
        graded = sampled_graded(self.engine, self.tokenizer, rows, self.reward_fn,
                                [self.eval_prompt_ids[i] for i in share], params,
                                progress="eval" if c.progress and self.dist.is_main else False,
                                trainer_state=self.reward_trainer_state(), log=log)
        rights = right_answers(graded)
        correct, solved, total = self.dist.sum([sum(rights), sum(n > 0 for n in rights), len(rows)])
        if not total:
            return {"eval_accuracy": float("nan")}
        metrics = {"eval_accuracy": correct / (total * c.num_generations_eval)}
        if c.num_generations_eval > 1:
            metrics["eval_pass_at_k"] = solved / total
        return self.logged_reward_metrics(log.metrics, metrics, prefix="eval_")  # TRL's eval metrics' prefix

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def low_precision_replica(self) -> bool:
        """fsdp: the rollout replica is not float32, so a checkpoint carries the float32 masters."""
        return self.model.dtype != torch.float32

    def state_dict(self) -> dict:
        """Independent of the rank count: a checkpoint resumes on any number of ranks (a collective under fsdp)."""
        if self.dist.parallel == "fsdp":
            optimizer = consolidated_optimizer_state(self.optimizer, self.low_precision_replica, keep=True)
        else:
            optimizer = self.optimizer.state_dict()
        return {"step": self.step_num, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "rng": list(self.rng.getstate()),
                **global_rng_states(), "rows_drawn": self.rows_drawn,
                "cache": self.cache.state_dict(self.prompt_keys(self.cache.paths)),
                # whether this run adapted: a fixed coefficient is an option, not state to carry into an adaptive run
                "entropy_control": [self.entropy_coef, self.last_entropy, self.algo.use_adaptive_entropy]}

    def prompt_keys(self, ids, saved: dict[str, str] | None = None) -> dict[str, str]:
        """Each of `ids` that is a training prompt's -> a digest of what a cached path answers: the prompt's token
        ids (the row's prompt as the chat template, its kwargs and the tokenizer encode it: the same row read
        another way is another prompt to the model) and the row's answer. Where `saved` (a checkpoint's digests)
        holds one from before the token ids were digested (no TOKEN_DIGEST mark), the row's prompt is digested
        in their place, as it was then."""
        keys = {}
        for i in ids:
            if i not in self.row_index:
                continue
            row = self.train_rows[self.row_index[i]]
            legacy = saved is not None and i in saved and not str(saved[i]).startswith(TOKEN_DIGEST)
            prompt = row["prompt"] if legacy else self.prompt_ids[i]
            digest = hashlib.sha1(json.dumps([prompt, row.get("answer")], sort_keys=True, default=str).encode())
            keys[i] = ("" if legacy else TOKEN_DIGEST) + digest.hexdigest()[:16]
        return keys

    def load_state_dict(self, state: dict) -> None:
        check_state_counts(state)
        self.step_num = state["step"]
        # torch restores the checkpoint's hyperparameters with the moments and the schedule's position: this run's
        # options (a --learning-rate, --weight-decay or AdamW beta changed on resume; a longer --steps, which
        # stretches the schedule) must govern from the first resumed step, as the changed-options warning says
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        if self.dist.parallel == "fsdp":
            load_consolidated_optimizer_state(self.optimizer, state["optimizer"])
            self.replica_stale = True  # the float32 masters may differ from the loaded (bf16) weights
        else:  # a bf16 run's fp32 masters too, resumed in float32
            load_adamw_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = base_lrs
        for group, options, base, multiplier in zip(self.optimizer.param_groups, configured, base_lrs,
                                                    self.scheduler.lr_lambdas):
            group.update(options, lr=base * multiplier(self.scheduler.last_epoch))
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        restore_global_rng_states(state)
        self.rows_drawn = state["rows_drawn"]
        saved_keys = state["cache"].get("prompt_keys")
        keys = self.prompt_keys(saved_path_ids(state["cache"]), saved_keys if isinstance(saved_keys, dict) else None)
        stale = self.cache.load_state_dict(state["cache"], keys, self.model.config.vocab_size)
        if stale and self.dist.is_main:
            print(f"warning: resuming: dropped {len(stale)} cached RPO path(s) saved for another prompt under the "
                  f"same id (first {stale[0]!r}: the dataset, the built-in task's --seed, or how prompts are encoded "
                  f"(the chat template, --chat-template-kwargs, --system-prompt, --no-chat-template) changed); "
                  f"those prompts cold-start again", file=sys.stderr)
        # else --entropy-coef is the config's; older checkpoints do not say whether their run adapted
        coef, last_entropy, *adapted = state.get("entropy_control", (None, None, False))
        if self.algo.use_adaptive_entropy and adapted != [False]:
            self.entropy_coef, self.last_entropy = coef, last_entropy

    def save_model(self, directory: Path) -> None:
        """The model as a Hugging Face directory (LoRA adapters merged in), and under LoRA the adapter alone
        in PEFT's layout beside it (DIRECTORY-adapter/); written by rank 0 (every rank calls it)."""
        self.sync_rollout_weights()
        if self.dist.is_main:
            with refusals_named(directory):  # each directory written whole or not at all (replacing_directory)
                self.model.save_pretrained(directory, tokenizer=self.tokenizer)
            if self.lora:
                from rpo_engine.hub import is_hub_id

                directory = Path(directory)
                # a Hub --model is named by its id, as PEFT names it, not by this machine's cache snapshot
                base = self.config.model if is_hub_id(self.config.model) else None
                adapter = directory.with_name(f"{directory.name}-adapter")
                with refusals_named(adapter):
                    save_adapter(self.model, adapter, base)

    def save_checkpoint(self, directory: Path) -> None:
        """model/ (a Hugging Face directory; under LoRA adapter/, the base being the run's --model) +
        trainer_state.pt (+ reference/ with --sync-ref-model), written under a temporary name, then renamed;
        by rank 0 (every rank calls it)."""
        self.sync_rollout_weights()
        if not self.dist.is_main:
            if self.dist.parallel == "fsdp":  # join rank 0's gathers of the sharded state, keep none of it
                consolidated_optimizer_state(self.optimizer, self.low_precision_replica, keep=False)
            return  # under ddp rank 0's state is complete on its own: nothing to join
        state = self.state_dict()
        import shutil

        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            with refusals_named(directory):
                tmp.mkdir(parents=True)
                if self.lora:
                    save_adapter(self.model, tmp / "adapter")
                else:
                    self.model.save_pretrained(tmp / "model", tokenizer=self.tokenizer)
                if self.algo.sync_ref_model:  # the reference has moved: a resume needs it, not the starting model
                    self.reference.save_pretrained(tmp / "reference")
                # through a Python file: torch writing to a path reports a full disk as "unexpected pos", no errno
                with open(tmp / "trainer_state.pt", "wb") as f:
                    torch.save(state, f)
                (tmp / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2) + "\n")
        except BaseException:  # its space back on a full disk; the earlier checkpoints stay as they are
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if directory.exists():  # one left incomplete (a save cut short), which a resume from an earlier one redoes
            shutil.rmtree(directory)
        tmp.rename(directory)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens a completion ends at: the model's eos ids (config.json, generation_config.json) and the
    tokenizer's eos token. None of them is a one-line error: no completion could ever stop."""
    ids = list(model.config.stop_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)  # as TRL and vLLM stop: a tokenizer whose eos the config does not name
    where = getattr(model, "source_dir", None) or "the model"
    if not ids:
        raise UserError(f"{where}: no end-of-sequence token (config.json's or generation_config.json's eos_token_id, "
                        f"or the tokenizer's eos_token); completions could never stop")
    vocab = model.config.vocab_size
    outside = [t for t in ids if not 0 <= t < vocab]  # the model never emits them: the rollout refused them later
    if outside:
        raise UserError(f"{where}: end-of-sequence token id(s) {outside} (config.json's or generation_config.json's "
                        f"eos_token_id, or the tokenizer's eos_token) are not in the model's vocabulary [0, {vocab})")
    return ids


def at_or_above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """values >= threshold, a value within a few fp32 ulps below it counted as a tie (--top-entropy-quantile's
    rule): a group's samples predict their first suffix token from one context, so those entropies tie, and
    computed in another layout (padded, another micro-batch) they differ in the last bits; a threshold on the
    tie must keep all of them, whatever the layout. NaN: False."""
    if not math.isfinite(threshold):
        return values >= threshold
    return values >= threshold - 8 * torch.finfo(torch.float32).eps * abs(threshold)


def prompt_token_limit(config: TrainConfig, model) -> int:
    context = model.config.max_model_len
    if config.max_completion_length >= context:
        where = getattr(model, "source_dir", None) or "the model"
        raise UserError(f"--max-completion-length {config.max_completion_length} leaves no room for a prompt in "
                        f"{where}'s {model.config.describe_context()}")
    return min(config.max_prompt_length, context - config.max_completion_length)


def chat_template_kwargs(config: TrainConfig) -> dict:
    return {} if config.chat_template_kwargs is None else json.loads(config.chat_template_kwargs)


def check_state_counts(state: dict) -> None:
    """A trainer state's step and rows_drawn are counts (an edited file's: the step is compared, the rows drawn indexed)."""
    for count in ("step", "rows_drawn"):
        if isinstance(state[count], bool) or not isinstance(state[count], int) or state[count] < 0:
            raise ValueError(f"{count} is {state[count]!r}, not a count")


def seed_global_rngs(seed: int) -> None:
    """Python's, numpy's and torch's global generators from `seed`, as transformers' set_seed seeds them (the CUDA
    ones too, through torch.manual_seed)."""
    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2 ** 32)  # numpy takes 32 bits
    # torch takes 64 (eval's --seed is any integer: the sampler keeps its low 64 bits); within them, as it was
    torch.manual_seed(seed if -2 ** 63 <= seed < 2 ** 64 else seed % 2 ** 64)


def global_rng_states() -> dict:
    """The global generators' states, in what torch.load(weights_only=True) reads back: a stochastic reward (a
    sampled judge, random tie-breaking) draws from them, so a resumed run must go on where they were."""
    import numpy

    kind, keys, position, has_gauss, cached = numpy.random.get_state()
    return {"torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()),
            "numpy_rng": [kind, torch.from_numpy(keys.astype(numpy.int64)), position, has_gauss, cached]}


def restore_global_rng_states(state: dict) -> None:
    """global_rng_states' states back (a checkpoint from before Python's and numpy's were saved: torch's alone)."""
    import numpy

    torch.set_rng_state(state["torch_rng"])
    if "python_rng" in state:
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy_rng" in state:
        kind, keys, position, has_gauss, cached = state["numpy_rng"]
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), position, has_gauss, cached))


def encode_prompt(tokenizer, row: dict, limit: int, template_kwargs: dict | None = None,
                  chat_template: bool = True, special_texts: tuple[str, ...] | None = None,
                  encoded=None) -> list[int]:
    """Token ids of a row's prompt: through the chat template when the tokenizer has one and `chat_template`
    (a string as a user turn; a conversation as it is; the assistant turn opened; `template_kwargs` passed to
    the template), else the text with the tokenizer's leading special tokens. `special_texts`: the tokenizer's
    special_token_texts, and `encoded`: the row's batch_encoded entry, for a caller encoding many rows (a string
    prompt holding one is rendered already)."""
    text = row["prompt"]
    if chat_template and getattr(tokenizer, "chat_template", None):
        if isinstance(text, str):
            special_texts = special_token_texts(tokenizer) if special_texts is None else special_texts
            held = [t for t in special_texts if t in text]
            rendered = min(held, key=text.find, default=None)  # the first in the text
            if rendered is not None:  # a dataset of prompts rendered for vLLM: the template would wrap them again
                raise UserError(f"prompt of row {row['id']!r} holds the special token {rendered!r}: a prompt a chat "
                                f"template rendered already would be rendered again; --no-chat-template encodes it "
                                f"as it is (or give the question alone)")
        if encoded is not None:
            ids = encoded
        else:
            messages = conversation(text)
            prefilled = messages[-1]["role"] == "assistant"
            from jinja2.exceptions import TemplateError

            try:
                ids = _token_lists(tokenizer.apply_chat_template(messages, **_template_options(prefilled),
                                                                 **(template_kwargs or {})))
            except (TemplateError, ValueError) as e:  # the template's raise_exception (Qwen3's "No user query found")
                # R1's template cuts the final assistant message at </think>
                why = ("it rewrites the final assistant message, which therefore cannot be continued"
                       if prefilled and isinstance(e, ValueError) else " ".join(str(e).split())[:200])
                raise UserError(f"prompt of row {row['id']!r}: the tokenizer's chat template cannot render it "
                                f"({why})") from None
    elif not isinstance(text, str):
        why = "the tokenizer has no chat template" if chat_template else "--no-chat-template is set"
        raise UserError(f"prompt of row {row['id']!r} is a conversation, and {why} to render it (give the prompt "
                        f"as a string)")
    else:  # with the tokenizer's special tokens (Llama's BOS), as TRL and vLLM encode a text prompt
        ids, plain = encoded if encoded is not None else _text_encodings(tokenizer, [text])[0]
        eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
        if eos is not None and _trailing(ids, eos) > _trailing(plain, eos):
            ids = ids[:-1]  # the EOS a tokenizer appends would end the prompt before the answer (the text's own stays)
        if bos is not None and plain[:1] == [bos] and ids[:1] == [bos] and ids[1:len(plain) + 1] == plain:
            ids = ids[1:]  # a text a chat template rendered opens with its BOS: the tokenizer's would be a second
    if not ids:
        raise UserError(f"prompt of row {row['id']!r} is empty after tokenization")
    if len(ids) > limit:
        raise PromptTooLong(f"prompt of row {row['id']!r} has {len(ids)} tokens, more than the {limit} allowed "
                            f"(--max-prompt-length, and the model's context minus --max-completion-length; "
                            f"--filter-overlong-prompts drops such rows)", len(ids))
    return ids


def conversation(prompt) -> list[dict]:
    """A row's prompt as the messages its chat template renders: a string is the user's turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _template_options(prefilled: bool) -> dict:
    """apply_chat_template's arguments for token ids: a conversation ending in an assistant message (`prefilled`)
    continues it (TRL's rule), else a new turn opens."""
    return dict(add_generation_prompt=not prefilled, continue_final_message=prefilled, tokenize=True)


def _token_lists(encoded) -> list:
    """The token ids of apply_chat_template's or the tokenizer's output (a BatchEncoding, or the ids themselves)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _text_encodings(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text's ids with and without the special tokens the tokenizer adds (BOS, EOS), in one call each: a
    tokenizer that adds none encodes each text once (its two encodings are then the same)."""
    ids = _token_lists(tokenizer(texts))
    try:
        adds = tokenizer.num_special_tokens_to_add()
    except (AttributeError, NotImplementedError, TypeError):  # a custom tokenizer's: encode again to know
        adds = None
    plain = ids if adds == 0 else _token_lists(tokenizer(texts, add_special_tokens=False))
    return list(zip(ids, plain))


# prompts the tokenizer encodes in one call: its Rust side spreads them over the cores, and holds their encodings
# (~80 bytes a token) until the call returns: 1024 rows of 1.5 kB grew a process by 190 MB where 256 grew it by 80
PROMPT_BATCH = 256


def batch_encoded(tokenizer, rows: list[dict], template_kwargs: dict | None, chat_template: bool) -> list:
    """encode_prompt's tokenizer output for each of `rows`, in a few calls, not one a row (one a row took ~90% of a
    20k-row dataset's time to its first step): None for a row a call could not encode (a template refusing a
    conversation), which encode_prompt then encodes alone, to name it."""
    from jinja2.exceptions import TemplateError

    out = [None] * len(rows)
    templated = chat_template and getattr(tokenizer, "chat_template", None)
    if templated:
        groups = {}
        for i, row in enumerate(rows):
            messages = conversation(row["prompt"])
            groups.setdefault(messages[-1]["role"] == "assistant", []).append((i, messages))
        for prefilled, members in groups.items():
            try:
                encoded = _token_lists(tokenizer.apply_chat_template([m for _, m in members],
                                                                     **_template_options(prefilled),
                                                                     **(template_kwargs or {})))
            except (TemplateError, ValueError):  # a row it refuses: each alone, in order
                continue
            for (i, _), ids in zip(members, encoded):
                out[i] = ids
        return out
    texts = [(i, row["prompt"]) for i, row in enumerate(rows) if isinstance(row["prompt"], str)]
    for (i, _), pair in zip(texts, _text_encodings(tokenizer, [text for _, text in texts]) if texts else []):
        out[i] = pair
    return out


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The texts of `tokenizer`'s special tokens (BOS/EOS, a chat template's markers such as <|im_start|>)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = {*tokenizer.all_special_tokens, *(t.content for t in added if t.special)}
    return tuple(sorted(t for t in texts if t))


def _trailing(ids: list[int], token: int) -> int:
    """How many times `token` ends `ids`."""
    n = 0
    while n < len(ids) and ids[-1 - n] == token:
        n += 1
    return n


class TokenTable(Sequence):
    """Lists of token ids (a dataset's prompts), held as one flat array of 4-byte ids: as lists of Python ints they
    took 8 bytes a token and 28 more for each id past 256, ~14 GB for NuminaMath's 860k prompts of ~450 tokens in
    every rank, where this holds 1.5 GB. An item is a fresh list."""

    def __init__(self):
        self.ids, self.ends = array.array("i"), array.array("q")

    def append(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.ends.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self.ends))[index]
        return self.ids[self.ends[index - 1] if index else 0:self.ends[index]].tolist()

    def longest(self) -> int:
        """The most tokens an item holds (0 when empty), without making the lists."""
        return max((end - start for start, end in zip((0, *self.ends), self.ends)), default=0)


class TokensById(Mapping):
    """A training row's id -> its prompt's token ids, read from `table` (a TokenTable) at the row's position."""

    def __init__(self, table: TokenTable, positions: dict[str, int]):
        self.table, self.positions = table, positions

    def __getitem__(self, row_id: str) -> list[int]:
        return self.table[self.positions[row_id]]

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


class PromptTooLong(UserError):
    def __init__(self, message: str, num_tokens: int):
        super().__init__(message)
        self.num_tokens = num_tokens


def encode_prompts(tokenizer, rows: list[dict], limit: int, template_kwargs: dict | None, source: str,
                   chat_template: bool = True, drop_overlong: bool = False,
                   say: bool = True) -> tuple[list[dict], TokenTable]:
    """Each row's prompt ids (encode_prompt) -> (the rows, their ids); a mistake in one is named with `source`,
    its dataset (a train and an eval row may share an id). `drop_overlong` (verl's filter_overlong_prompts):
    the rows whose prompts exceed `limit` are left out, with a line on stderr saying how many (`say`), and
    an error if that is all of them."""
    kept, ids, longest = [], TokenTable(), []
    special_texts = special_token_texts(tokenizer)  # once, not per row: ~40% of a row's encoding at Llama-3's 256
    for start in range(0, len(rows), PROMPT_BATCH):
        batch = rows[start:start + PROMPT_BATCH]
        for row, encoded in zip(batch, batch_encoded(tokenizer, batch, template_kwargs, chat_template)):
            try:
                ids.append(encode_prompt(tokenizer, row, limit, template_kwargs, chat_template, special_texts, encoded))
            except PromptTooLong as e:
                if not drop_overlong:
                    raise UserError(f"{source}: {e}") from None
                longest.append(e.num_tokens)
                continue
            except UserError as e:
                raise UserError(f"{source}: {e}") from None
            kept.append(row)
    if longest:
        what = f"{len(longest)} of its {len(rows)} rows, whose prompts exceed {limit} tokens (the longest {max(longest)})"
        if not kept:
            raise UserError(f"{source}: --filter-overlong-prompts would drop all {what}: raise --max-prompt-length")
        if say:
            print(f"{source}: --filter-overlong-prompts dropped {what}", file=sys.stderr)
    return kept, ids


def encode_run_prompts(tokenizer, rows: list[dict], config: TrainConfig, model, source: str,
                       say: bool = True) -> tuple[list[dict], TokenTable]:
    """encode_prompts with a run's options: its prompt length limit for `model`, its chat-template ones and
    --filter-overlong-prompts -> (the rows kept, their prompt ids)."""
    if not getattr(tokenizer, "chat_template", None):
        # encode_prompt encodes the text as it is then: the arguments (Qwen3's enable_thinking) were dropped silently
        if config.chat_template_kwargs is not None:
            raise UserError(f"--chat-template-kwargs does nothing: the tokenizer of "
                            f"{config.model or 'the starter model'} has no chat template")
        if config.system_prompt is not None:  # its conversations could not be encoded
            raise UserError(f"--system-prompt needs a chat template: the tokenizer of "
                            f"{config.model or 'the starter model'} has none")
    return encode_prompts(tokenizer, rows, prompt_token_limit(config, model), chat_template_kwargs(config), source,
                          config.chat_template, config.filter_overlong_prompts, say)


def prefill_token_budget(model, longest_prompt: int, max_new_tokens: int) -> int:
    """The rollout engine's tokens per prefill step for a run whose longest prompt has `longest_prompt` tokens:
    8192, or where longer, the longest sequence one of its prefills can hold (a prompt, with RPO its kept path
    too, or a preempted sample's prompt and tokens so far: at most the prompt + max_new_tokens + 1, an RPO
    suffix's one token past a whole kept path).
    Not the engine's default, the model's whole context: on CUDA the engine runs a forward of that many tokens
    before sizing its K/V cache and holds back its activations, ~15 GB at Llama 3.1 8B's 131072 tokens."""
    return max(8192, min(model.config.max_model_len, longest_prompt + max_new_tokens + 1))


def rollout_engine(model, gpu_memory_utilization: float, max_num_seqs: int, enforce_eager: bool,
                   longest_prompt: int, max_new_tokens: int, **options):
    """A RolloutEngine with the command's rollout options (a run's or the eval's), for prompts of at most
    `longest_prompt` tokens with budgets of `max_new_tokens`; its ValueError, the weights alone filling the
    --gpu-memory-utilization share of the GPU, a UserError naming that option, as is a K/V cache too small for the
    longest prompt and its budget (the engine would refuse that prompt mid-run, with a traceback)."""
    from rpo_engine.rollout import RolloutEngine
    from rpo_engine.rollout.model_runner import NO_BLOCK_ADVICE

    try:
        engine = RolloutEngine(model, gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                               use_cuda_graphs=False if enforce_eager else None,
                               max_num_batched_tokens=prefill_token_budget(model, longest_prompt, max_new_tokens),
                               **options)
    except ValueError as e:  # its advice names its own arguments, kv_cache_bytes and num_blocks, which no option sets
        message = str(e).replace(NO_BLOCK_ADVICE, "raise --gpu-memory-utilization")
        raise UserError(f"rollout engine: {message} (--gpu-memory-utilization {gpu_memory_utilization})") from None
    fits, cached = engine.kv_fits(longest_prompt, max_new_tokens)
    if not fits:
        raise UserError(f"rollout engine: the longest prompt ({longest_prompt} tokens) with --max-completion-length "
                        f"{max_new_tokens} needs K/V for {cached} tokens, more than the cache's "
                        f"{engine.num_blocks * engine.block_size}: raise --gpu-memory-utilization (now "
                        f"{gpu_memory_utilization}), or lower --max-completion-length or --max-prompt-length")
    return engine


def greedy_graded(engine, tokenizer, rows, reward_fn, prompt_ids, max_new_tokens,
                  eos_ids, progress=False) -> list[tuple[str, float, bool]]:
    """Each row's greedy completion, its reward, and whether that is the full reward (a right answer)."""
    from rpo_engine.rollout import SamplingParams

    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=eos_ids)
    return [samples[0] for samples in sampled_graded(engine, tokenizer, rows, reward_fn, prompt_ids, params, progress)]


@torch.no_grad()
def sampled_graded(engine, tokenizer, rows, reward_fn, prompt_ids, params, progress=False, trainer_state=None,
                   log: RewardLog | None = None) -> list[list[tuple[str, float, bool]]]:
    """Each row's samples under `params` (one SamplingParams, or one a row), each decoded, with its reward
    and whether that is the full reward (a right answer). `trainer_state` and `log`: a TRL-style reward
    function's (score_groups); row j's log_extra columns land in `log.columns[j]`."""
    outs = engine.generate(prompt_ids, params, progress=progress) if prompt_ids else []
    ids = [[c.token_ids for c in samples] for samples in outs]
    texts = [[tokenizer.decode(i, skip_special_tokens=True) for i in row_ids] for row_ids in ids]
    rewards = score_groups(reward_fn, texts, rows, ids, trainer_state=trainer_state, log=log)  # a row's samples: a group
    return [[(text, reward, is_correct(reward)) for text, reward in zip(row_texts, row_rewards)]
            for row_texts, row_rewards in zip(texts, rewards)]


def add_columns(record: dict, columns: dict[str, list], i: int | None) -> None:
    """A completions record with what reward functions logged for it (log_extra): value i of each column, or
    (`i` None: a record of all the row's samples) the whole column. A column named as one of the record's
    own fields is an error, not an overwrite."""
    for column, values in columns.items():
        if column in record:
            raise UserError(f"a reward function logged the column {column!r} (log_extra), a name the completions "
                            f"log uses itself: give it another name")
        record[column] = values if i is None else values[i]


def right_answers(graded: list[list[tuple[str, float, bool]]]) -> list[int]:
    """How many of each row's graded samples (sampled_graded's) are right."""
    return [sum(right for _, _, right in samples) for samples in graded]


def greedy_correct(engine, tokenizer, rows, reward_fn, prompt_ids, max_new_tokens, eos_ids) -> int:
    """How many rows' greedy completions earn the full reward."""
    graded = greedy_graded(engine, tokenizer, rows, reward_fn, prompt_ids, max_new_tokens, eos_ids)
    return sum(right for _, _, right in graded)


def evaluate_accuracy(engine, tokenizer, rows, reward_fn, prompt_ids, max_new_tokens, eos_ids) -> float:
    """Greedy accuracy: the fraction of rows whose greedy completion earns the full reward."""
    if not rows:
        return float("nan")
    return greedy_correct(engine, tokenizer, rows, reward_fn, prompt_ids, max_new_tokens, eos_ids) / len(rows)
