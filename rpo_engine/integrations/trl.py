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
temperature-scaled distribution, as TRL's own (`logits / temperature`). TRL's colocated-vLLM options size the
engine where not given here: `vllm_gpu_memory_utilization` (the share of the GPU the weights and the K/V cache
may fill) and `vllm_enable_sleep_mode` (free the K/V cache between rollouts, for the update's activations).

The rollout computes in the weights' dtype: a model loaded in fp32 and trained with TRL's bf16=True (autocast)
is sampled in fp32, a bf16 model in bf16, as vLLM would sample it.

Written against TRL 1.16 (`rollout_func` is experimental there; set TRL_EXPERIMENTAL_SILENCE=1 to silence its
warning). Not supported: tools and environments (TRL's tool loop would continue with its own generation),
vision-language processors, ZeRO-3 / FSDP-sharded weights, and PEFT adapters other than plain LoRA on the
layers' projections (from_transformers refuses those).
"""
from __future__ import annotations

from rpo_engine.model.checkpoint import from_transformers
from rpo_engine.rollout import RolloutEngine, SamplingParams

# generation_kwargs keys taken (vLLM's and transformers' names), and the SamplingParams field each sets
GENERATION_KWARGS = {"stop": "stop", "stop_strings": "stop", "stop_token_ids": "stop_token_ids",
                     "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens"}


class TRLRollout:
    """A TRL `rollout_func`: `TRLRollout()(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}`.

    gpu_memory_utilization, enable_sleep_mode: None takes TRL's vllm_gpu_memory_utilization and
    vllm_enable_sleep_mode from the trainer's args. engine_options: RolloutEngine's other options
    (max_num_seqs, block_size, use_cuda_graphs, async_scheduling, ...). The engine is built at the first call
    and built again only if the model's parameters, device or dtype change.
    """

    def __init__(self, gpu_memory_utilization: float | None = None, enable_sleep_mode: bool | None = None,
                 **engine_options):
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.engine_options = engine_options
        self.engine: RolloutEngine | None = None
        self._built_for = None  # (model, its head Parameter, device, dtype, shape) the engine was built on

    def __call__(self, prompts: list, trainer) -> dict:
        engine = self.engine_for(trainer)
        prompt_ids = tokenize_prompts(prompts, trainer)
        params = sampling_params(trainer)
        # TRL repeats each prompt num_generations times in a row: one request with n = the run's length, so the
        # prompt is prefilled once and its samples fork from it
        runs: list[list[int]] = []
        counts: list[int] = []
        for ids in prompt_ids:
            if runs and ids == runs[-1]:
                counts[-1] += 1
            else:
                runs.append(ids)
                counts.append(1)
        max_len = engine.config.max_model_len
        requests = []
        for ids, n in zip(runs, counts):
            room = max_len - len(ids)
            if room < 1:
                raise ValueError(f"a prompt of {len(ids)} tokens leaves no room to generate in the model's "
                                 f"{engine.config.describe_context()}")
            # vLLM's rule: a completion ends at the context's end (finish reason "length")
            requests.append(SamplingParams(**{**params, "n": n, "max_new_tokens": min(params["max_new_tokens"], room)}))
        outputs = engine.generate(runs, requests)
        if self.sleeping(trainer):
            engine.sleep()
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for ids, completions in zip(runs, outputs):
            for c in completions:
                out["prompt_ids"].append(list(ids))
                out["completion_ids"].append(list(c.token_ids))
                out["logprobs"].append(list(c.logprobs))
        return out

    def sleeping(self, trainer) -> bool:
        if self.enable_sleep_mode is not None:
            return self.enable_sleep_mode
        return bool(getattr(trainer.args, "vllm_enable_sleep_mode", False))

    def engine_for(self, trainer) -> RolloutEngine:
        """The engine on the trainer's model, built (again) where the model is new or its head's Parameter,
        device, dtype or shape changed since (.to() moves every weight's data, resize_token_embeddings the
        head's: the engine's K/V cache and vocabulary would be stale)."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        head = model.get_output_embeddings().weight
        key = (model, head, head.device, head.dtype, tuple(head.shape))
        built = self._built_for
        if self.engine is not None and key[0] is built[0] and key[1] is built[1] and key[2:] == built[2:]:
            return self.engine
        if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
            raise ValueError("TRLRollout does not run tool calls: TRL's tool loop would continue the completions "
                             "with its own generation")
        if getattr(trainer, "use_vllm", False):
            raise ValueError("TRLRollout replaces vLLM: set use_vllm=False")
        options = dict(self.engine_options)
        share = self.gpu_memory_utilization
        if share is None:
            share = getattr(trainer.args, "vllm_gpu_memory_utilization", None)
        if share is not None:
            options["gpu_memory_utilization"] = share
        self.engine = None  # the old engine's K/V cache freed before the new one is sized
        self.engine = RolloutEngine(from_transformers(model), tokenizer=trainer.processing_class, **options)
        self._built_for = key
        return self.engine


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
            value = params["stop_token_ids"] + [t for t in value if t not in params["stop_token_ids"]]
        params[field] = value
    return params
