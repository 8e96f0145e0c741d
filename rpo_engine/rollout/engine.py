"""RolloutEngine: batched generation from a live model with a paged K/V cache.

`generate(prompts, params)` validates everything first, then loops `step()`: schedule, run one
forward, fork fresh prefills into their n samples, sample, append. Each prompt is prefilled once and
its n samples share its blocks; identical full blocks across the prompts of a call are reused. The
prefix cache is emptied at the start of every call, because the model may have been trained since.
Lengths: prompt + max_new_tokens must fit in the model's max_model_len (a ValueError otherwise).

Async scheduling (`async_scheduling=True`): a decode step is scheduled and launched before the
previous step's sampled tokens reach the host; its input ids are those tokens, still on the device,
and the host appends them (and finds who stopped) while the new step runs. On a GPU this hides the
host's work per step (scheduling, metadata, appending) behind the device's. The draws are the same
as without it (each depends only on its request, sample and position); a sequence that sampled a stop
token runs one more step for nothing. It falls back to a synchronous step where the next step needs
every token: a prefill (requests waiting) or a preemption.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import time
from dataclasses import dataclass

import torch

from rpo_engine.model.lora import free_rollout_weights, lora_modules, refresh_rollout_weights, rollout_weights_in_use
from rpo_engine.rollout.block_manager import BlockManager
from rpo_engine.rollout.model_runner import ModelRunner
from rpo_engine.rollout.penalty import SeenTokens
from rpo_engine.rollout.sampler import request_key, sample_sequences
from rpo_engine.rollout.scheduler import Scheduler
from rpo_engine.rollout.sequence import Completion, SamplingParams, Sequence, SequenceStatus, with_tokenizer
from rpo_engine.rollout.stop import StopStrings
from rpo_engine.rollout.transfer import host_tensor


class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor):
        self.seqs, self.tokens = seqs, tokens  # tokens stay on the device: the next step's input ids
        self.event = None
        if tokens.device.type == "cuda":  # start the copy to the host now; `result` waits only for it
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in (tokens, logprobs)]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = [tokens, logprobs]

    def input_ids(self, seqs: list[Sequence], device) -> torch.Tensor:
        """[len(seqs)] the pending tokens of `seqs` (all from this step), in their order."""
        if len(seqs) == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs)):
            return self.tokens
        row = {seq.uid: i for i, seq in enumerate(self.seqs)}
        return self.tokens.index_select(0, host_tensor([row[seq.uid] for seq in seqs], device))

    def result(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host[0].tolist(), self.host[1].tolist()


@dataclass
class RolloutStats:
    prefill_tokens: int = 0  # tokens computed by prefill forwards
    cached_tokens: int = 0  # prompt tokens found in the prefix cache instead
    forked_tokens: int = 0  # prompt tokens a sample got from its fork instead of its own prefill
    decode_tokens: int = 0  # tokens computed by decode forwards (async: also the rows after a stop token)
    sampled_tokens: int = 0  # new tokens returned
    preemptions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    blocks_used: int = 0  # now (not a counter)
    peak_blocks_used: int = 0  # most blocks held at once (over the engine's life, or the call for a delta)

    @property
    def reused_tokens(self) -> int:
        return self.cached_tokens + self.forked_tokens

    def delta(self, before: "RolloutStats", peak: int) -> "RolloutStats":
        out = RolloutStats(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                              for f in dataclasses.fields(self)})
        out.blocks_used, out.peak_blocks_used = self.blocks_used, peak
        return out


def on_device(device: torch.device):
    """On CUDA, `device` made the current device inside the block: Triton launches, CUDA graph captures and the
    cache's sizing (mem_get_info) act on the current device, not the model's (cuda:1 beside a current cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class RolloutEngine:
    def __init__(self, model, block_size: int = 16, num_blocks: int | None = None, kv_cache_bytes: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 use_cuda_graphs: bool | None = None, attention_backend: str = "auto",
                 enable_prefix_sharing: bool = True, gpu_memory_utilization: float = 0.5,
                 triton_cascade: bool = False, async_scheduling: bool = False, merge_lora: bool = False,
                 tokenizer=None):
        """
        block_size: tokens per K/V block. num_blocks or kv_cache_bytes: the K/V budget; by default
          64k tokens on CPU (capped at max(weights' size, 1 GiB)), and on CUDA what is left of
          `gpu_memory_utilization` of the device after a warm-up forward (0.5 by default, since
          training shares the GPU; a rollout-only process can ask for 0.9); either default at most
          what max_num_seqs sequences of the model's full context can fill.
        max_num_seqs: sequences decoded together (and the largest CUDA graph). A request of more samples (n)
          goes in as parts of at most max_num_seqs: the same samples, a prefill of its last block per part.
        max_num_batched_tokens: tokens per prefill step (default max(8192, the model's max_model_len)).
        attention_backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        use_cuda_graphs: None = on for CUDA + Triton. enable_prefix_sharing=False turns off forks,
          prefix caching and the shared-prefix decode: each sample prefills its own prompt (a baseline).
        triton_cascade: the Triton backend reads a prompt's shared K/V blocks once for all its samples
          (as the torch backend always does) in a second kernel launch, merged by log-sum-exp; the CUDA
          graphs hold that launch too. Off by default until measured on a GPU (bench_rollout.py --gpu
          runs both): without groups in a step it costs a launch and a merge per layer for nothing.
        async_scheduling: schedule each decode step while the previous one runs (module docstring): the
          same completions. Off by default until measured on a GPU (bench_rollout.py --gpu runs both);
          on a CPU, where every op finishes before the next starts, it has nothing to overlap.
        merge_lora: a model with LoRA adapters decodes from merged copies of its adapted weights (W + B A
          alpha / r, recomputed at each generate call where an adapter changed) instead of the live adapters:
          one matmul a projection instead of three, for a copy of each adapted weight in memory. Off by
          default until measured on a GPU (bench_lora.py runs both); without adapters it does nothing.
        tokenizer: the model's (Hugging Face) tokenizer, which SamplingParams.stop needs to read the text; token
          ids are all the engine needs otherwise.
        """
        from rpo_engine.model import CausalLM

        if not isinstance(model, CausalLM):  # it reads our decoder's config and layers, not transformers' model
            raise TypeError(f"RolloutEngine needs a model from rpo_engine.load_model (our decoder), got "
                            f"{type(model).__name__}")
        if attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {attention_backend!r}")
        def positive_int(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        # a switch given as a string ("false") or a number would be truthy, and silently turn a feature on
        for name, value in (("enable_prefix_sharing", enable_prefix_sharing), ("triton_cascade", triton_cascade),
                            ("async_scheduling", async_scheduling), ("merge_lora", merge_lora)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if use_cuda_graphs is not None and not isinstance(use_cuda_graphs, bool):
            raise ValueError(f"use_cuda_graphs must be None, True or False, got {use_cuda_graphs!r}")

        if not all(positive_int(x) for x in (block_size, max_num_seqs)):
            raise ValueError(f"block_size and max_num_seqs must be integers >= 1, got {block_size!r}, {max_num_seqs!r}")
        for name, value in (("num_blocks", num_blocks), ("kv_cache_bytes", kv_cache_bytes),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value is not None and not positive_int(value):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        # checked on the CPU too, where it is unused: a value of 5 (not 0.5) would size a CUDA cache past the GPU
        if (isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, numbers.Real)
                or not 0 < gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        cuda = model.device.type == "cuda"
        if attention_backend == "auto":
            attention_backend = "triton" if cuda else "torch"
        if attention_backend == "triton" and not cuda:
            from rpo_engine.kernels.fused_logprobs import _triton_interpreted

            if not _triton_interpreted():
                raise ValueError("attention_backend='triton' on a CPU model needs TRITON_INTERPRET=1 set before "
                                 "triton is first imported (or the 'torch' backend)")
        if use_cuda_graphs is None:
            use_cuda_graphs = cuda and attention_backend == "triton"
        if use_cuda_graphs and not (cuda and attention_backend == "triton"):
            raise ValueError("use_cuda_graphs needs a CUDA model and the triton attention backend")
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer must be a tokenizer (with decode), got {type(tokenizer).__name__}")
        self.model, self.config, self.tokenizer = model, model.config, tokenizer
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.enable_prefix_sharing = enable_prefix_sharing
        self.async_scheduling = async_scheduling
        self._inflight: InFlight | None = None
        self._seen: SeenTokens | None = None  # during a call with a repetition penalty: each sequence's tokens
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(8192, self.config.max_model_len)
        self.merge_lora = merge_lora and bool(lora_modules(model))
        if self.merge_lora:
            refresh_rollout_weights(model)  # allocated before the K/V cache is sized, so counted as in use
        # the CUDA graphs capture the forward generate will run; the cache is made a normal tensor even in an
        # inference_mode block (an inference tensor could not be written to outside one)
        with self._rollout_weights(), torch.inference_mode(False), on_device(model.device):
            self.runner = ModelRunner(model, block_size, num_blocks, kv_cache_bytes, max_num_seqs,
                                      max_num_batched_tokens, attention_backend, use_cuda_graphs,
                                      gpu_memory_utilization, enable_prefix_sharing, triton_cascade)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_sharing,
                                          tables=self.runner.block_tables)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.stats = RolloutStats()  # cumulative
        self.last_stats = RolloutStats()  # the last generate call's share
        self._call_peak = 0

    def sleep(self) -> None:
        """Give the K/V cache's memory back until the next generate call (vLLM's sleep, TRL's sleep mode, verl's
        free_cache_engine), and with merge_lora the merged copies of the adapted weights too: on CUDA to torch's
        caching allocator, where a training step run meanwhile reuses it for its activations. Nothing is lost:
        the cache holds nothing from one call to the next (each starts with an empty prefix cache), and the
        merged copies are remade whenever an adapter changed. The next call makes both again, and where they land
        elsewhere, captures the CUDA graphs again (they read their addresses)."""
        if self._inflight is not None or not self.scheduler.is_finished():
            raise RuntimeError("RolloutEngine.sleep() in the middle of a generate call")
        self.runner.sleep()
        if self.merge_lora:
            free_rollout_weights(self.model)

    def wake_up(self) -> None:
        """Make the K/V cache (and merged LoRA copies) again now; generate does it when needed."""
        if self.merge_lora:
            refresh_rollout_weights(self.model)
        with on_device(self.runner.device):
            self.runner.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return self.runner.k_cache is None

    def _rollout_weights(self):
        return rollout_weights_in_use(self.model) if self.merge_lora else contextlib.nullcontext()

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def kv_fits(self, prompt_len: int, max_new_tokens: int) -> tuple[bool, int]:
        """Whether one sequence of `prompt_len` tokens and `max_new_tokens` more fits the K/V cache, and the tokens
        of K/V it needs (the last sampled token needs none)."""
        cached = prompt_len + max_new_tokens - 1 if max_new_tokens else 0
        return -(-cached // self.block_size) <= self.num_blocks, cached

    @property
    def kv_cache_bytes(self) -> int:
        """The K/V cache's size (both tensors, every layer, the padding block left out)."""
        return self.runner.num_blocks * self.runner.block_bytes

    def generate(self, prompts: list[list[int] | str], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool | str = False) -> list[list[Completion]]:
        """-> for each prompt (token ids; or text, with the engine's tokenizer) its n completions. progress: a
        bar of finished samples with new tokens/s (vLLM's use_tqdm), for long offline runs such as an eval; a
        string names the bar (default "generate")."""
        prompts, params_list = self._validate(prompts, params)
        if self.merge_lora:
            refresh_rollout_weights(self.model)
        with self._rollout_weights(), on_device(self.runner.device):
            return self._generate(prompts, params_list, progress)

    def _generate(self, prompts, params_list, progress) -> list[list[Completion]]:
        self.block_manager.reset_prefix_cache()
        self.runner.refresh()
        before, self._call_peak = dataclasses.replace(self.stats), self.block_manager.num_used_blocks
        outputs: list[list[Completion | None]] = [[None] * p.n for p in params_list]
        if any(p.repetition_penalty != 1 for p in params_list):
            self._seen = SeenTokens(self.config.vocab_size, self.runner.device)
        stop_strings = {id(p): StopStrings(p.stop, self.tokenizer) for p in params_list if p.stop}
        default_stop = self.default_stop_token_ids()
        bar = None
        # Queued inside the try, after the bar opens: a call that fails before its loop (tqdm raises without a
        # stderr) must leave no request queued, or the next call would run it and write it into its own outputs.
        try:
            if progress:
                from rpo_engine.progress import progress_bar

                name = progress if isinstance(progress, str) else "generate"
                bar = progress_bar(total=sum(p.n for p in params_list), desc=name, unit="seq", dynamic_ncols=True)
                bar.update(sum(p.n for p in params_list if p.max_new_tokens == 0))
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                if p.max_new_tokens == 0:
                    outputs[i] = [with_tokenizer(Completion([], [], "length"), self.tokenizer) for _ in range(p.n)]
                    continue
                seed = p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
                stop = p.stop_token_ids if p.stop_token_ids is not None else default_stop
                key, strings = request_key(seed, prompt), stop_strings.get(id(p))
                if self.enable_prefix_sharing:
                    # more samples than a decode batch holds: the request goes in as several, each forking at
                    # most max_num_seqs; the later ones find the prompt's full blocks in the prefix cache
                    for first in range(0, p.n, self.max_num_seqs):
                        self.scheduler.add(Sequence(prompt, p, self.block_size, stop, key, i,
                                                    num_forks=min(self.max_num_seqs, p.n - first),
                                                    sample_index=first, stop_strings=strings))
                else:
                    for j in range(p.n):
                        self.scheduler.add(Sequence(prompt, p, self.block_size, stop, key, i, sample_index=j,
                                                    stop_strings=strings))
            while not self.scheduler.is_finished() or self._inflight is not None:
                finished = self.step()
                for seq in finished:
                    outputs[seq.request_index][seq.sample_index] = seq.completion(self.tokenizer)
                if self._seen is not None:
                    self._seen.release(finished)
                if bar is not None and finished:
                    elapsed = bar.format_dict["elapsed"]
                    new_tokens = self.stats.sampled_tokens - before.sampled_tokens
                    bar.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:  # e.g. KeyboardInterrupt: drop the call's sequences, keep the engine usable
            self._inflight = None
            for seq in (*self.scheduler.running, *self.scheduler.waiting):
                seq.num_pending = 0
            self.scheduler.abort()
            raise
        finally:
            self.runner.release()
            self._seen = None  # its rows: a bool per vocabulary token per sequence
            if bar is not None:
                bar.close()
        self.last_stats = self.stats.delta(before, self._call_peak)
        return outputs

    def default_stop_token_ids(self) -> tuple[int, ...]:
        """Where `stop_token_ids=None` stops: the model's eos ids (config.json's, generation_config.json's) and the
        tokenizer's eos token, as vLLM stops (and the trainer's stop_ids): a fine-tuned tokenizer's end of turn that
        config.json does not name would otherwise run every completion to its budget."""
        ids = tuple(self.config.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if isinstance(eos, int) and 0 <= eos < self.config.vocab_size and eos not in ids:
            ids += (eos,)
        return ids

    def step(self) -> list[Sequence]:
        """One forward for the scheduled batch; returns the sequences that finished (with async
        scheduling: those whose last token the host has read, which may be a step later)."""
        start = time.perf_counter()
        finished = []
        if self._inflight is not None and not self.scheduler.fits_ahead():
            finished += self._collect(scheduled_ahead=False)  # the next step needs every token first
        seqs, is_prefill, copies = self.scheduler.schedule()
        if not seqs:  # async: every running sequence has its last token pending
            return finished + (self._collect(scheduled_ahead=False) if self._inflight is not None else [])
        assert not (is_prefill and self._inflight is not None), "a prefill runs only after the tokens are read"
        held = self.block_manager.num_used_blocks  # the step's high-water mark: nothing is freed yet
        input_ids = self._inflight.input_ids(seqs, self.runner.device) if self._inflight is not None else None
        logits = self.runner.run(seqs, is_prefill, copies, input_ids)  # [len(seqs), vocab] fp32
        self._count_work(seqs, is_prefill)
        if is_prefill:  # fresh requests split into their n samples, all drawn from the request's row
            rows = torch.tensor([i for i, seq in enumerate(seqs) for _ in range(seq.num_forks)], device=logits.device)
            seqs = [sample for seq in seqs for sample in self.scheduler.fork(seq)]
            logits = logits[rows]  # [num samples, vocab]
        tokens, logprobs = sample_sequences(logits, seqs, self._seen)
        if self.async_scheduling and not is_prefill:
            step = InFlight(seqs, tokens, logprobs)
            for seq in seqs:
                seq.num_pending += 1
            if self._inflight is not None:  # read the previous step's tokens while this one runs
                finished += self._collect(scheduled_ahead=True)
            self._inflight = step
            num_sampled = 0  # counted when read
        else:
            finished += self.scheduler.postprocess(seqs, tokens.tolist(), logprobs.tolist())  # the host sync
            num_sampled = len(seqs)
        self._count_step(num_sampled, is_prefill, held, time.perf_counter() - start)
        return finished

    def _collect(self, scheduled_ahead: bool) -> list[Sequence]:
        """Append the in-flight step's tokens; -> the sequences that finished."""
        step, self._inflight = self._inflight, None
        token_ids, logprobs = step.result()
        live = sum(seq.status is not SequenceStatus.FINISHED for seq in step.seqs)
        finished = self.scheduler.postprocess(step.seqs, token_ids, logprobs, scheduled_ahead)
        self.stats.sampled_tokens += live
        self.stats.blocks_used = self.block_manager.num_used_blocks
        return finished

    def _count_work(self, seqs: list[Sequence], is_prefill: bool):
        s = self.stats
        if is_prefill:
            s.prefill_tokens += sum(len(seq) - seq.num_cached_tokens for seq in seqs)
            s.cached_tokens += sum(seq.num_cached_tokens for seq in seqs)
            s.forked_tokens += sum((seq.num_forks - 1) * len(seq) for seq in seqs)
        else:
            s.decode_tokens += len(seqs)

    def _count_step(self, num_sampled: int, is_prefill: bool, held: int, elapsed: float):
        s = self.stats
        s.sampled_tokens += num_sampled
        s.preemptions = self.scheduler.num_preemptions
        s.blocks_used = self.block_manager.num_used_blocks
        s.peak_blocks_used = max(s.peak_blocks_used, held)
        self._call_peak = max(self._call_peak, held)
        if is_prefill:
            s.prefill_steps, s.prefill_time_s = s.prefill_steps + 1, s.prefill_time_s + elapsed
        else:
            s.decode_steps, s.decode_time_s = s.decode_steps + 1, s.decode_time_s + elapsed

    def _validate(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
        """The prompts (any integer token ids made ints) and one SamplingParams each, every one checked."""
        if params is None:
            params = SamplingParams()
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)} (one per prompt), "
                             f"got {type(params).__name__}")
        params = list(params)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)} (one per prompt)")
        vocab, max_len = self.config.vocab_size, self.config.max_model_len
        for p in {id(p): p for p in params}.values():  # again: a SamplingParams' fields may have changed since
            p.validate()
            # an id no row of the logits has can never be sampled, so the run would ignore it (another tokenizer's)
            outside = [t for t in p.stop_token_ids or () if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"SamplingParams.stop_token_ids {outside} are not in the vocabulary [0, {vocab})")
            if p.stop and self.tokenizer is None:
                raise ValueError(f"SamplingParams.stop {p.stop!r} needs the text: build the engine with the "
                                 f"model's tokenizer, RolloutEngine(model, tokenizer=...)")
        prompts = list(prompts)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):  # text, as vLLM takes it: encoded with the tokenizer's special tokens (a BOS)
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text: pass token ids, or build the engine with the model's "
                                     f"tokenizer, RolloutEngine(model, tokenizer=...)")
                prompts[i] = prompt = self.tokenizer.encode(prompt)
            if isinstance(prompt, bytes) or not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids (or text, with a tokenizer)")
            cast = False
            for t in prompt:
                if type(t) is not int:  # numpy's integers are taken too (made ints below); bools are not
                    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                        raise ValueError(f"prompt {i}: token id {t!r} is not an integer")
                    cast = True
                if not 0 <= t < vocab:
                    raise ValueError(f"prompt {i}: token id {t!r} is not in the vocabulary [0, {vocab})")
            if cast:
                prompts[i] = prompt = [int(t) for t in prompt]
            if len(prompt) + p.max_new_tokens > max_len:
                raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceed "
                                 f"the model's {self.config.describe_context()}")
            fits, cached = self.kv_fits(len(prompt), p.max_new_tokens)
            if not fits:
                raise ValueError(f"prompt {i}: {cached} tokens of K/V do not fit the KV cache ({self.num_blocks} "
                                 f"blocks of {self.block_size}); raise num_blocks/kv_cache_bytes")
        return prompts, params
