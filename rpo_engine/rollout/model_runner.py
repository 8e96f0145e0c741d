"""Model runner: the only place that touches the K/V cache tensors.

It sizes and allocates the cache, turns a scheduled batch into flat inputs (token ids, positions,
slot mapping, attention metadata), runs ONE forward of the live model for all sequences of the step
with a paged backend, and returns fp32 logits of each sequence's last token. Prefill packs every new
token into one row (B = 1); decode puts one token per row (B = S). On CUDA the decode step replays a
CUDA graph captured for the next batch size up on a ladder (with triton_cascade, each graph also holds
the cascade launch, over fixed program buffers that a step without groups leaves empty); graphs hold
the parameters' addresses, so `refresh()` recaptures them if a parameter's storage was replaced
(in-place updates are seen).
The cache has one spare block past `num_blocks`: padding rows of a graph batch write and read there.
"""
from __future__ import annotations

import functools
import gc

import torch
import torch.nn.functional as F

from rpo_engine.model.lora import lora_modules
from rpo_engine.rollout.attention import (DecodeKV, DecodeMetadata, PagedDecode, PagedPrefill, PrefillMetadata,
                                          TritonDecode, cascade_layout, decode_metadata)
from rpo_engine.rollout.block_manager import BlockTables
from rpo_engine.rollout.sequence import Sequence
from rpo_engine.rollout.transfer import host_tensor, to_device


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits hidden @ weight.T. On CUDA a bf16/fp16 model's come from cuBLAS in fp32 (its accumulator,
    never rounded to the model dtype), as the Triton fused log-prob of the training forward keeps them: a
    bf16 LM head's rounding (half a bf16 step: up to 0.06 at a logit of 16, 0.12 at 32) is the largest
    single source of the rollout-vs-training probability gap (MiniMax-M1 found it so). Elsewhere the model
    dtype's product, as the torch fused log-prob rounds it."""
    if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype:
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    return F.linear(hidden, weight).float()


