"""rpo_engine's rollout engine as the generation backend of TRL's GRPOTrainer (its `rollout_func`).

    from rpo_engine.integrations.trl import TRLRollout
    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), rollout_func=TRLRollout())

TRL then samples its completions with our paged-KV-cache engine, running in its process on the parameters it
trains (`from_transformers`: the same tensors, so no weight copy, no sync step, no vLLM server; with TRL's
peft_config the LoRA adapters are read live too, not merged and synced each step): each prompt is prefilled
once for its num_generations samples, which share its K/V blocks. Everything else (rewards, advantages, loss,
logging) stays TRL's.

What it reads from the trainer, as TRL's own generation would: the chat template and its kwargs, temperature,
top_p, top_k, min_p, repetition_penalty, max_completion_length, the eos ids (the tokenizer's and the model's
generation_config's), and from `generation_kwargs` the stop strings (`stop` or `stop_strings`), extra
`stop_token_ids` and a `max_tokens` / `max_new_tokens` budget. A completion's log-probs are under the
temperature-scaled distribution, as TRL's own (`logits / temperature`). TRL's `vllm_enable_sleep_mode` frees
the K/V cache between rollouts, for the update's activations, as it would colocated vLLM's.

The rollout computes in the weights' dtype: a model loaded in fp32 and trained with TRL's bf16=True (autocast)
is sampled in fp32, a bf16 model in bf16, as vLLM would sample it.

Written against TRL 1.16 (`rollout_func` is experimental there; set TRL_EXPERIMENTAL_SILENCE=1 to silence its
warning; SharedPrefixGRPOTrainer refuses a TRL whose GRPOTrainer internals it overrides differ). Not supported: tools and environments (TRL's tool loop would continue with its own generation),
vision-language processors, ZeRO-3 / FSDP-sharded weights, and PEFT adapters other than plain LoRA on the
layers' projections (from_transformers refuses those).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import random
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import GRPOTrainer

from rpo_engine.config import RPOConfig
from rpo_engine.errors import UserError
from rpo_engine.model.checkpoint import from_transformers
from rpo_engine.model.lora import peft_adapter_state
from rpo_engine.model.shared_prefix import PrefixGroup, shared_prefix_logprobs
from rpo_engine.rewards.shaping import length_aware_accuracy
from rpo_engine.rollout import RolloutEngine, SamplingParams
from rpo_engine.rpo.cache import ExperienceCache
from rpo_engine.rpo.truncation import cut_cached_path

# generation_kwargs keys taken (vLLM's and transformers' names), and the SamplingParams field each sets
GENERATION_KWARGS = {"stop": "stop", "stop_strings": "stop", "stop_token_ids": "stop_token_ids",
                     "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens"}


class TRLRollout:
    """A TRL `rollout_func`: `TRLRollout()(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}`.

    gpu_memory_utilization: on CUDA, the share of the GPU the process's weights (the trained model's, a
    reference's, reward models') and the K/V cache may fill (None: the engine's default, 0.5; TRL's
    vllm_gpu_memory_utilization, 0.3 by default, is for vLLM's own copy and is not read). enable_sleep_mode:
    None takes TRL's vllm_enable_sleep_mode. engine_options: RolloutEngine's other options (max_num_seqs,
    block_size, use_cuda_graphs, async_scheduling, ...). The engine is built at the first call and built
    again only if the model's parameters, device or dtype change, or its PEFT adapters are merged, unmerged,
    switched off or on (so a rollout inside PEFT's disable_adapter() samples the base model).
    """

    def __init__(self, gpu_memory_utilization: float | None = None, enable_sleep_mode: bool | None = None,
                 **engine_options):
        if isinstance(gpu_memory_utilization, list):  # TRL called the class with (prompts, trainer)
            raise ValueError(f"rollout_func takes an instance: rollout_func={type(self).__name__}(), not the class")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.engine_options = engine_options
        self.engine: RolloutEngine | None = None
        self._built_for = None  # (model, its Parameters, the head's device, dtype, shape), by id, as built on

    def __call__(self, prompts: list, trainer) -> dict:
        engine = self.engine_for(trainer)
        prompt_ids = tokenize_prompts(prompts, trainer)
        params = sampling_params(trainer)
        runs, counts = repeated_runs(prompt_ids)
        outputs = engine.generate(runs, [self.request(engine, ids, params, n) for ids, n in zip(runs, counts)])
        if self.sleeping(trainer):
            engine.sleep()
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for ids, completions in zip(runs, outputs):
            for c in completions:
                out["prompt_ids"].append(list(ids))
                out["completion_ids"].append(list(c.token_ids))
                out["logprobs"].append(list(c.logprobs))
        return out

    @staticmethod
    def request(engine: RolloutEngine, prefix: list[int], params: dict, n: int, **changes) -> SamplingParams:
        """n samples continuing `prefix`, their budget cut where the context ends (vLLM's rule: such a
        completion ends there, finish reason "length")."""
        room = engine.config.max_model_len - len(prefix)
        if room < 1:
            raise ValueError(f"a prompt of {len(prefix)} tokens leaves no room to generate in the model's "
                             f"{engine.config.describe_context()}")
        params = {**params, **changes}
        return SamplingParams(**{**params, "n": n, "max_new_tokens": min(params["max_new_tokens"], room)})

    def sleeping(self, trainer) -> bool:
        if self.enable_sleep_mode is not None:
            return self.enable_sleep_mode
        return bool(getattr(trainer.args, "vllm_enable_sleep_mode", False))

    def engine_for(self, trainer) -> RolloutEngine:
        """The engine on the trainer's model, built (again) where the model is new, a Parameter was replaced
        (load_state_dict(assign=True), adapters injected again), or the head's device, dtype or shape changed
        (.to() moves every weight's data, resize_token_embeddings the head's), or PEFT's adapters were merged,
        unmerged, switched off or on, or another made active: the engine's weights, K/V cache or vocabulary
        would be stale."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        head = model.get_output_embeddings().weight
        key = (id(model), tuple(map(id, model.parameters())), head.device, head.dtype, tuple(head.shape),
               peft_adapter_state(model))
        if self.engine is not None and key == self._built_for:
            return self.engine
        if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
            raise ValueError("TRLRollout does not run tool calls: TRL's tool loop would continue the completions "
                             "with its own generation")
        if getattr(trainer, "use_vllm", False):
            raise ValueError("TRLRollout replaces vLLM: set use_vllm=False")
        options = dict(self.engine_options)
        if self.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        self.engine = None  # the old engine's K/V cache freed before the new one is sized
        try:
            # in eval mode: no dropout in a rollout (PEFT's lora_dropout applies in train mode)
            self.engine = RolloutEngine(from_transformers(model).eval(), tokenizer=trainer.processing_class, **options)
        except ValueError as e:  # name the knob the TRL user has
            raise ValueError(f"{e} (TRLRollout(gpu_memory_utilization=...), default 0.5)") from None
        self._built_for = key
        return self.engine


def equal_runs(items: list) -> list[range]:
    """The spans of consecutive equal items: TRL's groups, a prompt's num_generations copies in a row."""
    spans, start = [], 0
    for end in range(1, len(items) + 1):
        if end == len(items) or items[end] != items[start]:
            spans.append(range(start, end))
            start = end
    return spans


def repeated_runs(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Each run of equal prompts once, with its length (one request with n = that, so the prompt is prefilled
    once and its samples fork from it)."""
    spans = equal_runs(prompt_ids)
    return [prompt_ids[span.start] for span in spans], [len(span) for span in spans]


def tokenize_prompts(prompts: list, trainer) -> list[list[int]]:
    """The prompts' token ids as TRL 1.16 makes them (GRPOTrainer._tokenize_prompts, text only): a
    conversation through the chat template with a generation prompt, plain text through the tokenizer."""
    from trl.data_utils import is_conversational

    tokenizer = trainer.processing_class
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or hasattr(tokenizer, "image_processor"):
        raise ValueError(f"TRLRollout needs a text tokenizer, got {type(tokenizer).__name__}")
    if is_conversational({"prompt": prompts[0]}):
        tokenized = tokenizer.apply_chat_template(conversation=prompts, chat_template=trainer.chat_template,
                                                  add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  **trainer.chat_template_kwargs)
        return [list(ids) for ids in tokenized["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def sampling_params(trainer) -> dict:
    """SamplingParams' fields from the trainer's sampling settings (n and the budget's cap are set per prompt)."""
    params = dict(max_new_tokens=trainer.max_completion_length, temperature=trainer.temperature,
                  top_p=trainer.top_p, top_k=trainer.top_k or 0, min_p=trainer.min_p or 0.0,
                  repetition_penalty=trainer.repetition_penalty, stop_token_ids=list(trainer.eos_token_ids))
    extra = getattr(trainer.args, "generation_kwargs", None) or {}
    unknown = sorted(set(extra) - set(GENERATION_KWARGS))
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not taken by TRLRollout (it takes {sorted(GENERATION_KWARGS)}; "
                         f"the sampling settings are GRPOConfig's own fields)")
    for key, value in extra.items():
        field = GENERATION_KWARGS[key]
        if field == "stop_token_ids":  # vLLM's: stop at these as well as at the eos ids
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"generation_kwargs stop_token_ids must be a list of token ids, got {value!r}")
            value = params["stop_token_ids"] + [t for t in value if t not in params["stop_token_ids"]]
        params[field] = value
    try:  # SamplingParams' checks, each naming its field
        SamplingParams(**params)
    except ValueError as e:
        raise ValueError(f"TRL's sampling settings or generation_kwargs: {e}") from None
    return params


class RPORollout(TRLRollout):
    """RPO inside TRL's GRPOTrainer: a TRLRollout that keeps each prompt's last answer in an experience cache
    and generates only suffixes of it, as `python -m rpo_engine.train --rpo` does.

        rpo = RPORollout(rpo_max_cut=300)
        trainer = GRPOTrainer(model=model, reward_funcs=[rpo.tracked(accuracy), format_reward], args=config,
                              train_dataset=dataset, rollout_func=rpo)

    Each training rollout, per prompt: a prompt without a cached path first gets one full completion (its
    cold start, kept as an unverified path); the path is cut (`cut_cached_path`, by the RPOConfig options:
    a path verified right loses at most rpo_max_cut tokens and rpo_max_cut_fraction of it, any other is
    cut anywhere) and the prompt's num_generations samples continue the kept part. TRL receives each
    answer whole, kept part + suffix, as its completion, so its reward functions score the whole answer, and
    `env_mask` 0 over the kept part, so its loss covers the generated suffix only (rpo_loss_on_prefix: the
    whole answer). Eval rollouts (the model in eval mode) are full completions.

    The cache learns from the reward function wrapped by `tracked`: one answer per group is kept, the best by
    that function's rewards with probability rpo_epsilon, else a random one (rpo_cache_policy "correct-only",
    the default: never a wrong answer over a right path; right: reward >= correct_threshold). A prompt's cache
    key is its token ids, so two dataset rows with the same prompt share one path.

    Several processes (accelerate, torchrun): TRL spreads a prompt's num_generations copies over them, so every
    process keeps the same cache: a cold start is drawn with a seed of its prompt's (the same answer on every
    process that has the prompt; each takes the lowest process's), each cut and each choice of the answer to
    keep draws from an RNG seeded by (seed, step, prompt), and the tracked rewards of a batch are gathered
    from all processes before any group's answer is chosen (torch.distributed.all_gather_object).

    The cache goes into each of TRL's checkpoints as `rpo_state.pt` (by the main process; a callback added to
    the trainer at the first rollout) and comes back from the checkpoint a resumed run starts at (in its
    output_dir): without one, a warning, and the prompts cold-start again.

    rpo_options: RPOConfig's fields (rpo_max_cut, rpo_max_cut_fraction, rpo_unverified_cut, rpo_extra_budget,
    rpo_cache_policy, rpo_epsilon, rpo_loss_on_prefix, ...); seed: the cold starts', cuts' and choices' seed.
    """

    def __init__(self, seed: int = 0, correct_threshold: float = 0.5, gpu_memory_utilization: float | None = None,
                 enable_sleep_mode: bool | None = None, engine_options: dict | None = None, **rpo_options):
        if isinstance(seed, list):  # TRL called the class with (prompts, trainer)
            raise ValueError("rollout_func takes an instance: rollout_func=RPORollout(), not the class")
        super().__init__(gpu_memory_utilization, enable_sleep_mode, **(engine_options or {}))
        unknown = sorted(set(rpo_options) - {f.name for f in dataclasses.fields(RPOConfig)} - {"rpo"})
        if unknown or "rpo" in rpo_options:
            raise ValueError(f"RPORollout options {unknown or ['rpo']} are not RPOConfig's (rpo_max_cut, "
                             f"rpo_max_cut_fraction, ...; RPO is on by definition here)")
        self.rpo = RPOConfig(**rpo_options)
        self.cache = ExperienceCache(self.rpo.rpo_cache_policy, self.rpo.rpo_epsilon, correct_threshold)
        self.seed = seed
        self.counters = {"cold_starts": 0, "kept_tokens": 0, "generated_tokens": 0}
        self._checkpointing = None  # the trainer whose checkpoints carry the cache
        self._batch = None  # the last training rollout: [its number, whether a tracked reward updated the cache]

    def attach(self, trainer) -> None:
        """Save the cache with each of `trainer`'s checkpoints from now on, and, on a resumed run (its first
        rollout past step 0), load it from the checkpoint it resumed from."""
        from transformers import TrainerCallback

        rollout = self

        class SaveRPOState(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                # the checkpoint just written (save_strategy "no": none); every process holds the same cache
                if directory.is_dir() and trainer.accelerator.is_main_process:
                    torch.save(rollout.state_dict(), directory / STATE_FILE)

        trainer.add_callback(SaveRPOState())
        self._checkpointing = trainer
        step = trainer.state.global_step
        if step > 0 and len(self.cache) == 0:
            path = Path(trainer.args.output_dir) / f"checkpoint-{step}" / STATE_FILE
            if path.is_file():
                self.load_state_dict(torch.load(path, weights_only=True))
            else:
                warnings.warn(f"RPORollout: no {path} to resume the experience cache from: its prompts cold-start "
                              f"again", stacklevel=3)

    def rng(self, step: int, key: str, what: str) -> random.Random:
        """The same draws on every process and after a resume: seeded by (seed, step, prompt, purpose)."""
        return random.Random(f"{self.seed}/{step}/{key}/{what}")

    def __call__(self, prompts: list, trainer) -> dict:
        if not trainer.model.training:  # an eval: the policy answers from the prompt
            return super().__call__(prompts, trainer)
        if self._batch is not None and not self._batch[1]:
            raise ValueError("RPORollout: no tracked reward function updated the experience cache after the last "
                             "rollout; pass reward_funcs=[rpo.tracked(accuracy), ...] with this RPORollout's tracked")
        if self._checkpointing is not trainer:
            self.attach(trainer)
        engine = self.engine_for(trainer)
        runs, counts = repeated_runs(tokenize_prompts(prompts, trainer))
        params = sampling_params(trainer)
        keys = [prompt_key(ids) for ids in runs]
        step = trainer.state.global_step
        cold = []  # each uncached prompt once, if it leads two groups of the batch too
        for i, key in enumerate(keys):
            if key not in self.cache and key not in (keys[j] for j in cold):
                cold.append(i)
        if self.rpo.rpo_unverified_cut == "full":  # an unverified path regrows whole: no cold start needed
            cold = []
        outputs = engine.generate([runs[i] for i in cold], [
            self.request(engine, runs[i], params, 1, seed=self.rng(0, keys[i], "cold").getrandbits(63)) for i in cold])
        found = []
        for i, (answer,) in zip(cold, outputs):
            found.append((keys[i], list(answer.token_ids), list(answer.logprobs)))
            self.counters["cold_starts"] += 1
            self.counters["generated_tokens"] += len(answer.token_ids)
        for key, answer, logprobs in gather_lists(found)[0]:  # every process's, in process order
            if key not in self.cache:  # the lowest process's, where two drew one
                self.cache.put(key, answer, math.nan, step, False, logprobs)
        kept, kept_logprobs, requests = [], [], []
        for ids, key, n in zip(runs, keys, counts):
            path = self.cache.get(key)
            budget = min(params["max_new_tokens"], engine.config.max_model_len - len(ids))
            if path is None:
                kept.append([])
                kept_logprobs.append([])
            else:
                logprobs = path.logprobs  # a list made from the stored array: once
                cut = cut_cached_path(len(path), path.correct, self.rng(step, key, "cut"), budget, self.rpo,
                                      logprobs, self.cache.saturation(key))
                kept.append(path.token_ids[:cut.kept])
                kept_logprobs.append(logprobs[:cut.kept] if logprobs else [math.nan] * cut.kept)
                budget = cut.budget
            # a stop string completed across the kept part and the suffix ends the suffix (as in the trainer)
            requests.append(self.request(engine, ids + kept[-1], params, n, max_new_tokens=budget,
                                         stop_prompt_tokens=len(kept[-1])))
        outputs = engine.generate([ids + k for ids, k in zip(runs, kept)], requests)
        if self.sleeping(trainer):
            engine.sleep()
        out = {key: [] for key in ("prompt_ids", "completion_ids", "logprobs", "env_mask", "rpo_prompt_key")}
        kept_mask = 1 if self.rpo.rpo_loss_on_prefix else 0  # env_mask 0: out of TRL's loss
        for ids, key, k, k_logprobs, completions in zip(runs, keys, kept, kept_logprobs, outputs):
            for c in completions:
                out["prompt_ids"].append(list(ids))
                out["completion_ids"].append(k + list(c.token_ids))
                out["logprobs"].append(k_logprobs + list(c.logprobs))
                out["env_mask"].append([kept_mask] * len(k) + [1] * len(c.token_ids))
                out["rpo_prompt_key"].append(key)
                self.counters["kept_tokens"] += len(k)
                self.counters["generated_tokens"] += len(c.token_ids)
        out["rpo_logprobs"] = out["logprobs"]  # reward functions see the extra fields, not "logprobs": for the cache
        self._batch = [self._batch[0] + 1 if self._batch else 1, False]  # (its number, whether the cache learned)
        out["rpo_batch"] = [(id(self), self._batch[0])] * len(out["completion_ids"])
        return out

    def tracked(self, reward_func):
        """`reward_func` (a TRL reward function: a function, an async one, a callable object) unchanged, except
        that on a training batch of this rollout its rewards also choose each group's answer to keep in the
        cache; track exactly one (a second, or one tracked by another RPORollout, is a ValueError at its first
        batch; none, at the next rollout). Also logs (TRL's log_metric) rpo/cached_prompts, the cache's size."""
        def keep(rewards, kwargs):
            keys = kwargs.get("rpo_prompt_key")
            if keys is None:  # not a training batch of an RPORollout (an eval's: full completions, none kept)
                return rewards
            owner, number = (kwargs.get("rpo_batch") or [(None, None)])[0]
            if owner != id(self):
                raise ValueError("RPORollout.tracked: this reward function is tracked by another RPORollout than "
                                 "the trainer's rollout_func")
            if self._batch[1] or number != self._batch[0]:
                raise ValueError("RPORollout.tracked: a second tracked reward function for the same batch; track one")
            self._batch[1] = True
            self.update_cache(keys, kwargs["completion_ids"], rewards, kwargs.get("rpo_logprobs"),
                              kwargs["trainer_state"].global_step)
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                log_metric("rpo/cached_prompts", float(len(self.cache)))
            return rewards

        return wrap_reward(reward_func, keep)

    def update_cache(self, keys: list[str], answers: list[list[int]], rewards: list, logprobs: list | None,
                     step: int) -> None:
        """Keep one answer of each group (a run of equal keys, over every process's share of the batch) by its
        rewards (None, TRL's "no score": NaN)."""
        rewards = [math.nan if r is None else float(r) for r in rewards]
        if logprobs is None:
            logprobs = [None] * len(keys)
        (keys, answers, rewards, logprobs), _ = gather_columns(keys, [list(a) for a in answers], rewards,
                                                               [None if lp is None else list(lp) for lp in logprobs])
        for span in equal_runs(keys):
            key, group = keys[span.start], slice(span.start, span.stop)
            group_logprobs = None
            if all(lp is not None for lp in logprobs[group]):  # TRL may hand the ids back cut at the eos
                group_logprobs = [lp[:len(a)] for lp, a in zip(logprobs[group], answers[group])]
            self.cache.update(key, answers[group], rewards[group], step, self.rng(step, key, "keep"),
                              logprobs=group_logprobs)
            self.cache.note_group(key, all(r >= self.cache.correct_threshold for r in rewards[group]))

    def state_dict(self) -> dict:
        return {"cache": self.cache.state_dict(), "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])
        self.counters = dict(state["counters"])


STATE_FILE = "rpo_state.pt"  # the experience cache's file in each TRL checkpoint


def gather_lists(items: list) -> tuple[list, int]:
    """Every process's `items`, concatenated in process order, and where this process's begin (one process:
    `items`, 0). TRL hands each process a contiguous share of the batch, so this is the batch in order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items), 0
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part], sum(len(part) for part in parts[:dist.get_rank()])


def gather_columns(*columns: list) -> tuple[tuple[list, ...], int]:
    """gather_lists for parallel lists: each gathered, and where this process's rows begin."""
    rows, start = gather_lists(list(zip(*columns)))
    return tuple(list(column) for column in zip(*rows)) if rows else tuple([] for _ in columns), start


def prompt_key(ids: list[int]) -> str:
    """A prompt's key in the cache: a digest of its token ids (TRL's rows need no id column)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def wrap_reward(reward_func, after):
    """A TRL reward function that calls `reward_func` and returns after(its rewards, the call's kwargs), async
    where it is (an async function, an async __call__, a partial of one), under its TRL metric name."""
    from trl.trainer.utils import get_callable_name, is_async_callable

    if isinstance(reward_func, (str, torch.nn.Module)) or not callable(reward_func):
        raise ValueError(f"a reward function (TRL's signature) is wrapped here, not a {type(reward_func).__name__}: "
                         f"a reward model stays a plain entry of reward_funcs")
    if is_async_callable(reward_func):
        async def wrapped(**kwargs):
            return after(await reward_func(**kwargs), kwargs)
    else:
        def wrapped(**kwargs):
            return after(reward_func(**kwargs), kwargs)
    wrapped.__name__ = wrapped.__qualname__ = get_callable_name(reward_func)  # TRL logs rewards/<name>/mean
    wrapped.__doc__ = getattr(reward_func, "__doc__", None)
    return wrapped


def length_aware(accuracy_func, alpha: float = 0.1, correct_threshold: float = 0.5):
    """The RPO paper's accuracy reward as a TRL reward function (`--length-shaping` in our trainer): wraps
    `accuracy_func` (TRL's signature; a reward >= correct_threshold is a right answer) and, within each group
    (a run of equal prompts: TRL's num_generations copies), scores a right answer clip(sigmoid(alpha * (mean
    length of the group's right answers - its length)), 0.5, 1) and a wrong one 0 (rewards/shaping.py), lengths
    in tokens of the whole answer (completion_ids: with RPORollout, kept path + suffix); a None (TRL's
    "unscorable") stays None. Compose it under `tracked` (`rpo.tracked(length_aware(accuracy))`) to keep
    answers by it, as the trainer does. Under several processes the groups are gathered whole first."""
    def shape(rewards, kwargs):
        mine = len(rewards)
        # a group may straddle processes (TRL spreads its copies): shaped over every process's share
        (prompts, lengths, rewards), offset = gather_columns(
            [str(p) for p in kwargs["prompts"]], [len(c) for c in kwargs["completion_ids"]], list(rewards))
        right = [r is not None and r >= correct_threshold for r in rewards]
        shaped = [x for span in equal_runs(prompts)
                  for x in length_aware_accuracy(right[span.start:span.stop], lengths[span.start:span.stop], alpha)]
        shaped = [None if r is None else x for r, x in zip(rewards, shaped)]  # TRL's "unscorable" stays so
        return shaped[offset:offset + mine]

    return wrap_reward(accuracy_func, shape)


class SharedPrefixGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose log-prob passes (the loss's, and the old and the reference policy's) run each
    group's shared prefix once, as our trainer's update does (rpo_engine.model.shared_prefix). The rows of a
    batch with the same prompt form a group, and its prefix is their longest common prefix: the prompt, and
    under RPORollout the kept path too, most of each row. Each suffix attends to the prefix's keys and values,
    so the log-probs, entropies and gradients are the padded batch's (up to rounding; tested against
    GRPOTrainer's own pass), at the cost of one prefix a group instead of one a row. In the loss's pass a
    group whose advantages are all zero runs without gradient (its values feed TRL's metrics) where the loss
    has no KL term, entropy bonus or auxiliary loss: it adds exactly zero to the gradient then.
    `last_logprob_pass` tells what the last pass ran (rows, rows_with_gradient, groups, tokens).

        trainer = SharedPrefixGRPOTrainer(model=model, reward_funcs=..., args=config, rollout_func=RPORollout())

    Our decoder runs on the model's own Parameters (from_transformers: Llama, Qwen2, Qwen3, with PEFT LoRA
    adapters), under TRL's autocast; the LM head runs outside it, in the weights' dtype, as TRL's
    cast_lm_head_to_fp32 would. Under DDP (several processes, accelerate's default) the loss's pass runs as the
    forward of DDP's wrapper, which arms its gradient all-reduce. TRL's own pass runs instead, after one warning
    saying why, where sharing cannot: several processes without DDP (DeepSpeed, FSDP), vision inputs, a MoE
    auxiliary loss, a config's attention_dropout, a model from_transformers refuses.
    """

    def __init__(self, *args, **kwargs):
        check_trl_internals()
        super().__init__(*args, **kwargs)
        self._shared_models = {}  # our decoder per (model, its Parameters, head, PEFT state): _shared_model
        self._unshared_reasons = set()  # each fallback's warning, given once
        self._loss_advantages = None  # the loss's advantages while its pass runs (_compute_loss)
        self.last_logprob_pass = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        plain = functools.partial(super()._get_per_token_logps_and_entropies, model, input_ids, attention_mask,
                                  logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **multimodal)
        if compute_aux_loss or any(v is not None for v in multimodal.values()):
            return self._unshared(plain, "vision inputs or a MoE auxiliary loss")
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if torch.is_grad_enabled() and self.accelerator.num_processes > 1 and not ddp:
            return self._unshared(plain, "several processes without DDP (DeepSpeed, FSDP)")
        layout = trl_prefix_groups(input_ids, attention_mask, logits_to_keep)
        if layout is None:
            return self._unshared(plain, "a row whose prompt or completion mask is not one run of tokens")
        wrapper, model = model, self.accelerator.unwrap_model(model)
        if model.training and (getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
            return self._unshared(plain, "attention_dropout > 0 in the model's config (ours computes none)")
        try:
            ours = self._shared_model(model)
        except UserError as e:
            return self._unshared(plain, str(e))
        groups, members = layout
        # the groups whose loss has a gradient first, the others' values (for TRL's metrics) without one
        signal = self._rows_with_signal()
        trained = [signal is None or any(signal[r] for r in m) for m in members]
        if not any(trained):  # one group still runs: the loss keeps its graph, every parameter a (zero) gradient
            trained[0] = True
        passes = [(want, [g for g, t in zip(groups, trained) if t == want]) for want in (True, False)]
        rows = [r for want in (True, False) for m, t in zip(members, trained) if t == want for r in m]
        self.last_logprob_pass = dict(
            rows=len(rows), rows_with_gradient=sum(len(m) for m, t in zip(members, trained) if t), groups=len(groups),
            tokens=sum(len(g.prefix_ids) + sum(map(len, g.suffix_ids)) for g in groups))
        # samples in pass and group order -> TRL's rows
        order = torch.empty(len(rows), dtype=torch.long)
        order[torch.tensor(rows)] = torch.arange(len(rows))
        order = order.to(input_ids.device)

        def shared_pass():
            logps, entropies = [], []
            with self.accelerator.autocast():
                for with_gradient, some in passes:
                    with torch.set_grad_enabled(with_gradient and torch.is_grad_enabled()):
                        for chunk in _chunks(some, batch_size or len(rows)):
                            out = shared_prefix_logprobs(ours, chunk, self.temperature, with_entropy=compute_entropy)
                            logps.append(F.pad(out[0], (0, logits_to_keep - out[0].shape[1])))
                            if compute_entropy:
                                entropies.append(F.pad(out[2], (0, logits_to_keep - out[2].shape[1])))
            return torch.cat(logps)[order], torch.cat(entropies)[order] if compute_entropy else None

        logps, entropies = through_ddp(wrapper, shared_pass) if ddp and torch.is_grad_enabled() else shared_pass()
        return logps, entropies, None

    def _compute_loss(self, model, inputs):
        self._loss_advantages = inputs["advantages"]  # for _rows_with_signal, during this loss's pass
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_advantages = None

    def _rows_with_signal(self) -> list[bool] | None:
        """Per row of the loss's pass, whether its loss can have a gradient. Without a KL term, an entropy bonus
        or an auxiliary loss, every term of each of TRL's loss types is a multiple of the row's advantage, so a
        row whose advantages are all 0 adds exactly 0 (our trainer's skip of groups without signal). None:
        every row may (another pass, or a loss with such a term)."""
        advantages = self._loss_advantages
        if (advantages is None or not torch.is_grad_enabled() or self.beta != 0.0 or self.aux_loss_enabled
                or getattr(self, "_entropy_bonus_enabled", True)):  # (not knowing is "may")
            return None
        return (advantages.reshape(len(advantages), -1) != 0).any(-1).tolist()

    def _unshared(self, plain, why: str):
        if why not in self._unshared_reasons:
            self._unshared_reasons.add(why)
            warnings.warn(f"SharedPrefixGRPOTrainer: TRL's own log-prob pass runs here: {why}", stacklevel=3)
        return plain()

    def _shared_model(self, model):
        """Our decoder on `model`'s Parameters, one per state of its PEFT adapters (TRL's reference pass
        switches them off), built again where a Parameter was replaced, moved or resized; the few last kept. The
        transformers model's train mode (PEFT's lora_dropout) and gradient checkpointing followed."""
        built = self._shared_models
        head = model.get_output_embeddings().weight
        key = (id(model), tuple(map(id, model.parameters())), head.device, head.dtype, tuple(head.shape),
               peft_adapter_state(model))
        ours = built.pop(key, None)
        if ours is None:
            ours = from_transformers(model)
            for stale in [k for k in built if k[0] == key[0] and k[1:5] != key[1:5]]:  # on replaced Parameters
                del built[stale]  # (they would stay alive through it)
        built[key] = ours  # the most recent last
        while len(built) > 4:  # the policy and its reference, adapters on and off
            del built[next(iter(built))]
        ours.train(model.training)
        ours.gradient_checkpointing = checkpointing(model)
        return ours


# GRPOTrainer's internals that SharedPrefixGRPOTrainer replaces, as TRL 1.16 has them (their leading parameters)
TRL_LOGPROB_PASS = ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                    "compute_aux_loss")
TRL_COMPUTE_LOSS = ("self", "model", "inputs")


def check_trl_internals() -> None:
    """Refuse a TRL whose GRPOTrainer passes its log-prob pass or loss other arguments than TRL 1.16's: the
    override would be called wrongly, or not at all (a renamed method: TRL's own pass, silently)."""
    import trl

    found = []
    for name, expected in (("_get_per_token_logps_and_entropies", TRL_LOGPROB_PASS), ("_compute_loss", TRL_COMPUTE_LOSS)):
        method = getattr(GRPOTrainer, name, None)
        parameters = tuple(inspect.signature(method).parameters)[:len(expected)] if callable(method) else None
        if parameters != expected:
            found.append(f"{name}{'(' + ', '.join(parameters) + ')' if parameters is not None else ' missing'}")
    if found:
        raise RuntimeError(f"SharedPrefixGRPOTrainer replaces GRPOTrainer's internals as TRL 1.16 has them; TRL "
                           f"{trl.__version__} has {'; '.join(found)}: use GRPOTrainer, or TRL 1.16")


def through_ddp(wrapper, shared_pass):
    """shared_pass() run as the forward of the DDP `wrapper`'s module: DDP arms its gradient all-reduce in its own
    forward (a backward through our decoder alone would leave each process its own gradient, silently)."""
    module = wrapper.module
    own = module.__dict__.get("forward")  # an instance's forward (accelerate's autocast, TRL's fused head), or none
    module.forward = shared_pass
    try:
        return wrapper()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def checkpointing(model) -> bool:
    """Whether a transformers model recomputes its activations (transformers 5's name first, then 4's)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def trl_prefix_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logits_to_keep: int) -> tuple[list[PrefixGroup], list[list[int]]] | None:
    """TRL's batch (prompts left-padded, then logits_to_keep completion columns right-padded) as PrefixGroups:
    the rows with the same prompt, each group's prefix their longest common prefix, its loss from the first
    completion token on. -> (groups, members): members[i][j] is the batch row of group i's sample j. None where
    a row's prompt or completion is not one run of real tokens."""
    ids, mask = input_ids.tolist(), attention_mask.tolist()
    width = len(ids[0]) - logits_to_keep if ids else 0  # the prompt columns
    by_prompt: dict[tuple, list[tuple[int, list[int]]]] = {}
    for r, (row, row_mask) in enumerate(zip(ids, mask)):
        p, c = sum(row_mask[:width]), sum(row_mask[width:])
        if p == 0 or row_mask[width - p:width] != [1] * p or row_mask[width:width + c] != [1] * c:
            return None
        by_prompt.setdefault(tuple(row[width - p:width]), []).append((r, row[width:width + c]))
    groups = []
    for prompt, rows in by_prompt.items():
        sequences = [list(prompt) + completion for _, completion in rows]
        n = common_prefix_length(sequences)
        groups.append(PrefixGroup(sequences[0][:n], [s[n:] for s in sequences], loss_start=len(prompt)))
    return groups, [[r for r, _ in rows] for rows in by_prompt.values()]


def common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def _chunks(groups: list[PrefixGroup], rows: int) -> list[list[PrefixGroup]]:
    """Consecutive groups with at most `rows` samples a chunk (TRL's batch_size; a larger group alone)."""
    chunks, size = [], 0
    for g in groups:
        if not chunks or size + len(g.suffix_ids) > rows:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += len(g.suffix_ids)
    return chunks
