"""Training configuration: small dataclasses per concern, a YAML file, and CLI flags generated from them.

Every field is an option: `--learning-rate 1e-5` (or TRL's spelling, `--learning_rate 1e-5`) on the command
line, `learning_rate: 1e-5` in the YAML file (flat, or nested under the section names `rpo:` / `algo:`).
Precedence: defaults < YAML < flags. Names follow TRL's GRPOConfig where TRL has one (learning_rate, num_generations,
max_completion_length, beta, epsilon, epsilon_high, num_iterations, temperature, ...).
Validation happens once, in `__post_init__`, with messages that name the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from rpo_engine.errors import UserError
from rpo_engine.kernels.reference import KL_TYPES
from rpo_engine.reporting import report_targets
from rpo_engine.model.lora import TARGETS as LORA_TARGETS, parse_targets as parse_lora_targets
from rpo_engine.rollout.sequence import MIN_TEMPERATURE

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
# TRL's GRPOConfig.loss_type -> ours (verl's names). TRL's dr_grpo, like ours, divides by max_completion_length.
TRL_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                  "dr_grpo": "seq-mean-token-sum-norm", "cispo": "token-mean", "sapo": "seq-mean-token-mean",
                  "luspo": "seq-mean-token-sum", "vespo": "token-mean"}
CACHE_POLICIES = ("epsilon-greedy", "correct-only")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
RATIO_LEVELS = ("token", "sequence")  # TRL's importance_sampling_level: GRPO's per-token ratio, GSPO's per sequence
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # TRL's multi_objective_aggregation
FILTER_METRICS = ("acc", "reward")  # verl's algorithm.filter_groups.metric (its acc and seq_reward)
UNVERIFIED_CUTS = ("uniform", "least-likely", "full")
# Hugging Face's lr_scheduler_type names (the warmup is ours in each: it starts above 0, see optim.lr_multiplier)
LR_SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")
# apply_chat_template arguments that --chat-template-kwargs may not pass (messages: the template's own variable)
_ENCODING_ARGUMENTS = frozenset({"conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
                                 "padding", "truncation", "max_length", "return_tensors", "return_dict",
                                 "return_assistant_tokens_mask", "tokenizer_kwargs"})


def reward_names(config) -> list[str]:
    """The --reward functions, in order (the first is the accuracy)."""
    return [name.strip() for name in config.reward.split(",")]


def reward_weights(config) -> list[float]:
    """Each --reward function's weight (--reward-weights; 1 each by default)."""
    if config.reward_weights is None:
        return [1.0] * len(reward_names(config))
    return [float(w) for w in config.reward_weights.split(",")]


def stop_strings(value: str | None) -> list[str] | None:
    """The stop strings an option gives: a JSON list of strings ('["</answer>", "\\n\\n"]') or JSON string
    ('"\\n\\n"'), or any other text as the one string it is ('</answer>'); None for none."""
    if value is None:
        return None
    parsed = value  # a string: itself (`--stop 42` stops at "42")
    if value.startswith(("[", '"')):
        try:
            parsed = json.loads(value)
        except ValueError:  # not JSON after all ('[END]'): the string itself, unless it looks like a list
            if value[:2] in ('["', "['", "[ "):
                raise UserError(f"--stop {value!r} is not a JSON list of strings (double quotes, as in "
                                f"'[\"</answer>\", \"\\n\\n\"]')") from None
    if parsed is value and re.search(r"\\[ntr]", value):  # the shell passed a backslash and a letter, not a newline
        raise UserError(f"--stop {value!r} holds a backslash escape, which a plain value keeps as two characters; "
                        f"write it as JSON, e.g. '\"\\n\\n\"' or '[\"</answer>\", \"\\n\\n\"]'")
    strings = [parsed] if isinstance(parsed, str) else parsed
    if not isinstance(strings, list) or not strings or not all(isinstance(x, str) and x for x in strings):
        raise UserError(f"--stop must be a string or a JSON list of non-empty strings, e.g. '[\"</answer>\"]', "
                        f"got {value!r}")
    return strings


def warmup_length(config) -> int:
    """The warmup in optimizer steps: --warmup-steps as transformers 5 reads it (N >= 1 steps, below 1 a
    fraction), else --warmup-ratio; a fraction of --steps is rounded up, as Hugging Face rounds it."""
    if config.warmup_steps is not None and config.warmup_steps >= 1:
        return int(config.warmup_steps)
    return math.ceil(config.steps * (config.warmup_ratio if config.warmup_steps is None else config.warmup_steps))


def _check(cond: bool, message: str):
    if not cond:
        raise UserError(message)


def _reject_given(config, names: tuple[str, ...], why: str) -> None:
    """Options `names` set off their defaults where they do nothing (`why`, e.g. "without --use-peft") are an
    error, not a run that quietly ignores them; a file or flag that repeats a default stays harmless."""
    defaults = {f.name: f.default for f in fields(config)}
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(config, name) != defaults[name]]
    if given:
        listed = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        raise UserError(f"{listed} {'does' if len(given) == 1 else 'do'} nothing {why}")


def _take_types(config) -> None:
    """Each option's value as its type, as config_from_dict types a YAML file's (an int for a float, a number
    written as text for a float; here also a path object for a path, as its string). A config built in Python
    passes no such reading: a string for a number was a TypeError deep in the checks, a section given as its name
    an AttributeError, and "false" for a bool was taken as true."""
    source = type(config).__name__
    sections = {cls.__name__: cls for cls in SECTIONS.values()}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.type in sections:
            if not isinstance(value, sections[f.type]):
                example = {"AlgoConfig": "algo='dapo'", "RPOConfig": "rpo_max_cut=300"}[f.type]
                raise UserError(f"{source}: {f.name} must be an {f.type} (rpo_engine.config.{f.type}({example})), "
                                f"got {value!r}")
            continue
        if f.type.startswith("str") and isinstance(value, os.PathLike):
            value = os.fspath(value)
        setattr(config, f.name, _typed(f.name, f.type, value, source))