# what a RolloutEngine whose budget holds no K/V block advises (its arguments; the trainer says its option instead)
NO_BLOCK_ADVICE = "raise gpu_memory_utilization or pass kv_cache_bytes / num_blocks"


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int | None, kv_cache_bytes: int | None,
                 max_num_seqs: int, max_num_batched_tokens: int, attention_backend: str, use_cuda_graphs: bool,
                 gpu_memory_utilization: float, cascade: bool, triton_cascade: bool = False):
        cfg = model.config
        self.model, self.block_size, self.cascade = model, block_size, cascade
        self.triton_cascade = triton_cascade  # the Triton backend groups samples too (see the engine)
        if triton_cascade:
            from rpo_engine.kernels.paged_attention import members_per_program  # triton: only when used

            self.per_program = members_per_program(cfg.num_query_groups)
        self._programs_of, self._programs = None, None  # the cascade layout's member_index, its Triton programs
        self._layout_batch, self._layout = None, None  # the last decode batch's sequence ids and cascade layout
        self.device, self.dtype = model.device, model.dtype
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.attention_backend = attention_backend
        elem = torch.empty((), dtype=self.dtype).element_size()
        # The torch decode path groups samples by shared prompt blocks only when that saves reading
        # >= 1.25 MiB of K/V per layer a step: below, the second attention and the merge (~0.2 ms a
        # layer on the CPU) cost more than they save. Measured on CPU, 2-layer models, engine A/B: even
        # at 2.2k saved tokens of 512 B (the starter model) and 0.7k of 2 KiB (head dim 128). The
        # Triton cascade keeps 512 tokens (not yet measured on a GPU).
        kv_token_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * elem  # one token's K and V, one layer
        self.cascade_min_saved_tokens = -(-(5 << 18) // kv_token_bytes) if attention_backend == "torch" else 512
        self.block_bytes = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem
        self.max_blocks_per_seq = -(-cfg.max_model_len // block_size)
        sized_by_default = num_blocks is None and not kv_cache_bytes
        if num_blocks is None:
            num_blocks = (kv_cache_bytes or self._default_kv_bytes(gpu_memory_utilization)) // self.block_bytes
        if sized_by_default:
            # No more than max_num_seqs full-context sequences can use: a small model would otherwise get
            # millions of blocks (half an H100), each a Python object in the block manager.
            num_blocks = min(num_blocks, max_num_seqs * self.max_blocks_per_seq)
        if num_blocks < 1:
            hint = ""
            if sized_by_default and self.device.type == "cuda":  # e.g. another engine already holds its share
                hint = f"; {gpu_memory_utilization:.0%} of the GPU is already in use: {NO_BLOCK_ADVICE}"
            raise ValueError(f"KV cache budget too small: not one block of {self.block_bytes} bytes{hint}")
        self.num_blocks = int(num_blocks)
        self.kv_shape = (cfg.num_hidden_layers, self.num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = self.v_cache = None
        self.wake_up()
        self.pad_block = self.num_blocks
        # The block manager writes each live sequence's block table here (a row per sequence).
        self.block_tables = BlockTables(min(self.max_blocks_per_seq, self.num_blocks), self.pad_block,
                                        capacity=min(max_num_seqs, 1024))
        # The torch decode path on the CPU keeps each batch's gathered K/V from step to step.
        self.decode_kv = DecodeKV() if attention_backend == "torch" and self.device.type == "cpu" else None
        self._batch = None  # the decode batch's sequence ids, in order
        self.graphs: dict[int, tuple] = {}
        self.use_cuda_graphs = use_cuda_graphs
        self._captured_ptrs = None  # the storage the graphs read: every parameter's, then the K/V cache's
        if use_cuda_graphs:
            self.capture()

    def _default_kv_bytes(self, utilization: float) -> int:
        if self.device.type != "cuda":
            # CPU: 64k tokens, capped at the weights' own size (but 1 GiB is always allowed).
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            return min(65536 * (self.block_bytes // self.block_size), max(weight_bytes, 1 << 30))
        # CUDA: run the largest prefill once, then give the cache what is left under `utilization`.
        gc.collect()  # an engine that is garbage but still in a reference cycle would hold its cache
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ids = torch.zeros(1, self.max_num_batched_tokens, dtype=torch.long, device=self.device)
            self.model.hidden_states(ids)[:, -1:] @ self.model.lm_head.weight.T
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the prefill's freed activations: counted below as peak_extra, not twice
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        return int(total * utilization - (total - free) - peak_extra)

    # ---- one step ----------------------------------------------------------------------------
    def run(self, seqs: list[Sequence], is_prefill: bool, copies: list[tuple[int, int]],
            input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [len(seqs), vocab] fp32 at each sequence's last token. `input_ids` [S] (decode, async
        scheduling): the sequences' last tokens, still on the device where the previous step sampled them."""
        if copies:  # copy-on-write of shared partial blocks, before this step writes into them
            src, dst = (host_tensor(c, self.device) for c in zip(*copies))
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]
        # inference_mode, not just no_grad: ops skip autograd's dispatch and version counting (a decode step of the
        # default job is ~150 small ops: 7% of its rollout on a CPU core). What it makes (logits, metadata, the kept
        # K/V copies) never reaches autograd; the weights are only read, and the K/V cache, a normal tensor, is
        # written in place, which inference mode allows: the same weights train with autograd after.
        with torch.inference_mode():
            if is_prefill:
                ids, pos, attn, last = self._prepare_prefill(seqs)
                hidden = self.model.hidden_states(ids, position_ids=pos, attn=attn)[0, last]  # [S, hidden]
                return head_logits(hidden, self.model.lm_head.weight)
            ids, pos, meta = self._prepare_decode(seqs, input_ids)
            if self.graphs:
                return self._replay(ids, pos, meta)
            return self._decode_forward(ids, pos, self._decode_backend(meta, len(seqs)))

    def _prepare_prefill(self, seqs):
        bs, ids, pos, slots, new_lens, cached_lens, tables, last = self.block_size, [], [], [], [], [], [], []
        for seq in seqs:
            c, n = seq.num_cached_tokens, len(seq)
            ids += seq.token_ids[c:]
            pos += range(c, n)
            for i in range(c // bs, seq.num_blocks):  # slots of tokens c..n-1, block by block
                base = seq.block_table[i] * bs
                slots += range(base + max(c - i * bs, 0), base + min(n - i * bs, bs))
            new_lens.append(n - c)
            cached_lens.append(c)
            tables.append(torch.tensor(seq.block_table, device=self.device) if c else None)
            last.append(len(ids) - 1)
        meta = PrefillMetadata(torch.tensor(slots, device=self.device), new_lens, cached_lens, tables)
        ids = torch.tensor([ids], device=self.device)  # [1, N]
        pos = torch.tensor([pos], device=self.device)  # [1, N]
        return ids, pos, PagedPrefill(self.k_cache, self.v_cache, meta), torch.tensor(last, device=self.device)

    def _prepare_decode(self, seqs, input_ids=None):
        # Flat lists: a list of one-element lists converts several times slower.
        ids = host_tensor([seq.token_ids[-1] for seq in seqs], self.device) if input_ids is None else input_ids
        lens = torch.tensor([len(seq.token_ids) + seq.num_pending for seq in seqs], dtype=torch.int32)  # num_tokens
        pos = to_device((lens - 1).long(), self.device)
        tables, layout = self.block_tables.gather(seqs), None
        grouped = self.cascade and (self.attention_backend == "torch" or self.triton_cascade)
        if grouped or self.decode_kv is not None:  # both keep state for as long as the batch stays the same
            self._batch = batch = tuple(seq.uid for seq in seqs)
        if grouped:
            # Samples of one prompt share its full blocks: read once per group (torch; Triton if asked).
            if batch != self._layout_batch:  # else the same sequences in the same order: the same groups
                self._layout = cascade_layout(tables, [seq.num_prompt_tokens // self.block_size for seq in seqs],
                                              self.block_size, self.pad_block, self.device,
                                              self.cascade_min_saved_tokens)
                self._layout_batch = batch
            layout = self._layout
        return ids[:, None], pos[:, None], decode_metadata(tables, lens, self.block_size, self.pad_block, self.device,
                                                          layout)

    def _decode_backend(self, meta: DecodeMetadata, batch: int):
        if self.attention_backend == "triton":
            programs = self._cascade_programs(meta) if meta.group_tables is not None else None
            return TritonDecode(self.k_cache, self.v_cache, meta, self._num_splits(batch), programs)
        kept = self.decode_kv
        layers = self.model.config.num_hidden_layers
        if kept is not None and not kept.start_step(self._batch, meta, layers, self.block_bytes // layers):
            kept = None
        return PagedDecode(self.k_cache, self.v_cache, meta, kept)

    def _cascade_programs(self, meta: DecodeMetadata):
        """The Triton cascade launch's (tables, lens, members) for `meta`'s groups. They follow from the
        cascade layout, which `_prepare_decode` keeps while the batch's sequences stay the same: made
        again only for a new layout (its member_index tensor)."""
        if meta.member_index is not self._programs_of:
            from rpo_engine.kernels.paged_attention import cascade_programs  # triton: only when used

            # Empty places point past every row of any batch or graph (max_num_seqs): they read nothing.
            self._programs = cascade_programs(meta.group_tables, meta.group_lens, meta.member_index,
                                              meta.context_lens.shape[0], self.per_program, self.max_num_seqs)
            self._programs_of = meta.member_index
        return self._programs

    def _num_splits(self, batch: int) -> int:
        # Flash-decoding: enough (sequence, kv head, split) programs to cover the SMs twice.
        if self.device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return max(1, min(16, -(-2 * sms // (batch * self.model.config.num_key_value_heads))))

    def _decode_forward(self, ids, pos, attn) -> torch.Tensor:
        hidden = self.model.hidden_states(ids, position_ids=pos, attn=attn)[:, 0]  # [S, hidden]
        return head_logits(hidden, self.model.lm_head.weight)  # [S, vocab] fp32

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _graph_forward(self, ids, pos, attn, logits: torch.Tensor) -> torch.Tensor:
        """The decode forward into `logits` (a graph's rows of g_logits); its own logits, freed before the
        capture ends, share the pool with every graph's."""
        return logits.copy_(self._decode_forward(ids, pos, attn))

    def capture(self):
        """Capture the decode forward for batch sizes 1, 2, 4, 8, then every multiple of 16, and max_num_seqs."""
        with torch.inference_mode(False):  # its buffers, written in place by every later call (see wake_up)
            self._capture()

    def _capture(self):
        n, d = self.max_num_seqs, self.device
        sizes = sorted({1, 2, 4, 8, *range(16, n + 1, 16), n})
        self.g_ids = torch.zeros(n, 1, dtype=torch.long, device=d)
        self.g_pos = torch.zeros(n, 1, dtype=torch.long, device=d)
        self.g_slots = torch.zeros(n, dtype=torch.long, device=d)
        self.g_lens = torch.ones(n, dtype=torch.int32, device=d)
        self.g_tables = torch.full((n, self.max_blocks_per_seq), self.pad_block, dtype=torch.int32, device=d)
        if self.triton_cascade:  # cascade programs: at most one per sequence (a group has >= 2 members)
            self.g_program_tables = torch.full_like(self.g_tables, self.pad_block)
            self.g_program_lens = torch.zeros(n, dtype=torch.int32, device=d)  # 0: the program reads nothing
            self.g_program_members = torch.full((n, self.per_program), n, dtype=torch.int32, device=d)  # n: none
        # One logits buffer for every graph, each writing its rows: a graph's own output stays allocated in the
        # pool, which summed over the ladder is ~2,200 rows of vocab fp32 at 256 sequences (1.3 GB at Qwen's
        # 151,936 tokens), made after the K/V cache was sized
        self.g_logits = torch.empty(n, self.model.config.vocab_size, dtype=torch.float32, device=d)
        self.graphs, pool = {}, None
        with torch.no_grad():
            for size in reversed(sizes):  # largest first, so smaller graphs fit in its memory pool
                meta = DecodeMetadata(self.g_slots[:size], self.g_lens[:size], self.g_tables[:size])
                programs = None  # with triton_cascade: the graph's buffers, g_tables then holding the tails
                if self.triton_cascade:
                    programs = (self.g_program_tables[:size], self.g_program_lens[:size],
                                self.g_program_members[:size])
                attn = TritonDecode(self.k_cache, self.v_cache, meta, self._num_splits(size), programs)
                self._fill_padding(0, size)
                forward = functools.partial(self._graph_forward, self.g_ids[:size], self.g_pos[:size], attn,
                                            self.g_logits[:size])
                forward()  # warm-up: compiles the kernels outside the capture
                graph, logits = self._capture_graph(forward, pool)
                pool = graph.pool()
                self.graphs[size] = (graph, logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._captured_ptrs = self._graph_storage()

    def _graph_storage(self) -> list:
        """Where the graphs read: the parameters, LoRA's merged rollout copies (made again after a sleep), the cache;
        and which of its branches each adapter took when captured (adapters_disabled, the merged copy in use): a
        graph replays the branch it captured, whatever the flags say at replay."""
        adapters = lora_modules(self.model).values()
        merged = [m.rollout_weight.data_ptr() for m in adapters if m.rollout_weight is not None]
        switches = [(m.adapter_enabled, m.use_rollout_weight) for m in adapters]
        return ([p.data_ptr() for p in self.model.parameters()] + merged
                + [self.k_cache.data_ptr(), self.v_cache.data_ptr()] + switches)

    @staticmethod
    def _capture_graph(forward, pool):
        """-> (graph, output): graph.replay() reruns forward's kernels on the same input and output buffers.
        The one CUDA-only call here; tests stand an eager replay in for it to check the buffer logic on CPU."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            output = forward()
        return graph, output

    def release(self):
        """After a generate call: drop what was kept for its decode steps."""
        if self.decode_kv is not None:
            self.decode_kv.reset()

    def sleep(self):
        """Drop the K/V cache (RolloutEngine.sleep); `wake_up` makes it again."""
        self.release()
        self.k_cache = self.v_cache = None

    def wake_up(self):
        # zeros: the padding block's reads stay finite. A normal tensor even when a call inside inference_mode (an
        # eval's) makes it: a later call outside one writes into it in place, which an inference tensor refuses.
        if self.k_cache is None:
            with torch.inference_mode(False):
                self.k_cache = torch.zeros(self.kv_shape, dtype=self.dtype, device=self.device)
                self.v_cache = torch.zeros(self.kv_shape, dtype=self.dtype, device=self.device)

    def refresh(self):
        if (self.model.dtype, self.model.device) != (self.dtype, self.device):  # the cache is sized and typed for these
            raise RuntimeError(f"the model is now {self.model.dtype} on {self.model.device}; this RolloutEngine's "
                               f"K/V cache was made for {self.dtype} on {self.device}: make a new RolloutEngine")
        self.wake_up()
        # a parameter's storage replaced, or the cache made again elsewhere after a sleep: the graphs read the old
        if self.graphs and self._captured_ptrs != self._graph_storage():
            self.capture()

    def _fill_padding(self, start: int, end: int):
        self.g_ids[start:end] = 0
        self.g_pos[start:end] = 0
        self.g_slots[start:end] = self.pad_block * self.block_size
        self.g_lens[start:end] = 1
        self.g_tables[start:end, 0] = self.pad_block

    def _replay(self, ids, pos, meta: DecodeMetadata) -> torch.Tensor:
        S = ids.shape[0]
        size = min(s for s in self.graphs if s >= S)
        tables, lens = meta.block_tables, meta.context_lens
        if self.triton_cascade:  # this graph also runs the cascade programs: fill them, or leave them empty
            num_programs = 0
            if meta.group_tables is not None:
                tables, lens = meta.tail_tables, meta.tail_lens
                p_tables, p_lens, p_members = self._cascade_programs(meta)
                num_programs, width = p_tables.shape
                self.g_program_tables[:num_programs, :width] = p_tables
                self.g_program_lens[:num_programs], self.g_program_members[:num_programs] = p_lens, p_members
            self.g_program_lens[num_programs:size] = 0
            self.g_program_members[num_programs:size] = self.max_num_seqs
        width = tables.shape[1]
        self.g_ids[:S], self.g_pos[:S] = ids, pos
        self.g_slots[:S], self.g_lens[:S] = meta.slot_mapping, lens
        self.g_tables[:S, :width] = tables
        self._fill_padding(S, size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:S]