def _check_finite(config) -> None:
    """Every float option a finite number: a NaN passes every `x > 0` check as False and every `x <= 1` too,
    so without this `--weight-decay nan` trained to NaN weights without a word."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


FLOAT32_MAX = 3.4028234663852886e38


# a reward scale's bound leaves float32 room for the sums of a batch's rewards (3e38 overflowed a group's)
REWARD_SCALE_MAX = 1e30
_REWARD_SCALES = ("reward_weights", "format_reward_weight", "overlong_penalty")


def _check_float32(name: str, value: float) -> None:
    """A value that reaches a float32 tensor (the loss kernels' arguments, the learning rate, the rewards) within
    its range: past it the first update raised "value cannot be converted to type float without overflow", or a
    reward of inf made the advantages NaN and skipped every update."""
    limit = REWARD_SCALE_MAX if name in _REWARD_SCALES else FLOAT32_MAX
    _check(abs(value) <= limit, f"--{name.replace('_', '-')} must be at most {limit:.2g} in size (the loss "
                                f"and the rewards are computed in float32), got {value:g}")


_KL_ALIASES = {"low_var_kl": "k3", "kl": "k1", "mse": "k2"}  # verl's names of the estimators


def greedy_filter(top_k: int, min_p: float) -> str | None:
    """The filter that leaves one candidate token a step, so sampling is greedy at any temperature ("--top-k 1",
    "--min-p 1.0"); None where neither does."""
    if top_k == 1:
        return f"--top-k {top_k}"
    return f"--min-p {min_p}" if min_p == 1 else None


def overlong_buffer(algo: "AlgoConfig", max_completion_length: int) -> int:
    """DAPO's overlong shaping: the last tokens of the budget where a longer answer is penalized (0: none; --algo
    dapo's default, a quarter of the budget)."""
    buffer = algo.overlong_buffer
    return max_completion_length // 4 if buffer is None and algo.algo == "dapo" else buffer or 0


@dataclass
class RPOConfig:
    """Partial Reasoning Optimization: regenerate only the tail of each prompt's cached reasoning path."""
    rpo: bool = field(default=True, metadata={"help": "generate suffixes from cached paths (--no-rpo: full-path GRPO/DAPO)"})
    rpo_min_cut: int = field(default=1, metadata={"help": "fewest tokens cut from the end of a cached path"})
    rpo_max_cut: int = field(default=300, metadata={"help": "most tokens cut from the end of a verified path (the paper's code: 1..299)"})
    rpo_max_cut_fraction: float = field(default=0.25, metadata={"help": "never cut more than this fraction of a verified path, nor less than --rpo-min-cut (runs where each prompt recurs many times kept their accuracy better at 0.5: README)"})
    rpo_saturated_cut_growth: float = field(default=1.0, metadata={
        "help": "each consecutive visit on which all of a prompt's G answers were right (a group without signal) "
                "multiplies the next cut of its verified path, fraction and token cap, by this, up to the whole "
                "path; a right answer came back right from a shallow cut, so regrow more of it (1: the cut stays "
                "fixed; 2: a quarter, then half, then all)"})
    rpo_unverified_cut_fraction: float = field(default=1.0, metadata={
        "help": "a path not verified correct (a cold start's, or a wrong answer kept in its place) is cut by up to "
                "this fraction of it, with no token cap (the paper's code cuts a cold-start path anywhere)"})
    rpo_unverified_cut: str = field(default="uniform", metadata={
        "help": f"where a path not verified correct is cut, within that bound: {UNVERIFIED_CUTS}; uniform draws "
                "the cut (the paper's code); least-likely regenerates it from its least likely token (by the "
                "log-prob it was sampled with), where a wrong path most often went wrong: fewer tokens with one "
                "starter model; with a weaker one 2.3 eval points lower over 40 steps, 1.6 higher over 120 (benchmarks/RESULTS.md); "
                "full regenerates it whole (a full completion, --max-completion-length tokens), so RPO continues "
                "only paths known to be right"})
    rpo_extra_budget: int = field(default=16, metadata={"help": "suffix budget = cut + this many tokens"})
    rpo_cache_policy: str = field(default="correct-only", metadata={
        "help": f"cache update rule: {CACHE_POLICIES} (paper: epsilon-greedy; correct-only never replaces a correct path by a wrong answer)"})
    rpo_epsilon: float = field(default=0.5, metadata={"help": "probability of caching the best completion by length-shaped accuracy (else a random one)"})
    rpo_loss_on_prefix: bool = field(default=False, metadata={"help": "also train on the cached-prefix tokens"})
    length_shaping: bool = field(default=True, metadata={"help": "length-aware accuracy reward among a group's correct answers"})
    length_alpha: float = field(default=0.1, metadata={"help": "sigmoid slope of the length-aware reward"})

    def __post_init__(self):
        _take_types(self)
        _check_finite(self)
        _check(self.rpo_min_cut >= 1, f"--rpo-min-cut must be >= 1, got {self.rpo_min_cut}")
        _check(self.rpo_max_cut >= self.rpo_min_cut,
               f"--rpo-max-cut ({self.rpo_max_cut}) must be >= --rpo-min-cut ({self.rpo_min_cut})")
        _check(0 < self.rpo_max_cut_fraction <= 1, f"--rpo-max-cut-fraction must be in (0, 1], got {self.rpo_max_cut_fraction}")
        _check(self.rpo_saturated_cut_growth >= 1,
               f"--rpo-saturated-cut-growth must be >= 1, got {self.rpo_saturated_cut_growth}")
        _check(0 < self.rpo_unverified_cut_fraction <= 1,
               f"--rpo-unverified-cut-fraction must be in (0, 1], got {self.rpo_unverified_cut_fraction}")
        _check(self.rpo_unverified_cut in UNVERIFIED_CUTS,
               f"--rpo-unverified-cut must be one of {UNVERIFIED_CUTS}, got {self.rpo_unverified_cut!r}")
        _check(self.rpo_extra_budget >= 0, f"--rpo-extra-budget must be >= 0, got {self.rpo_extra_budget}")
        _check(self.rpo_cache_policy in CACHE_POLICIES,
               f"--rpo-cache-policy must be one of {CACHE_POLICIES}, got {self.rpo_cache_policy!r}")
        _check(0 <= self.rpo_epsilon <= 1, f"--rpo-epsilon must be in [0, 1], got {self.rpo_epsilon}")
        _check(self.length_alpha > 0, f"--length-alpha must be > 0, got {self.length_alpha}")
        if not self.length_shaping:
            _reject_given(self, ("length_alpha",), "with --no-length-shaping")
        if self.rpo_unverified_cut == "full":
            _reject_given(self, ("rpo_unverified_cut_fraction",),
                          "with --rpo-unverified-cut full (it regrows a path not verified correct whole)")


@dataclass
class AlgoConfig:
    """GRPO or DAPO. `algo` picks the defaults of the fields left as None."""
    algo: str = field(default="grpo", metadata={"help": "grpo or dapo"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range of the ratio (eps_low)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip range (default: grpo the same as --epsilon, dapo 0.28)"})
    beta: float | None = field(default=None, metadata={"help": "KL coefficient to the frozen reference (default 0: no reference model)"})
    loss_agg: str | None = field(default=None, metadata={"help": f"{LOSS_AGGREGATIONS} (default: grpo seq-mean-token-mean, dapo token-mean)"})
    loss_type: str | None = field(default=None, metadata={"help": "TRL's name for the aggregation, instead of --loss-agg: grpo (seq-mean-token-mean), bnpo or dapo (token-mean), dr_grpo (seq-mean-token-sum-norm, over --max-completion-length); or cispo (MiniMax-M1: token-mean, each token's log-prob weighted by its ratio capped at --epsilon-high, which is then the cap itself, as in TRL, and must be given: TRL recommends 5.0, ScaleRL's eps_max) or sapo (seq-mean-token-mean, a sigmoid gate of the ratio in place of the clip, --sapo-temperature-pos/-neg) or luspo (seq-mean-token-sum: GSPO with each sequence's loss scaled by its length, meant with --importance-sampling-level sequence) or vespo (token-mean, each token's log-prob weighted by a gamma function of its sequence's importance ratio, --vespo-k-pos/--vespo-lambda-pos/--vespo-k-neg/--vespo-lambda-neg, in place of the clip) (default: none)"})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "--loss-type sapo: the gate's temperature for tokens with a positive advantage (TRL's name)"})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "--loss-type sapo: the gate's temperature for the others (TRL's name)"})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "--loss-type vespo: the power k of the weight e^lambda w^k e^(-lambda w) of a sequence with a nonnegative advantage, w its importance ratio: how hard w < 1 is down-weighted (TRL's name)"})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "--loss-type vespo: the decay lambda of that weight, how hard w > 1 is down-weighted (TRL's name)"})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "--loss-type vespo: k for a sequence with a negative advantage (TRL's name)"})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "--loss-type vespo: lambda for a sequence with a negative advantage (TRL's name)"})
    kl_loss_type: str = field(default="k3", metadata={"help": "the per-token estimate of KL(policy || reference) that --beta weighs, x = logp - ref_logp (verl's name and values): k3 or low_var_kl, exp(-x) + x - 1 (TRL's, verl's default; verl also clamps it to [-10, 10], we do not); k1 or kl, x; k2 or mse, x^2 / 2, whose gradient x is the reverse KL's for on-policy samples; abs, |x| (the metric kl is its mean)"})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "weight each token's KL term by its importance ratio (differentiable), so the KL's gradient is the unbiased gradient of the reverse KL, ratio * (logp - ref_logp), where the k3 estimator's own gradient is biased (TRL's name, on by default there; DeepSeek-V3.2); token level only; needs --beta > 0 (default: off, verl's low_var_kl)"})
    sync_ref_model: bool = field(default=False, metadata={"help": "move the KL reference toward the policy every --ref-model-sync-steps steps: ref = alpha * policy + (1 - alpha) * ref (TRL's name, TR-DPO); needs --beta > 0; checkpoints then hold the reference too"})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "alpha of --sync-ref-model (TRL's name)"})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "steps between reference syncs of --sync-ref-model (TRL's name)"})
    num_iterations: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    ppo_mini_batch_size: int | None = field(default=None, metadata={"help": "prompts (groups) per optimizer step: each pass splits the rollout batch into ceil(groups / this) mini-batches, one optimizer step each, the ratio taken against the rollout's log-probs (verl's name; TRL's steps_per_generation = that many x gradient_accumulation_steps) (default: the whole batch, one step a pass)"})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={"help": "how several reward terms (the --reward functions, the format bonus, the overlong penalty) make the advantage (TRL's name and values): sum_then_normalize adds their weighted scores, then --scale-rewards applies; normalize_then_sum (GDPO) normalizes each term within its group first, sums them weighted, and scales by the batch's std (--scale-rewards does not apply)"})
    scale_rewards: str = field(default="group", metadata={"help": "divide each advantage r - group mean by the std of the group's rewards (group), of the whole batch's (batch: Lite PPO) or by nothing (none: Dr.GRPO) (TRL's name and values; true / false in YAML: group / none)"})
    dynamic_sampling: bool | None = field(default=None, metadata={"help": "drop groups without signal and sample more prompts (default: dapo on)"})
    dynamic_sampling_metric: str = field(default="acc", metadata={"help": f"which groups dynamic sampling drops (verl's filter_groups.metric): {FILTER_METRICS}; acc: those whose accuracy scores (the first --reward function's, before any shaping) are all equal, so all right or all wrong with a right/wrong reward (the DAPO paper's rule); reward: those whose rewards are all equal (a length penalty or a second function can tell apart answers that are all wrong)"})
    max_resample_rounds: int = field(default=3, metadata={"help": "extra sampling rounds allowed to fill a dynamic-sampling batch; past them the step trains on the groups it has, or skips its update when it has none (verl stops the run with an error)"})
    overlong_buffer: int | None = field(default=None, metadata={"help": "soft overlong penalty over the last N budget tokens (default: dapo L/4, grpo 0)"})
    overlong_penalty: float = field(default=1.0, metadata={"help": "reward subtracted at the very end of the overlong buffer"})
    importance_sampling_correction: bool = field(default=False, metadata={"help": "weight each token's surrogate by p_train / p_rollout, the training forward's probability of the token over the one it was sampled with, truncated or masked at --importance-sampling-clip-max (and -clip-min) (TRL's vllm_importance_sampling_correction, on there by default for vLLM's different kernels); here the rollout reads the trained weights and in fp32 matches the training forward exactly: for bf16 GPU runs and --lora-merged-rollout"})
    importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": f"{IS_MODES} (TRL's names): per token or per sequence (the product of its tokens' ratios); truncate clips the ratio at the cap (and the floor, --importance-sampling-clip-min), mask zeroes it above the cap (or below the floor)"})
    importance_sampling_clip_max: float = field(default=3.0, metadata={"help": "the cap of the importance-sampling ratio, above the on-policy ratio 1 (TRL's vllm_importance_sampling_clip_max)"})
    importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "the floor of the importance-sampling ratio, below the on-policy ratio 1: truncate raises a ratio below it to it, mask zeroes it (TRL's vllm_importance_sampling_clip_min) (default: none, no floor)"})
    delta: float | None = field(default=None, metadata={"help": "two-sided clipping (TRL's name; INTELLECT-2): the ratio of a token with a negative advantage is capped at delta, so one unlikely token cannot make the loss unbounded; must be > 1 + epsilon_high (INTELLECT-2: 4) (default: off)"})
    importance_sampling_level: str = field(default="token", metadata={"help": "token (GRPO: a ratio per token) or sequence (GSPO: one ratio per completion, the exp of its tokens' mean log-ratio, clipped as a token's; the GSPO paper clips at --epsilon 3e-4 --epsilon-high 4e-4) (TRL's name)"})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "keep in the policy-gradient term (not the KL) only the tokens whose entropy is in this top fraction of the step's, the policy's entropy before the update over every rank's trained tokens with a nonzero advantage (TRL's name; 'Beyond the 80/20 rule' trains on the top 0.2); 1 keeps all; below 1 the update runs one more forward without gradient"})
    off_policy_mask_threshold: float | None = field(default=None, metadata={"help": "DeepSeek-V3.2's off-policy sequence masking (TRL's name): a sample with a negative advantage whose mean log p_rollout - log p_current over its generated tokens exceeds this is left out of the policy-gradient term (not the KL), so stale negative samples cannot destabilise a step; e.g. 0.5. In fp32 the rollout's log-probs are the training forward's, so it acts off-policy only: --num-iterations > 1, --ppo-mini-batch-size, bf16 GPU runs, --lora-merged-rollout (default: off)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus: subtract this times the policy's mean entropy over the step's trained tokens (every rank's; those --top-entropy-quantile keeps) from the loss, to keep the policy from collapsing (TRL's name; verl's entropy_coeff, which takes the mean as its loss_agg_mode aggregates). The zero-advantage skip is then off: every group carries the bonus's gradient (default: 0, off)"})
    use_adaptive_entropy: bool = field(default=False, metadata={"help": "Skywork-OR1's adaptive entropy control (TRL's name): after each optimizer step --entropy-coef moves by --entropy-coef-delta, up while the measured entropy is at or below --entropy-target and down otherwise (within --entropy-coef-min/-max), and the bonus applies only while the last measured entropy is at or below the target"})
    entropy_coef_min: float = field(default=0.0, metadata={"help": "lower bound of the adaptive --entropy-coef (TRL's name)"})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "upper bound of the adaptive --entropy-coef (TRL's name)"})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "step of the adaptive --entropy-coef per optimizer step (TRL's name)"})
    entropy_target: float = field(default=0.2, metadata={"help": "entropy (nats, mean over the trained tokens) the adaptive control holds the policy above (TRL's name); set it near the `entropy` metric of the first steps"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "leave completions that ran out of budget (no EOS; with RPO, the suffix's budget) out of the loss, still counted in their group's advantages (TRL's name; DAPO's overlong filtering)"})

    def __post_init__(self):
        _take_types(self)
        _check_finite(self)
        for f in fields(self):
            if isinstance(getattr(self, f.name), float):
                _check_float32(f.name, getattr(self, f.name))
        _check(self.algo in ("grpo", "dapo"), f"--algo must be grpo or dapo, got {self.algo!r}")
        dapo = self.algo == "dapo"
        if self.loss_type == "cispo":  # TRL's convention: epsilon_high is the cap of the weight itself
            _check(self.epsilon_high is not None and self.epsilon_high > 1,
                   f"--loss-type cispo caps each token's importance weight at --epsilon-high: give it, above 1 "
                   f"(got {self.epsilon_high})")
            _check(self.importance_sampling_level == "token",
                   "--loss-type cispo weighs each token's log-prob by its own capped ratio: no sequence level")
        if self.loss_type == "vespo":
            _check(self.importance_sampling_level == "token",
                   "--loss-type vespo weighs each sequence by its summed token log-ratios: no sequence level")
            _check(min(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg) >= 0,
                   "--vespo-k-pos, --vespo-lambda-pos, --vespo-k-neg and --vespo-lambda-neg must be >= 0")
        _check(self.delta is None or self.surrogate == "clip",
               f"--delta caps the clipped ratio; --loss-type {self.loss_type} has none")
        if self.surrogate in ("sapo", "vespo"):
            # epsilon_high as its default resolves (a run's config.json records it so) is not "given"
            resolved = self.epsilon_high in (None, 0.28 if dapo else self.epsilon)
            _reject_given(self, ("epsilon",) if resolved else ("epsilon", "epsilon_high"),
                          f"with --loss-type {self.loss_type}: it has no clipped ratio")
        if self.surrogate == "cispo":
            _reject_given(self, ("epsilon",), "with --loss-type cispo: it caps the ratio above only, at --epsilon-high")
        _check(self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0,
               "--sapo-temperature-pos and --sapo-temperature-neg must be > 0")
        if self.epsilon_high is None:
            self.epsilon_high = 0.28 if dapo else self.epsilon
        if self.beta is None:
            self.beta = 0.0
        if self.loss_type is not None:
            _check(self.loss_type in TRL_LOSS_TYPES,
                   f"--loss-type must be one of {tuple(TRL_LOSS_TYPES)}, got {self.loss_type!r}")
            _check(self.loss_agg in (None, TRL_LOSS_TYPES[self.loss_type]),
                   f"--loss-type {self.loss_type} is --loss-agg {TRL_LOSS_TYPES[self.loss_type]}, "
                   f"not {self.loss_agg}: give one of the two")
            self.loss_agg = TRL_LOSS_TYPES[self.loss_type]
        if self.loss_agg is None:
            self.loss_agg = "token-mean" if dapo else "seq-mean-token-mean"
        if self.dynamic_sampling is None:
            self.dynamic_sampling = dapo
        _check(self.loss_agg in LOSS_AGGREGATIONS, f"--loss-agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        _check(self.epsilon >= 0 and self.epsilon_high >= 0, "--epsilon and --epsilon-high must be >= 0")
        # the ratio's lower clip bound is 1 - epsilon: the loss kernel refused >= 1 mid-run, with a traceback
        _check(self.epsilon < 1, f"--epsilon must be < 1, got {self.epsilon}")
        _check(self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        self.kl_loss_type = _KL_ALIASES.get(self.kl_loss_type, self.kl_loss_type)
        _check(self.kl_loss_type in KL_TYPES, f"--kl-loss-type must be one of k3 (low_var_kl), k1 (kl), k2 (mse) or "
                                              f"abs, got {self.kl_loss_type!r}")
        _check(not self.use_bias_correction_kl or self.beta > 0,
               "--use-bias-correction-kl weights the KL term: it needs --beta > 0")
        if not self.beta:
            _reject_given(self, ("kl_loss_type",), "without --beta > 0 (no KL term)")
        _check(not self.use_bias_correction_kl or self.kl_loss_type == "k3",
               f"--use-bias-correction-kl corrects k3's gradient: --kl-loss-type k3, got {self.kl_loss_type}")
        _check(not self.use_bias_correction_kl or self.importance_sampling_level == "token",
               "--use-bias-correction-kl weighs each token's KL by its own ratio: --importance-sampling-level token")
        _check(not self.sync_ref_model or self.beta > 0,
               "--sync-ref-model needs --beta > 0 (without a KL term there is no reference to sync)")
        _check(0 < self.ref_model_mixup_alpha <= 1,
               f"--ref-model-mixup-alpha must be in (0, 1], got {self.ref_model_mixup_alpha}")
        _check(self.ref_model_sync_steps >= 1, f"--ref-model-sync-steps must be >= 1, got {self.ref_model_sync_steps}")
        _check(self.num_iterations >= 1, f"--num-iterations must be >= 1, got {self.num_iterations}")
        _check(self.ppo_mini_batch_size is None or self.ppo_mini_batch_size >= 1,
               f"--ppo-mini-batch-size must be >= 1, got {self.ppo_mini_batch_size}")
        _check(self.max_resample_rounds >= 0, f"--max-resample-rounds must be >= 0, got {self.max_resample_rounds}")
        _check(self.dynamic_sampling_metric in FILTER_METRICS,
               f"--dynamic-sampling-metric must be one of {FILTER_METRICS}, got {self.dynamic_sampling_metric!r}")
        _check(self.overlong_buffer is None or self.overlong_buffer >= 0, "--overlong-buffer must be >= 0")
        # below 0 it would reward running over the budget
        _check(self.overlong_penalty >= 0, f"--overlong-penalty must be >= 0, got {self.overlong_penalty}")
        _check(self.importance_sampling_mode in IS_MODES,
               f"--importance-sampling-mode must be one of {IS_MODES}, got {self.importance_sampling_mode!r}")
        # an on-policy token's ratio is 1: a mask mode's cap at or below it drops tokens sampled from the very weights
        # trained (0.5 masked all of them, a run that trained nothing; 1 about half, by rounding), and a truncate
        # mode's cap below it scales every token's weight down
        masks = self.importance_sampling_mode.endswith("mask")
        _check(self.importance_sampling_clip_max > 1 if masks else self.importance_sampling_clip_max >= 1,
               f"--importance-sampling-clip-max must be {'> 1' if masks else '>= 1'} with --importance-sampling-mode "
               f"{self.importance_sampling_mode} (an on-policy token's ratio is 1), got {self.importance_sampling_clip_max}")
        # the cap's rule mirrored below 1: a mask mode's floor at 1 drops on-policy tokens (about half, by rounding),
        # a truncate mode's above 1 scales every token's weight up; a negative one is a slip (a ratio is positive)
        floor = self.importance_sampling_clip_min
        if floor is not None:
            _check(0 <= floor < 1 if masks else 0 <= floor <= 1,
                   f"--importance-sampling-clip-min must be >= 0 and {'< 1' if masks else '<= 1'} with "
                   f"--importance-sampling-mode {self.importance_sampling_mode} (a ratio is positive, an on-policy "
                   f"token's is 1), got {floor}")
            # TRL's rule; only truncate's [1, 1] reaches it here: every weight 1, a correction that corrects nothing
            _check(floor < self.importance_sampling_clip_max,
                   f"--importance-sampling-clip-min ({floor}) must be < --importance-sampling-clip-max "
                   f"({self.importance_sampling_clip_max})")
        _check(self.multi_objective_aggregation in AGGREGATIONS,
               f"--multi-objective-aggregation must be one of {AGGREGATIONS}, got {self.multi_objective_aggregation!r}")
        _check(self.scale_rewards in SCALE_REWARDS,
               f"--scale-rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        _check(self.importance_sampling_level in RATIO_LEVELS,
               f"--importance-sampling-level must be one of {RATIO_LEVELS}, got {self.importance_sampling_level!r}")
        _check(0 <= self.top_entropy_quantile <= 1,
               f"--top-entropy-quantile must be in [0, 1], got {self.top_entropy_quantile}")
        _check(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold > 0,
               f"--off-policy-mask-threshold must be > 0, got {self.off_policy_mask_threshold}")
        _check(self.entropy_coef >= 0, f"--entropy-coef must be >= 0, got {self.entropy_coef}")
        if self.use_adaptive_entropy:
            _check(0 <= self.entropy_coef_min <= self.entropy_coef_max,
                   f"--entropy-coef-min ({self.entropy_coef_min}) must be >= 0 and <= --entropy-coef-max "
                   f"({self.entropy_coef_max})")
            _check(self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max,
                   f"--entropy-coef ({self.entropy_coef}) must lie in [--entropy-coef-min, --entropy-coef-max] = "
                   f"[{self.entropy_coef_min}, {self.entropy_coef_max}] with --use-adaptive-entropy")
            _check(self.entropy_coef_max > 0, "--use-adaptive-entropy does nothing with --entropy-coef-max 0: the "
                                              "coefficient stays 0 (no bonus)")
            _check(self.entropy_coef_delta > 0, f"--entropy-coef-delta must be > 0, got {self.entropy_coef_delta}")
            _check(self.entropy_target >= 0, f"--entropy-target must be >= 0, got {self.entropy_target}")
        _check(self.delta is None or self.delta > 1 + self.epsilon_high,
               f"--delta must be > 1 + epsilon_high = {1 + self.epsilon_high:g} (else it clips positive advantages "
               f"too), got {self.delta}")
        if self.surrogate != "sapo":
            _reject_given(self, ("sapo_temperature_pos", "sapo_temperature_neg"), "without --loss-type sapo")
        if self.surrogate != "vespo":
            _reject_given(self, ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                          "without --loss-type vespo")
        if not self.importance_sampling_correction:
            _reject_given(self, ("importance_sampling_mode", "importance_sampling_clip_max",
                                 "importance_sampling_clip_min"),
                          "without --importance-sampling-correction")
        if not self.use_adaptive_entropy:
            _reject_given(self, ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"),
                          "without --use-adaptive-entropy")
        if not self.sync_ref_model:
            _reject_given(self, ("ref_model_mixup_alpha", "ref_model_sync_steps"), "without --sync-ref-model")
        if not self.dynamic_sampling:
            _reject_given(self, ("dynamic_sampling_metric", "max_resample_rounds"),
                          "without dynamic sampling (--algo dapo, or --dynamic-sampling)")
        if not (self.overlong_buffer or (self.overlong_buffer is None and dapo)):  # the trainer's overlong_buffer()
            _reject_given(self, ("overlong_penalty",),
                          "without an overlong buffer (--overlong-buffer N > 0; --algo dapo has one by default)")
        if not self.overlong_penalty and self.overlong_buffer:  # (--algo dapo's default buffer with 0: shaping off)
            _reject_given(self, ("overlong_buffer",), "with --overlong-penalty 0 (it subtracts 0 from every reward)")
        if self.multi_objective_aggregation == "normalize_then_sum":
            _reject_given(self, ("scale_rewards",),
                          "with --multi-objective-aggregation normalize_then_sum (it scales by the batch's std)")

    @property
    def surrogate(self) -> str:
        """policy_loss's surrogate: CISPO's capped weight, SAPO's gate, VESPO's gamma weight, or PPO's clipped ratio."""
        return self.loss_type if self.loss_type in ("cispo", "sapo", "vespo") else "clip"

    @property
    def entropy_bonus(self) -> bool:
        """Whether the loss carries an entropy bonus (adaptive control may still gate it off on a step)."""
        return self.entropy_coef > 0 or self.use_adaptive_entropy

    @property
    def loss_eps_high(self) -> float:
        """policy_loss's eps_high: the ratio's upper clip is 1 + eps_high; under CISPO, --epsilon-high is the
        cap itself (TRL's convention)."""
        return self.epsilon_high - 1 if self.surrogate == "cispo" else self.epsilon_high


_DEFAULT_OUTPUT = "runs/default"


@dataclass
class TrainConfig:
    model: str | None = field(default=None, metadata={"help": "Hugging Face model directory, or a Hub id (org/name) in the local cache or to download (default: the built-in starter model)"})
    dataset: str | None = field(default=None, metadata={"help": "JSONL/Parquet rows with prompt and answer, a `datasets` save_to_disk directory, a Hugging Face Hub dataset id (org/name, in the local cache or to download; needs `datasets`) or such a repository's directory (hf download --local-dir, a git clone, or train.jsonl beside test.jsonl) (default: the built-in arithmetic task)"})
    shuffle_dataset: bool = field(default=True, metadata={"help": "each epoch in a fresh order, seeded by --seed and the epoch (TRL's name; --no-shuffle-dataset: the dataset's own order, e.g. a curriculum)"})
    train_size: int = field(default=64, metadata={"help": "built-in task: training problems; each recurs every train_size / prompts_per_step steps, where RPO's cache pays off"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out rows for eval, as --dataset takes them (default: the built-in task's eval split, or none)"})
    dataset_config: str | None = field(default=None, metadata={"help": "a Hub (or repository directory) dataset's configuration, e.g. main for openai/gsm8k (TRL's name)"})
    dataset_train_split: str = field(default="train", metadata={"help": "the split of a --dataset with splits (a Hub id, a repository directory, a DatasetDict) to train on (TRL's name)"})
    dataset_test_split: str = field(default="test", metadata={"help": "the split of a --eval-dataset with splits (a Hub id, a repository directory, a DatasetDict) to evaluate on (TRL's name)"})
    dataset_prompt_column: str = field(default="prompt", metadata={"help": "the dataset field read as the prompt, e.g. question (GSM8K)"})
    dataset_answer_column: str = field(default="answer", metadata={"help": "the dataset field read as the reference answer (a dotted path reads a nested one: reward_model.ground_truth in verl's Parquet)"})
    filter_overlong_prompts: bool = field(default=False, metadata={"help": "leave out of the training and eval sets the rows whose prompts have more tokens than --max-prompt-length allows, saying how many (verl's name; off: such a prompt is an error naming its row)"})
    output: str = field(default=_DEFAULT_OUTPUT, metadata={"help": "output directory (metrics.jsonl, checkpoints, final/)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in --output"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "resume from this checkpoint, OUTPUT/checkpoints/step-N, rather than the newest (TRL's name; implies --resume; --output defaults to its run): what the run wrote after it, the later checkpoints and final/, is kept aside as NAME.superseded, and the logs are cut back to step N (default: none)"})
    config: str | None = field(default=None, metadata={"help": "YAML file of options (flags override it)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    steps: int = field(default=40, metadata={"help": "training steps"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step (B)"})
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    max_prompt_length: int = field(default=512, metadata={"help": "longest prompt in tokens; longer is an error"})
    max_completion_length: int = field(default=320, metadata={"help": "token budget of a full completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    min_p: float = field(default=0.0, metadata={"help": "min-p sampling: drop tokens less likely than min_p times the most likely one (0: off)"})
    stop: str | None = field(default=None, metadata={"help": "end a completion at the token that completes this string in its text, kept as a stop token is; several: a JSON list, '[\"</answer>\", \"\\n\\n\"]' (vLLM's name and rule: the generated text, and an RPO suffix's kept path, which is part of the answer; not the prompt); the evals stop there too (default: none)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divide the logit of each token already in the prompt or the completion by this where positive, multiply where negative, before the temperature (TRL's name; transformers' and vLLM's rule): above 1 discourages repeats; the rollout's log-probs stay the policy's, without it, as training recomputes them; the evals decode without it, as without the temperature (1: off)"})
    learning_rate: float = field(default=1.5e-5, metadata={"help": "peak learning rate (AdamW; the default suits the built-in starter model, use ~1e-6 for 1B+ models)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps (rounded up, as Hugging Face rounds it) of linear warmup before the decay (none with --lr-scheduler-type constant)"})
    warmup_steps: float | None = field(default=None, metadata={"help": "the warmup as transformers 5 (TRL 1.x) gives it, in place of --warmup-ratio: N >= 1 steps, or below 1 a fraction of --steps, rounded up (default: none, --warmup-ratio applies)"})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": f"learning-rate decay after the warmup (Hugging Face's names): {', '.join(LR_SCHEDULERS)}; cosine_with_min_lr ends at 10%% of the peak, cosine and linear at 0 (Hugging Face's default is linear)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2 (Hugging Face's default is 0.999)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient's global norm to this (0: no clipping)"})
    micro_batch_tokens: int = field(default=16384, metadata={"help": "token budget of one forward/backward micro-batch (a shared prefix counts once)"})
    prefix_sharing: bool = field(default=True, metadata={"help": "run each group's shared prefix once in the update's forward/backward (--no-prefix-sharing: one padded row per sample)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters on the frozen base model instead of every weight (TRL's name): the memory of a 7-8B model on one GPU; the KL reference is the base, checkpoints hold the adapter, final/ the merged model and final-adapter/ the adapter in PEFT's layout"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use-peft)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale: the weight update is B A * alpha / r (with --use-peft)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r (TRL's and PEFT's name; with --use-peft)"})
    lora_merged_rollout: bool = field(default=False, metadata={"help": "with --use-peft: roll out from merged copies of the adapted weights, refreshed after each update (one matmul a projection instead of three, for a copy of those weights in memory) instead of the live adapters"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": f"projections given adapters (with --use-peft): all-linear or a comma-separated subset of {','.join(LORA_TARGETS)}"})
    gpu_memory_utilization: float = field(default=0.5, metadata={"help": "CUDA: the share of the GPU's memory that the weights and the rollout's K/V cache may fill; the rest is the update's (vLLM's name): lower it when the update runs out of memory"})
    enable_sleep_mode: bool = field(default=False, metadata={"help": "free the rollout's K/V cache during each update, so the update's activations can use its memory (TRL's vllm_enable_sleep_mode, verl's free_cache_engine): a larger model or batch at the same --gpu-memory-utilization (the optimizer's state must still fit beside the cache), for making the cache again each step, and on CUDA capturing the decode graphs again where it lands elsewhere (not yet measured on a GPU)"})
    max_num_seqs: int = field(default=256, metadata={"help": "rollout: the most sequences decoded together, and on CUDA the largest decode graph captured (vLLM's and verl's name): a step's prompts x generations beyond it wait for a place (a prompt's samples beyond it: a second prefill of the prompt's last block, the rest read from the prefix cache)"})
    enforce_eager: bool = field(default=False, metadata={"help": "rollout on CUDA: decode without CUDA graphs (vLLM's and verl's name): no capture time nor graph memory, slower decoding; for debugging (no effect on a CPU)"})
    async_scheduling: bool = field(default=False, metadata={"help": "rollout: schedule each decode step while the previous one runs, hiding the host's work behind the GPU's (the same samples; nothing to gain on a CPU)"})
    reward: str = field(default="auto", metadata={"help": "exact | math | module:function (auto: exact for the built-in task, math otherwise); or several, comma-separated: the first decides right answers (eval accuracy, RPO's verified paths), each adds its weighted score to the reward"})
    chat_template: bool = field(default=True, metadata={"help": "render prompts with the tokenizer's chat template when it has one (--no-chat-template: a string prompt is encoded as it is, as TRL does with a string, e.g. for RL from a base model's own prompt format)"})
    chat_template_kwargs: str | None = field(default=None, metadata={"help": "a JSON object of extra arguments for the chat template (TRL's name), e.g. '{\"enable_thinking\": false}' for Qwen3 (default: none)"})
    system_prompt: str | None = field(default=None, metadata={"help": "a system message before every prompt, through the chat template (open-r1's name); a conversation with a system message of its own keeps that one (default: none)"})
    reward_weights: str | None = field(default=None, metadata={"help": "comma-separated weight of each --reward function (TRL's name) (default: 1 each)"})
    reward_workers: int = field(default=0, metadata={"help": "score the reward functions of the one-completion-a-call kind (exact, math, module:function) in this many worker processes (0: in the trainer's process); math-verify takes 3-6 ms a completion, seconds a step at 512 completions"})
    format_reward_weight: float = field(default=0.0, metadata={"help": "weight of the format reward added to accuracy"})
    log_completions: bool = field(default=False, metadata={"help": "write every sampled completion (prompt, kept path, generated text, reward, advantage) to OUTPUT/completions.jsonl (TRL's name)"})
    eval_steps: int = field(default=10, metadata={"help": "eval every N steps, greedy unless --eval-temperature (0: never)"})
    eval_size: int = field(default=128, metadata={"help": "eval prompts: the built-in task's eval split, or the first N rows of --eval-dataset"})
    eval_temperature: float = field(default=0.0, metadata={"help": "sample the eval's answers at this temperature (verl's val_kwargs.temperature; 0: greedy): for reasoning models that loop under greedy decoding (Qwen3's model card advises against it), e.g. 0.6"})
    eval_top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the eval's answers (with --eval-temperature)"})
    eval_top_k: int = field(default=0, metadata={"help": "top-k sampling of the eval's answers (with --eval-temperature; 0: off)"})
    num_generations_eval: int = field(default=1, metadata={"help": "answers sampled for each eval prompt (TRL's name; with --eval-temperature): eval_accuracy is their mean accuracy (avg@K), eval_pass_at_k the share of prompts answered right at least once"})
    save_steps: int = field(default=20, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    save_total_limit: int = field(default=0, metadata={"help": "keep only the newest N checkpoints, deleting older ones after each save (0: keep all)"})
    push_to_hub: bool = field(default=False, metadata={"help": "at the end, upload final/ (with --use-peft the adapter, final-adapter/, as TRL does) to a Hugging Face Hub model repository, created at the start so that a missing token or network fails before the training (TRL's name; needs a token: HF_TOKEN or `hf auth login`)"})
    hub_model_id: str | None = field(default=None, metadata={"help": "the repository of --push-to-hub: org/name, or a name in the token's namespace (TRL's name) (default: --output's last part)"})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "--push-to-hub creates the repository private (TRL's name; an existing one keeps its visibility) (default: the Hub's, public unless the organization says otherwise)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="auto", metadata={"help": "float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp (full model per rank) or fsdp (FSDP2: sharded float32 weights, grads and AdamW state)"})
    dist_timeout: float = field(default=1800.0, metadata={"help": "under torchrun: seconds a collective waits for the other ranks before the job fails; must exceed the longest wait of a rank for the others: a step's rollout or eval, rank 0 writing a checkpoint or final/, the starter model's first build"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    report_to: str = field(default="auto", metadata={"help": "where each step's metrics go besides metrics.jsonl: tensorboard, wandb (W&B, project $WANDB_PROJECT or rpo_engine), comma-separated, or none (TRL's name; auto: TensorBoard when installed)"})
    rpo: RPOConfig = field(default_factory=RPOConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)

    def __post_init__(self):
        _take_types(self)
        _check_finite(self)
        for name in ("steps", "train_size", "prompts_per_step", "num_generations", "max_prompt_length", "max_completion_length",
                     "micro_batch_tokens", "eval_size", "max_num_seqs"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # torch's generators (LoRA's initialisation) take a 64-bit seed: past it, a traceback
        _check(-2**63 <= self.seed < 2**64, f"--seed must fit in 64 bits, got {self.seed}")
        # one sample is its group's mean: its advantage is always 0, so nothing would be learned (TRL: >= 2 too)
        _check(self.num_generations >= 2, f"--num-generations must be >= 2, got {self.num_generations}")
        _check(self.temperature >= MIN_TEMPERATURE, f"--temperature must be >= {MIN_TEMPERATURE}, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"--min-p must be in [0, 1], got {self.min_p}")
        # one candidate token a step: every group's G completions come out alike, so no group has an advantage
        flag = greedy_filter(self.top_k, self.min_p)
        _check(flag is None, f"{flag} samples greedily: a group's {self.num_generations} completions are all alike, "
                             f"so none has an advantage and nothing is learned (--top-k 0 or > 1, --min-p < 1)")
        _check(self.repetition_penalty >= MIN_TEMPERATURE,
               f"--repetition-penalty must be >= {MIN_TEMPERATURE} (1: off), got {self.repetition_penalty}")
        stop_strings(self.stop)
        _check(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        _check_float32("learning_rate", self.learning_rate)
        _check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0 and (self.warmup_steps < 1 or self.warmup_steps.is_integer()),
                   f"--warmup-steps must be a whole number of steps or a fraction in [0, 1), got {self.warmup_steps}")
            _reject_given(self, ("warmup_ratio",), "with --warmup-steps (give one of the two)")
        _check(self.lr_scheduler_type in LR_SCHEDULERS,
               f"--lr-scheduler-type must be one of {LR_SCHEDULERS}, got {self.lr_scheduler_type!r}")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
               f"--adam-beta1 and --adam-beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        _check(self.adam_epsilon > 0, f"--adam-epsilon must be > 0, got {self.adam_epsilon}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        # 0 turns clipping off, as in Hugging Face's Trainer; a negative bound would flip the gradient's sign
        _check(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        _check(self.eval_steps >= 0 and self.save_steps >= 0, "--eval-steps and --save-steps must be >= 0")
        _check(self.reward_workers >= 0, f"--reward-workers must be >= 0, got {self.reward_workers}")
        _check(self.save_total_limit >= 0, f"--save-total-limit must be >= 0, got {self.save_total_limit}")
        # cuda:N, N a GPU index (torch.device raised on cuda:x or cuda:-1, a traceback)
        _check(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
               f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16"), f"--dtype must be float32, bfloat16 or auto, got {self.dtype!r}")
        _check(self.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp, got {self.parallel!r}")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha > 0 and math.isfinite(self.lora_alpha), f"--lora-alpha must be > 0, got {self.lora_alpha}")
        parse_lora_targets(self.lora_target_modules, "--lora-target-modules")
        # a frozen bf16 base fits each GPU (2 bytes a parameter): DDP replicates it, there is nothing to shard
        _check(not (self.use_peft and self.parallel == "fsdp"), "--use-peft trains with --parallel ddp, not fsdp")
        # under LoRA the reference is the base itself (adapters off): there is no second model to move
        _check(not (self.use_peft and self.algo.sync_ref_model), "--sync-ref-model does not apply with --use-peft")
        # a cached path is at most --max-completion-length tokens: cut by at least that, every group regrew whole
        _check(not self.rpo.rpo or self.rpo.rpo_min_cut < self.max_completion_length,
               f"--rpo-min-cut {self.rpo.rpo_min_cut} does nothing but regrow every cached path whole with "
               f"--max-completion-length {self.max_completion_length} (a path is at most that long): RPO would be "
               f"full-path GRPO; give --rpo-min-cut < --max-completion-length, or --no-rpo")
        # the reference moves at steps that are multiples of the interval: past --steps (TRL's default 512 is past most
        # runs') it never moved, and the run trained against the initial model without a word
        _check(not self.algo.sync_ref_model or self.algo.ref_model_sync_steps <= self.steps,
               f"--sync-ref-model does nothing with --ref-model-sync-steps {self.algo.ref_model_sync_steps} above "
               f"--steps {self.steps}: the reference would never move (give --ref-model-sync-steps <= --steps)")
        if self.chat_template_kwargs is not None:
            try:
                kwargs = json.loads(self.chat_template_kwargs)
            except ValueError:
                kwargs = None
            _check(isinstance(kwargs, dict),
                   f"--chat-template-kwargs must be a JSON object, got {self.chat_template_kwargs!r}")
            # apply_chat_template's own arguments, which the prompt encoding sets (or which would truncate the
            # prompt or return tensors): passed again, they are a TypeError or wrong ids, not template variables
            taken = sorted(set(kwargs) & _ENCODING_ARGUMENTS)
            _check(not taken, f"--chat-template-kwargs cannot set {', '.join(map(repr, taken))} (apply_chat_template's "
                              f"own arguments, set by the prompt encoding: a generation prompt opens unless the "
                              f"conversation ends in an assistant message); pass template variables, e.g. enable_thinking")
        names = reward_names(self)
        _check(all(names) and ("auto" not in names or len(names) == 1),
               f"--reward must name one function or a comma-separated list of them (auto alone), got {self.reward!r}")
        if self.reward_weights is not None:
            try:
                weights = reward_weights(self)
            except ValueError:
                weights = []
            _check(len(weights) == len(names) and all(map(math.isfinite, weights)),
                   f"--reward-weights must be {len(names)} comma-separated number(s), one per --reward function, "
                   f"got {self.reward_weights!r}")
            for weight in weights:
                _check_float32("reward_weights", weight)
            overlong = self.algo.overlong_penalty and overlong_buffer(self.algo, self.max_completion_length)
            _check(any(weights) or self.format_reward_weight or overlong,
                   f"--reward-weights are all 0: every completion's reward is 0, so nothing is learned (give a "
                   f"function a nonzero weight), got {self.reward_weights!r}")
        _check_float32("format_reward_weight", self.format_reward_weight)
        # torch.distributed's timers overflow far past 1e9 s (gloo: 9e9 s hangs the job, 1e10 s fails it at once)
        _check(0 < self.dist_timeout <= 1e9, f"--dist-timeout must be > 0 and at most 1e9 seconds (about 31 years), "
                                            f"got {self.dist_timeout}")
        if not self.use_peft:
            _reject_given(self, ("lora_r", "lora_alpha", "lora_target_modules", "use_rslora", "lora_merged_rollout"),
                          "without --use-peft (the run trains every weight)")
        # an empty name is no name: --eval-dataset "" read as none (the built-in split, or no eval at all beside
        # --dataset), --model "" as the working directory, --dataset-config "" as the default configuration
        for name in ("model", "dataset", "eval_dataset", "dataset_config"):
            _check(getattr(self, name) != "", f"--{name.replace('_', '-')} is empty; name "
                                              f"{'a configuration' if name == 'dataset_config' else 'a path or a Hub id'} "
                                              f"or leave the option out")
        if self.resume_from_checkpoint is not None:
            _check(self.resume_from_checkpoint != "", "--resume-from-checkpoint is empty; name a checkpoint "
                                                      "(OUTPUT/checkpoints/step-N) or leave the option out")
            if self.output == _DEFAULT_OUTPUT:  # the checkpoint names its run: OUTPUT/checkpoints/step-N
                self.output = str(Path(self.resume_from_checkpoint).parent.parent)
        if self.system_prompt is not None:
            # an empty system message is refused in a dataset's own conversations; a surrogate (a YAML "\ud800", a
            # command line's byte that is not UTF-8) failed in the tokenizer, a TypeError traceback
            _check(bool(self.system_prompt.strip()), "--system-prompt is empty; give the system message's text or "
                                                     "leave the option out")
            try:
                self.system_prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"--system-prompt holds {self.system_prompt[e.start]!r} at character {e.start + 1}, "
                                f"which UTF-8 cannot encode (an unpaired surrogate, or a byte of the command line "
                                f"that is not UTF-8)") from None
        if not self.chat_template:
            _reject_given(self, ("chat_template_kwargs", "system_prompt"), "with --no-chat-template")
        if self.dataset is not None:
            _reject_given(self, ("train_size",), "with --dataset (it sizes the built-in task)")
        self.check_dataset_options()
        report_targets(self.report_to)  # a sink named that is not installed: said now, not after the model loads
        if self.lr_scheduler_type == "constant" and self.warmup_ratio:  # 0 (TRL's default) says what constant does
            _reject_given(self, ("warmup_ratio",), "with --lr-scheduler-type constant (constant_with_warmup warms up)")
        _check(not (self.lr_scheduler_type == "constant" and self.warmup_steps),
               "--warmup-steps does nothing with --lr-scheduler-type constant (constant_with_warmup warms up)")
        # the buffer is the budget's last tokens: a longer one penalized every answer, a 1-token one too
        _check(self.algo.overlong_buffer is None or self.algo.overlong_buffer <= self.max_completion_length,
               f"--overlong-buffer ({self.algo.overlong_buffer}) must be <= --max-completion-length "
               f"({self.max_completion_length}): it is the last tokens of the budget")
        if self.algo.algo == "dapo" and self.algo.overlong_buffer is None and self.max_completion_length < 4:
            _reject_given(self.algo, ("overlong_penalty",), f"with --max-completion-length {self.max_completion_length} "
                                                            f"(--algo dapo's overlong buffer, a quarter of it, is 0 tokens)")
        # verl refuses it too: the batch never holds more groups than --prompts-per-step (global under torchrun)
        _check(self.algo.ppo_mini_batch_size is None or self.algo.ppo_mini_batch_size <= self.prompts_per_step,
               f"--ppo-mini-batch-size ({self.algo.ppo_mini_batch_size}) does nothing above --prompts-per-step "
               f"({self.prompts_per_step}): a step has one mini-batch of at most that many groups")
        if self.dataset is not None and self.eval_dataset is None and self.eval_steps:
            # a --dataset run evaluates only on --eval-dataset: without it these ran no eval at all, silently
            _reject_given(self, ("eval_steps", "eval_size"),
                          "without --eval-dataset (a --dataset run has no eval set of its own)")
        _check(self.eval_temperature == 0 or self.eval_temperature >= MIN_TEMPERATURE,
               f"--eval-temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.eval_temperature}")
        _check(0 < self.eval_top_p <= 1, f"--eval-top-p must be in (0, 1], got {self.eval_top_p}")
        _check(self.eval_top_k >= 0, f"--eval-top-k must be >= 0, got {self.eval_top_k}")
        _check(self.num_generations_eval >= 1, f"--num-generations-eval must be >= 1, got {self.num_generations_eval}")
        _check(not (self.eval_top_k == 1 and self.num_generations_eval > 1),
               f"--eval-top-k 1 samples greedily: a prompt's {self.num_generations_eval} eval answers are all alike "
               f"(--eval-top-k 0 or > 1, or --num-generations-eval 1)")
        if not self.push_to_hub:
            _reject_given(self, ("hub_model_id", "hub_private_repo"), "without --push-to-hub")
        # (with --eval-steps 0 they are let be, as --eval-size is: a shared file's eval settings, eval switched off)
        eval_sampling = ("eval_temperature", "eval_top_p", "eval_top_k", "num_generations_eval")
        if self.eval_temperature == 0:  # greedy takes the most likely token, which the filters keep, the same K times
            _reject_given(self, eval_sampling[1:], "without --eval-temperature > 0 (the eval is greedy)")

    def check_dataset_options(self) -> None:
        """The options that say how to read --dataset / --eval-dataset, given where they read nothing."""
        from rpo_engine.data.datasets import dataset_layout

        if self.dataset is None and self.eval_dataset is None:
            _reject_given(self, ("dataset_prompt_column", "dataset_answer_column"),
                          "without --dataset or --eval-dataset (the built-in task has its own fields)")
        # the prompt would hold the answer it is graded against
        _check(self.dataset_prompt_column != self.dataset_answer_column,
               f"--dataset-prompt-column and --dataset-answer-column both name {self.dataset_prompt_column!r}")
        layouts = [dataset_layout(self.dataset), dataset_layout(self.eval_dataset)]
        configs = [layout in ("hub", "repository") for layout in layouts]  # configurations: a repository's card
        splits = [layout in ("hub", "repository", "splits") for layout in layouts]
        if not any(configs):
            _reject_given(self, ("dataset_config",), f"without a --dataset or --eval-dataset {_CONFIGURED}")
        if not splits[0]:
            _reject_given(self, ("dataset_train_split",), f"without a --dataset {_SPLIT}")
        if not splits[1]:
            _reject_given(self, ("dataset_test_split",), f"without a --eval-dataset {_SPLIT}")


_CONFIGURED = "with configurations (a Hub id, org/name, or a dataset repository's directory)"
_SPLIT = "with splits (a Hub id, org/name, a dataset repository's directory or a `datasets` DatasetDict's)"


SECTIONS = {"rpo": RPOConfig, "algo": AlgoConfig}


def _flat_fields():
    """(section or None, Field) for every option, in --help order."""
    for f in fields(TrainConfig):
        if f.name in SECTIONS:
            yield from ((f.name, sub) for sub in fields(SECTIONS[f.name]))
        else:
            yield None, f


def _is_bool(f) -> bool:
    return f.type in ("bool", "bool | None", bool)


def closest_names(name: str, names) -> list[str]:
    """The names a mistyped `name` most likely meant: those it begins (an abbreviation), those whose words'
    initials it is (`lr` for learning-rate), then the most alike by difflib's ratio; at most three."""
    import difflib

    bare = name.lstrip("-").replace("_", "-").lower()
    strip = {n: n.lstrip("-").replace("_", "-") for n in names}
    begun = [n for n, b in strip.items() if bare and b.startswith(bare)]
    initials = [n for n, b in strip.items() if len(bare) > 1 and "".join(w[:1] for w in b.split("-")) == bare]
    if begun or initials:
        return list(dict.fromkeys(initials + begun))[:3]
    alike = difflib.get_close_matches(bare, list(strip.values()), n=3, cutoff=0.75)
    return [n for n, b in strip.items() if b in alike][:3]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (a UserError: exit 2), not the whole usage: train's runs to 100 lines.
    An option is read only by its whole name: argparse's default took any unambiguous beginning (`--lr 1e-5`
    was --lr-scheduler-type), so a later option sharing the beginning would change what an old command meant."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            given = next((a for a in message.removeprefix("unrecognized arguments: ").split() if a.startswith("-")), None)
            if given is not None:
                name = given.partition("=")[0]
                known = [o for o in self._option_string_actions if o.startswith("--")]
                meant = closest_names(name, known)
                message = f"unknown option {name!r}" + (f"; did you mean {' or '.join(meant)}?" if meant else "")
        raise UserError(f"{message} (python {self.prog.removeprefix('python ')} --help lists every option)")


# TRL / Hugging Face option names that are not ours: an unknown-option error says what is (README, Coming from TRL)
TRL_EQUIVALENTS = {
    "max_steps": "is --steps here", "num_train_epochs": "is --steps here (a run is sized in steps)",
    "output_dir": "is --output here", "model_name_or_path": "is --model here",
    "dataset_name": "is --dataset here (a JSONL or Parquet file, a save_to_disk directory, a Hub id or its repository's directory)",
    "reward_funcs": "is --reward here (comma-separated, or a YAML list)",
    "per_device_train_batch_size": "is --prompts-per-step here, which counts prompts, not completions",
    "generation_batch_size": "is --prompts-per-step here, which counts prompts, not completions",
    "gradient_accumulation_steps": "is --micro-batch-tokens here (micro-batches by tokens, one optimizer step a batch)",
    "steps_per_generation": "is --ppo-mini-batch-size here (prompts per optimizer step)",
    "bf16": "is --dtype bfloat16 here (--dtype auto: bf16 on CUDA)", "fp16": "is not here: --dtype float32 or bfloat16",
    "use_vllm": "is not here: the rollout engine is built in", "vllm_mode": "is not here: the rollout engine is built in",
    "vllm_gpu_memory_utilization": "is --gpu-memory-utilization here",
    "vllm_enable_sleep_mode": "is --enable-sleep-mode here",
    "vllm_importance_sampling_correction": "is --importance-sampling-correction here",
    "vllm_importance_sampling_mode": "is --importance-sampling-mode here",
    "vllm_importance_sampling_clip_max": "is --importance-sampling-clip-max here",
    "vllm_importance_sampling_clip_min": "is --importance-sampling-clip-min here",
    "logging_steps": "is not here: metrics.jsonl records every step",
    "eval_strategy": "is --eval-steps here (0: never)", "save_strategy": "is --save-steps here (0: only at the end)",
    "lr_scheduler_kwargs": "is not here: cosine_with_min_lr ends at 10% of the peak (min_lr_rate 0.1)",
    "lora_dropout": "is not here: no adapter dropout, so the training forward is the rollout's (README, LoRA)",
    "generation_kwargs": "is not here: the sampling options are flags (--temperature, --top-p, --top-k, --min-p, "
                         "--repetition-penalty, --stop)",
}


def _unknown(name: str) -> str:
    """`name` is not an option: what to say, with what we have instead when it is a TRL name, else the
    option names it most likely meant."""
    trl_name = name.replace("-", "_")
    if trl_name in TRL_EQUIVALENTS:
        return f"unknown option {name!r} (TRL's {trl_name} {TRL_EQUIVALENTS[trl_name]})"
    meant = closest_names(name, [f.name for _, f in _flat_fields()])
    return f"unknown option {name!r}" + (f"; did you mean {' or '.join(meant)}?" if meant else "")


_BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _trl_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """TRL's command-line spelling (HfArgumentParser's) read as ours: `--num_generations 4` is
    `--num-generations 4`, and a boolean given a value, `--use_peft true` or `--rpo=false`, is `--use-peft` or
    `--no-rpo`; a TRL name that is not ours is an error naming what is."""
    actions = parser._option_string_actions
    out, i = [], 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        if name not in actions and "--" + name[2:].replace("_", "-") in actions:
            name = "--" + name[2:].replace("_", "-")
        if name not in actions and name[2:].replace("-", "_") in TRL_EQUIVALENTS:
            raise UserError(_unknown(name[2:]))
        if isinstance(actions.get(name), argparse.BooleanOptionalAction) and not name.startswith("--no-"):
            if not eq and i < len(argv) and argv[i].lower() in _BOOLEAN_WORDS:
                eq, value, i = "=", argv[i], i + 1
            if eq:
                if value.lower() not in _BOOLEAN_WORDS:
                    raise UserError(f"{name} takes true or false (or no value), got {value!r}")
                out.append(name if _BOOLEAN_WORDS[value.lower()] else "--no-" + name[2:])
                continue
        out.append(name + eq + value)
    return out


# --help in sections: the top-level options grouped by what they set; the rpo and algo sections each whole,
# under a name and what it holds
HELP_GROUPS = {
    "model and data": ("model", "dataset", "shuffle_dataset", "train_size", "eval_dataset", "dataset_config",
                       "dataset_train_split", "dataset_test_split", "dataset_prompt_column", "dataset_answer_column",
                       "filter_overlong_prompts"),
    "run": ("output", "resume", "resume_from_checkpoint", "config", "seed", "steps"),
    "rollout": ("prompts_per_step", "num_generations", "max_prompt_length", "max_completion_length", "temperature",
                "top_p", "top_k", "min_p", "stop", "repetition_penalty", "gpu_memory_utilization", "enable_sleep_mode", "max_num_seqs", "enforce_eager",
                "async_scheduling"),
    "rewards and prompts": ("reward", "reward_weights", "reward_workers", "format_reward_weight", "chat_template",
                            "chat_template_kwargs", "system_prompt"),
    "optimization": ("learning_rate", "warmup_ratio", "warmup_steps", "lr_scheduler_type", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "weight_decay", "max_grad_norm", "micro_batch_tokens", "prefix_sharing",
                     "gradient_checkpointing"),
    "LoRA": ("use_peft", "lora_r", "lora_alpha", "use_rslora", "lora_merged_rollout", "lora_target_modules"),
    "evaluation, checkpoints and logging": ("eval_steps", "eval_size", "eval_temperature", "eval_top_p", "eval_top_k",
                                            "num_generations_eval", "save_steps", "save_total_limit", "push_to_hub",
                                            "hub_model_id", "hub_private_repo",
                                            "log_completions", "report_to", "progress"),
    "device and processes": ("device", "dtype", "parallel", "dist_timeout"),
    "rpo": ("RPO", "the experience cache, the cut of a cached path, the suffix budget (--no-rpo: full-path GRPO/DAPO)"),
    "algo": ("algorithm", "GRPO / DAPO, the loss and its variants, dynamic sampling, the KL term, importance sampling"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m rpo_engine.train", usage="%(prog)s [options]",
        description="GRPO/DAPO fine-tuning with RPO (partial reasoning optimization). "
                    "With no arguments: the built-in arithmetic task on the built-in starter model.")
    groups, group_of = {}, {}
    for title, members in HELP_GROUPS.items():
        if len(members) == 2 and title in SECTIONS:  # a config section, all of it: a name and what it holds
            groups[title] = parser.add_argument_group(*members)
        else:
            groups[title] = parser.add_argument_group(title)
            group_of.update(dict.fromkeys(members, title))
    for section, f in _flat_fields():
        group = groups[section if section is not None else group_of[f.name]]  # KeyError: an option in no group
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "(default" not in help_text:  # a help text that already says its default (None: decided later)
            shown = "none" if default is None else ("on" if default else "off") if _is_bool(f) else default
            help_text = f"{help_text} (default: {shown})"
        if _is_bool(f):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    return parser


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _unique_key_loader():
    """PyYAML's SafeLoader, but a key repeated in one mapping is an error (SafeLoader keeps the last value
    without a word, so `steps: 1` then `steps: 2` trained 2 steps)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if repeated:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _read_yaml(p: Path):
    import yaml

    if p.is_dir():
        raise UserError(f"{p}: is a directory, not a config file")
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8 (a config file is UTF-8 YAML)") from None
    try:
        return yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as e:
        raise UserError(f"{p}:{e.line}: key {_yaml_key(e.key)} given twice (give each option once)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


def _yaml_key(key) -> str:
    """A YAML key as YAML writes it: null, true, 1, 'steps'."""
    return repr(key) if isinstance(key, str) else json.dumps(key, default=str)


def _load_yaml(path: str) -> tuple[dict, bool]:
    """-> (the file's options, flat; whether it is a run's config.json, which records `config: null`)."""
    p = Path(path)
    data = _read_yaml(p)
    data = {} if data is None else data  # an empty file
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of option: value")
    # a run's config.json holds every option; its `config` names the file the run read them from (null: none),
    # whose options the record already holds
    record_keys = {f.name for f in fields(TrainConfig)}
    is_record = record_keys <= {key for key in data if isinstance(key, str)}
    entries = []
    for key, value in data.items():
        if isinstance(key, str) and key.replace("-", "_") in SECTIONS and isinstance(value, (dict, type(None))):
            entries += [(f"{key}: ", k, v) for k, v in (value or {}).items()]  # `algo:` with its keys commented out
        else:
            entries.append(("", key, value))
    flat, record = {}, False
    for section, key, value in entries:
        if not isinstance(key, str):
            raise UserError(f"{p}: {section}key {_yaml_key(key)} is not an option name (option names are strings)")
        key = key.replace("-", "_")
        if key == "config":  # one file holds the options; --config is read once, before the flags
            if value is None or is_record:  # a run's config.json records its --config: it can be fed back as it is
                record = True
                continue
            raise UserError(f"{p}: {section}config: {value}: nested config files are not supported (give one "
                            f"--config; in a run's config.json, remove this line)")
        if key in flat:  # `rpo_max_cut` and `rpo: {rpo_max_cut}`, or rpo-max-cut and rpo_max_cut
            raise UserError(f"{p}: option {key} given twice")
        if key in ("reward", "reward_weights", "lora_target_modules", "report_to") and isinstance(value, list):
            value = ",".join(map(str, value))  # a YAML list: the flag's comma-separated names
        if key == "reward_weights" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # one function's weight, as --reward-weights 2 and [2] take it
        if key == "chat_template_kwargs" and isinstance(value, dict):  # a YAML mapping: the flag's JSON
            value = _as_json(value, p, section, key, "a JSON-like mapping (strings, numbers, booleans, lists, mappings)")
        if key == "stop" and isinstance(value, list):  # a YAML list of strings: the flag's JSON
            value = _as_json(value, p, section, key, "a list of strings")
        flat[key] = value
    return flat, record


def _as_json(value, path: Path, section: str, key: str, kind: str) -> str:
    """A YAML value as the JSON text its flag takes; a value JSON has no type for (a date, !!binary) names the key."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {section}{key} must be {kind}, got {value!r}") from None


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _typed(name: str, kind: str, value, source: str):
    """`value` (from YAML or a caller's dict) as option `name`'s type `kind` ("int", "float | None", ...).

    YAML 1.1 reads `1e-5` (no dot) as a string, so a number written that way is taken as the float it
    means; anything else of the wrong type is an error naming the option."""
    base, optional = kind.removesuffix(" | None"), kind.endswith(" | None")
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy scalar (a sweep's numpy.arange value): its Python int, float or bool
    if value is None and optional:
        return None
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= sys.float_info.max:
        return float(value)  # past a float's range: float() raised OverflowError
    if base == "float" and isinstance(value, float):
        return value
    if base == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise UserError(f"{source}: {name} must be {_KINDS[base]}{' or null' if optional else ''}, got {value!r}")


def boolean_scale_rewards_named(values: dict) -> dict:
    """`values` (flat options) with a boolean scale_rewards as its name: TRL's form, and how config.json recorded
    it before the names (true is "group", false "none")."""
    if isinstance(values.get("scale_rewards"), bool):
        return dict(values, scale_rewards="group" if values["scale_rewards"] else "none")
    return values


def config_from_dict(values: dict, source: str = "options") -> TrainConfig:
    fields_by_name = {f.name: (section, f) for section, f in _flat_fields()}
    known = {name: section for name, (section, _) in fields_by_name.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: {_unknown(unknown[0])}")
    values = boolean_scale_rewards_named(values)
    chosen = values.get("resume_from_checkpoint")
    if isinstance(chosen, bool) or (isinstance(chosen, str) and chosen.lower() in ("true", "false")):
        # TRL's boolean form: true resumes from the newest checkpoint, as --resume does; false from none
        resume = chosen if isinstance(chosen, bool) else chosen.lower() == "true"
        values = {k: v for k, v in values.items() if k != "resume_from_checkpoint"}
        values = dict(values, resume=True) if resume else values
    values = {k: _typed(k, fields_by_name[k][1].type, v, source) for k, v in values.items()}
    top = {k: v for k, v in values.items() if known[k] is None}
    sub = {name: {k: v for k, v in values.items() if known[k] == name} for name in SECTIONS}
    try:
        return TrainConfig(**top, **{name: cls(**sub[name]) for name, cls in SECTIONS.items()})
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None


def _unpin_resolved(values: dict) -> dict:
    """A run's config.json records what AlgoConfig resolved from --algo, --epsilon and --loss-type (epsilon_high,
    loss_agg, dynamic_sampling) as plain values. Fed back with a flag that changes those, they pinned the run to the
    old resolution (`--algo dapo` trained with GRPO's symmetric clip and aggregation, without dynamic sampling;
    `--epsilon 0.1` kept --epsilon-high at 0.2): a recorded value that the record's other options resolve it to is
    left out, to be resolved again; one that differs (it was given) stays."""
    kept = dict(values)
    for name in ("epsilon_high", "loss_agg", "dynamic_sampling"):
        if name not in values:
            continue
        try:
            resolved = AlgoConfig(**{f.name: _typed(f.name, f.type, values[f.name], "") for f in fields(AlgoConfig)
                                     if f.name in values and f.name != name})
        except (UserError, TypeError):  # the record's own mistake (config_from_dict names it), or cispo's cap
            continue
        if values[name] == getattr(resolved, name):
            del kept[name]
    return kept


def parse_args(argv=None) -> TrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(_trl_spelling(parser, sys.argv[1:] if argv is None else list(argv))))
    values = {}
    if args.get("config"):
        file_values, record = _load_yaml(args["config"])
        if record:  # a run's config.json: its resume or resume_from_checkpoint was an act on that run, not an option
            # to repeat (fed back with another --output, it resumed the run there, which a plain command refuses)
            file_values = _unpin_resolved({k: v for k, v in file_values.items()
                                           if k not in ("resume", "resume_from_checkpoint")})
            if args.get("output") is None:
                _check_record_is_its_runs(Path(args["config"]), file_values.get("output"))
        values.update(file_values)
    values.update({k: v for k, v in args.items() if v is not None})
    return config_from_dict(values, source=args.get("config") or "options")


def _check_record_is_its_runs(record: Path, output) -> None:
    """A run's config.json names its --output as an absolute path: read from another run's directory (a copy made
    to branch the run off, or the run moved), that path is the original's, which the command would go on with
    (its final/ replaced) or start a new run in."""
    here = record.parent
    if not isinstance(output, str) or not ((here / "metrics.jsonl").exists() or (here / "checkpoints").is_dir()):
        return  # a record kept elsewhere as a config file: its --output stands
    if Path(output).resolve() != here.resolve():
        raise UserError(f"--config {record}: the record of the run in {output}, read from another run's directory (a "
                        f"copy, or the run moved?); pass --output {here} to go on with this one, or --output {output}")


def config_to_dict(config: TrainConfig) -> dict:
    """The record of a run's options (its config.json, a checkpoint's). --output, a local --model, --dataset,
    --eval-dataset and a --reward file (path/to/file.py:fn) are recorded as the paths they name, resolved: a
    relative path read from another working directory (`--config runs/x/config.json --resume`'s) would name
    another one."""
    from rpo_engine.hub import is_hub_id

    record = dataclasses.asdict(config)
    record["output"] = str(Path(config.output).resolve())
    if config.model is not None and not is_hub_id(config.model):
        record["model"] = str(Path(config.model).resolve())
    for name in ("dataset", "eval_dataset"):
        if record[name] is not None and os.path.exists(record[name]):  # a Hub id stays as it is
            record[name] = str(Path(record[name]).resolve())
    record["reward"] = ",".join(_reward_file_resolved(name) for name in reward_names(config))
    return record


def _reward_file_resolved(name: str) -> str:
    """A --reward given as path/to/file.py:fn with the file's path resolved; any other name as it is."""
    module, sep, function = name.rpartition(":")
    if sep and os.path.isfile(module):
        return f"{Path(module).resolve()}:{function}"
    return name
