"""Paged-KV-cache attention backends for the decoder's `attn(layer_idx, q, k, v) -> out` hook.

Cache: k_cache / v_cache [num_layers, num_blocks, block_size, KVH, D]; a token's slot is
block_id * block_size + offset. Every backend first writes the new K/V at their slots, then reads.

- PagedPrefill: a packed varlen batch (B = 1, T = all new tokens). Per sequence, causal SDPA over
  its new tokens, or, with a cached prefix, SDPA over [prefix + new] gathered from its blocks.
  All K/V of a layer are written before any sequence reads, so a sequence may use blocks another
  sequence of the same batch is filling (a prefix-cache hit within one batch).
- PagedDecode: one query per sequence (B = S, T = 1), pure torch, runs anywhere. Two-level
  ("cascade") attention: the leading blocks a group of samples shares (its prompt) are gathered and
  attended ONCE per group, as one matmul for all its queries; each sequence's own tail separately;
  the two are merged by their log-sum-exps. With G samples per prompt this reads the prompt's K/V
  once instead of G times, which is what decode time on a CPU is made of. On the CPU a DecodeKV keeps
  the gathered K/V from step to step (a step adds one token a sequence), instead of gathering every
  sequence's blocks again each step and layer.
- TritonDecode: the Triton paged-decode kernel (kernels/paged_attention.py), one pass over each
  sequence's blocks, fixed-shape metadata: used on CUDA and under CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rpo_engine.model.decoder import sdpa
from rpo_engine.rollout.transfer import host_tensor, to_device


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    # k_cache [num_blocks, block_size, KVH, D]; k/v [N, KVH, D]; slots [N]
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)


def gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    # cache [num_blocks, block_size, KVH, D]; tables [B, nb] -> [B, nb * block_size, KVH, D]
    B, nb = tables.shape
    return cache.index_select(0, tables.reshape(-1)).view(B, nb * cache.shape[1], *cache.shape[2:])


def key_bias(lens: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L]: 0 for each row's first lens[b] keys, -inf past them (an additive attention mask)."""
    valid = torch.arange(L, device=lens.device)[None, :] < lens[:, None]  # [B, L]
    return torch.zeros(lens.shape[0], 1, 1, L, dtype=dtype, device=lens.device).masked_fill_(
        ~valid[:, None, None], float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, bias: torch.Tensor | None = None):
    """Softmax attention of M queries over the first lens[b] keys, GQA, with the log-sum-exp.

    q [B, M, H, D]; k/v [B, L, KVH, D]; lens [B] -> out [B, M, H, D] fp32, lse [B, M, H] fp32.
    `bias`: key_bias(lens, L, q.dtype), when the caller has it (the same for every layer of a step).
    """
    B, M, H, D = q.shape
    L, KVH = k.shape[1], k.shape[2]
    R = H // KVH
    # Put the R query heads of each KV head (and all M queries) in one attention row block: [B, KVH, M*R, D].
    qf = q.view(B, M, KVH, R, D).permute(0, 2, 1, 3, 4).reshape(B, KVH, M * R, D)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, KVH, L, D] views, no copy
    if bias is None:
        bias = key_bias(lens, L, q.dtype)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(qf, kt, vt, attn_mask=bias)  # [B, KVH, M*R, D], [B, KVH, M*R]; fused, ~4x the matmuls
    else:
        scores = qf.float() @ kt.float().transpose(-1, -2) * D ** -0.5  # [B, KVH, M*R, L]
        scores += bias.float()  # -inf past each row's keys
        lse = scores.logsumexp(-1)  # [B, KVH, M*R]
        out = (scores - lse[..., None]).exp() @ vt.float()  # [B, KVH, M*R, D]
    out = out.float().view(B, KVH, M, R, D).permute(0, 2, 1, 3, 4).reshape(B, M, H, D)
    return out, lse.float().view(B, KVH, M, R).permute(0, 2, 1, 3).reshape(B, M, H)


# torch's CPU flash-attention kernel, which also returns the lse that merging two attention parts needs.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class PrefillMetadata:
    slot_mapping: torch.Tensor  # [N] long: where each new token's K/V go
    new_lens: list[int]  # new tokens per sequence, in packing order
    cached_lens: list[int]  # tokens of each sequence already in the cache (its prefix)
    block_tables: list[torch.Tensor | None]  # [num_blocks] long per sequence with a cached prefix


class PagedPrefill:
    def __init__(self, k_cache, v_cache, meta: PrefillMetadata):
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta

    def __call__(self, layer_idx, q, k, v):
        # q [1, N, H, D]; k/v [1, N, KVH, D] -> [1, N, H, D]
        kc, vc, m = self.k_cache[layer_idx], self.v_cache[layer_idx], self.meta
        write_kv(kc, vc, k[0], v[0], m.slot_mapping)
        outs, start = [], 0
        for n, c, table in zip(m.new_lens, m.cached_lens, m.block_tables):
            qi = q[0, start:start + n]  # [n, H, D]
            if c == 0:
                ki, vi, mask = k[0, start:start + n], v[0, start:start + n], None  # [n, KVH, D]
            else:
                ki = gather(kc, table[None])[0, :c + n]  # [c + n, KVH, D]
                vi = gather(vc, table[None])[0, :c + n]
                pos = torch.arange(c + n, device=q.device)
                mask = pos[None, :] <= (c + pos[:n])[:, None]  # [n, c + n]: query j sits at position c + j
            o = sdpa(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], attn_mask=mask,
                     is_causal=mask is None)  # [1, H, n, D]
            outs.append(o[0].transpose(0, 1))
            start += n
        return torch.cat(outs)[None]


@dataclass
class DecodeMetadata:
    slot_mapping: torch.Tensor  # [S] long
    context_lens: torch.Tensor  # [S] int32: keys each query sees, itself included
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with a valid block id
    # Cascade split (torch path): shared leading blocks per group, then each sequence's own tail.
    group_tables: torch.Tensor | None = None  # [G, max_group_blocks] long
    group_lens: torch.Tensor | None = None  # [G]
    member_index: torch.Tensor | None = None  # [G, max_members]: query row, or S for padding
    member_slot: torch.Tensor | None = None  # [S]: g * max_members + m, or G * max_members if no group
    tail_tables: torch.Tensor | None = None  # [S, max_tail_blocks]; None: no groups, the tails are block_tables
    tail_lens: torch.Tensor | None = None  # [S]


@dataclass
class CascadeLayout:
    """Which decode rows read which shared leading blocks together. It depends only on which sequences
    are in the batch, in which order (a live sequence's full prompt blocks never change), so the model
    runner builds it again only when they change."""
    shared: torch.Tensor  # [S] host long: leading blocks each row's group reads for it (0: in no group)
    group_tables: torch.Tensor  # [G, max_shared_blocks] long
    group_lens: torch.Tensor  # [G] tokens
    member_index: torch.Tensor  # [G, max_members]: rows, S for padding
    member_slot: torch.Tensor  # [S]: g * max_members + m, or G * max_members if in no group


def cascade_layout(block_tables: torch.Tensor, num_shared_blocks: list[int], block_size: int, pad_block: int,
                   device, min_saved_tokens: int = 0) -> CascadeLayout | None:
    """Group the rows of `block_tables` (host int32 [S, W], padded with `pad_block`) whose first k blocks
    are the same, k = num_shared_blocks[row] (a sequence's prompt's full blocks). None when grouping saves
    reading fewer than `min_saved_tokens` K/V tokens a step (sum over groups of (members - 1) x shared
    tokens): then a second attention and a merge per layer cost more than they save."""
    S = block_tables.shape[0]
    groups = cascade_groups(block_tables, num_shared_blocks)
    if sum((len(members) - 1) * k * block_size for k, members in groups) < max(1, min_saved_tokens):
        return None
    width = max(len(members) for _, members in groups)
    shared, slot = [0] * S, [len(groups) * width] * S
    for g, (k, members) in enumerate(groups):
        for m, s in enumerate(members):
            shared[s], slot[s] = k, g * width + m
    # Each group's table: its first member's, cut after the shared blocks.
    first = torch.tensor([members[0] for _, members in groups])
    group_k = torch.tensor([k for k, _ in groups])
    columns = torch.arange(int(group_k.max()))[None, :]
    group_tables = block_tables.index_select(0, first)[:, :columns.shape[1]]
    return CascadeLayout(
        shared=torch.tensor(shared),
        group_tables=to_device(group_tables.masked_fill(columns >= group_k[:, None], pad_block).long(), device),
        group_lens=to_device(group_k * block_size, device),
        member_index=host_tensor([members + [S] * (width - len(members)) for _, members in groups], device),
        member_slot=host_tensor(slot, device))


def decode_metadata(block_tables: torch.Tensor, context_lens, block_size: int, pad_block: int, device,
                    layout: CascadeLayout | None = None) -> DecodeMetadata:
    """Metadata for S decode queries from their block tables, a host int32 tensor [S, W] padded with
    `pad_block`, and their context lengths (a list, or a host tensor); with a cascade `layout` (torch path, or Triton with
    triton_cascade), also each group's tables and each row's tail after its group's blocks.

    Everything past the Python lists of length S is tensor work: a nested list of Python ints converts
    at ~150 ns an int, which at 256 sequences of 4k tokens was milliseconds a step.
    """
    W = block_tables.shape[1]
    lens = torch.as_tensor(context_lens, dtype=torch.int32)
    last = block_tables.gather(1, ((lens - 1) // block_size).long()[:, None])[:, 0]  # block of each last token
    meta = DecodeMetadata(slot_mapping=to_device(last.long() * block_size + (lens - 1) % block_size, device),
                          context_lens=to_device(lens, device), block_tables=to_device(block_tables, device))
    if layout is None:
        return meta
    meta.group_tables, meta.group_lens = layout.group_tables, layout.group_lens
    meta.member_index, meta.member_slot = layout.member_index, layout.member_slot
    # Each tail: the table from its first unshared block on, shifted left, padded past the table's end.
    # As wide as the longest tail, not W - min(k): rows of a short prompt and a short context would
    # otherwise pad every row's tail to the longest context (in RPO rollouts, ~3x the tail blocks).
    k = layout.shared
    width = int(((lens + block_size - 1) // block_size - k).max())
    index = k[:, None] + torch.arange(width)[None, :]  # [S, tail width]
    tails = block_tables.gather(1, index.clamp_max(W - 1)).masked_fill_(index >= W, pad_block)
    meta.tail_tables = to_device(tails.long(), device)
    meta.tail_lens = to_device(lens - k * block_size, device)
    return meta


def cascade_groups(block_tables: torch.Tensor, num_shared_blocks: list[int]) -> list[tuple[int, list[int]]]:
    """[(k, rows)]: rows (two or more) of `block_tables` [S, W] whose first k blocks are the same ids,
    k = num_shared_blocks[row] > 0."""
    S = len(num_shared_blocks)
    ks = torch.tensor(num_shared_blocks)
    last_shared = block_tables.gather(1, (ks - 1).clamp_min(0)[:, None])[:, 0].tolist()
    candidates: dict[tuple[int, int], list[int]] = {}
    for s, (k, block_id) in enumerate(zip(num_shared_blocks, last_shared)):
        if k > 0:
            candidates.setdefault((k, block_id), []).append(s)
    # Holding the same block at index k - 1 nearly always means the same k blocks (forks copy the table,
    # prefix-cache hits are leading runs), but two copies of one earlier block can differ in id: confirm
    # each member against its candidate group's first.
    leader = list(range(S))
    for members in candidates.values():
        for s in members:
            leader[s] = members[0]
    K = int(ks.max())
    head = block_tables[:, :K]
    same = ((head == head[leader]) | (torch.arange(K)[None, :] >= ks[:, None])).all(1).tolist()
    groups = []
    for (k, _), members in candidates.items():
        members = [s for s in members if same[s]]
        if len(members) > 1:
            groups.append((k, members))
    return groups


class DecodeKV:
    """The decode batch's K/V gathered out of the paged cache, kept from one step to the next (torch path).

    Gathering copies every sequence's whole context, per layer and step: with long contexts on the CPU
    about as long as the attention itself. While the batch (its sequences, in order, so also its cascade
    layout) stays the same, a step only adds one token to each sequence: the kept copy takes that token
    and nothing else is copied. Each row's copy has room to grow (half as many blocks again, at least 2);
    when a row outgrows it, when the batch changes, or when the lengths did not grow by exactly one, it is
    gathered again. The copies hold the cache's own values, so attention over them is the same. Above
    `max_bytes` nothing is kept. Measured: 5.2 -> 4.2 s on bench_rollout's 8 x 16 samples of 256 + 128
    tokens; no gain on the default job's short RPO rollouts (within noise), whose gathers are small.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.reset()

    def reset(self):
        self.key, self.lens, self.tail_kv, self.shared_kv = None, None, {}, {}

    def start_step(self, key, meta: DecodeMetadata, num_layers: int, block_bytes: int) -> bool:
        """Before a decode step: `key` names the batch (its sequence ids, in order), `block_bytes` is one
        block's K and V in one layer. -> whether this step uses the kept copies."""
        tables, lens = (meta.block_tables, meta.context_lens) if meta.group_tables is None else \
            (meta.tail_tables, meta.tail_lens)
        if key != self.key or self.lens is None or not torch.equal(lens, self.lens + 1):
            self.reset()
            self.key = key
        self.lens = lens
        self.rows, self.last = torch.arange(lens.shape[0]), (lens - 1).long()  # where each row's new K/V go
        blocks = 2 * tables.numel() + (0 if meta.group_tables is None else meta.group_tables.numel())
        if blocks * num_layers * block_bytes > self.max_bytes:
            self.reset()
            return False
        return True

    def tails(self, layer, kc, vc, tables, lens, k_new, v_new):
        """The K/V of each row's `tables` up to its length, [S, L, KVH, D] each (L = lens.max()), given the
        step's new K/V [S, KVH, D], already written to the cache at each row's last position."""
        L = int(lens.max())
        kept = self.tail_kv.get(layer)
        if kept is None or kept[0].shape[1] < L:  # gathered with room for half as many blocks again, at
            extra = max(2, tables.shape[1] // 2)  # least 2 (the extra read is unused)
            wide = torch.cat([tables, tables[:, -1:].expand(-1, extra)], 1)
            kept = (gather(kc, wide), gather(vc, wide))
            self.tail_kv[layer] = kept
        else:  # one new token a row, at its last position
            kept[0][self.rows, self.last] = k_new
            kept[1][self.rows, self.last] = v_new
        return kept[0][:, :L], kept[1][:, :L]

    def group_kv(self, layer, kc, vc, group_tables):
        """The cascade groups' shared blocks: the same all through a layout, gathered once."""
        if layer not in self.shared_kv:
            self.shared_kv[layer] = (gather(kc, group_tables), gather(vc, group_tables))
        return self.shared_kv[layer]


class PagedDecode:
    def __init__(self, k_cache, v_cache, meta: DecodeMetadata, kept: DecodeKV | None = None):
        self.k_cache, self.v_cache, self.meta, self.kept = k_cache, v_cache, meta, kept
        self._biases = {}  # the step's attention masks, made by its first layer for all the others

    def _kv(self, layer_idx, kc, vc, tables, lens, k, v):
        if self.kept is None:
            return gather(kc, tables), gather(vc, tables)
        return self.kept.tails(layer_idx, kc, vc, tables, lens, k[:, 0], v[:, 0])

    def _attend(self, name: str, q, keys, values, lens):
        key = (name, keys.shape[1])
        if key not in self._biases:
            self._biases[key] = key_bias(lens, keys.shape[1], q.dtype)
        return attend(q, keys, values, lens, self._biases[key])

    def __call__(self, layer_idx, q, k, v):
        # q [S, 1, H, D]; k/v [S, 1, KVH, D] -> [S, 1, H, D]
        kc, vc, m = self.k_cache[layer_idx], self.v_cache[layer_idx], self.meta
        write_kv(kc, vc, k[:, 0], v[:, 0], m.slot_mapping)
        if m.group_tables is None:  # no cascade groups: one attention over each whole table
            keys, values = self._kv(layer_idx, kc, vc, m.block_tables, m.context_lens, k, v)
            return self._attend("whole", q, keys, values, m.context_lens)[0].to(q.dtype)
        # torch's CPU flash kernel returns its output in the inputs' dtype: two bf16-rounded parts, merged and
        # rounded again, would carry twice one rounding's error. In fp32 the merge rounds once, as the Triton
        # kernel's fp32 partials do.
        wide = (lambda t: t.float()) if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) \
            else (lambda t: t)  # noqa: E731
        keys, values = self._kv(layer_idx, kc, vc, m.tail_tables, m.tail_lens, k, v)
        out, lse = self._attend("tail", wide(q), wide(keys), wide(values), m.tail_lens)  # [S, 1, H, *]
        S, _, H, D = q.shape
        q_pad = torch.cat([q[:, 0], q.new_zeros(1, H, D)])  # [S + 1, H, D]: row S is padding
        if self.kept is None:
            keys, values = gather(kc, m.group_tables), gather(vc, m.group_tables)
        else:
            keys, values = self.kept.group_kv(layer_idx, kc, vc, m.group_tables)
        out_g, lse_g = self._attend("group", wide(q_pad[m.member_index]), wide(keys), wide(values),
                                    m.group_lens)  # [G, M, H, *]
        out_g = torch.cat([out_g.flatten(0, 1), out_g.new_zeros(1, H, D)])[m.member_slot]  # [S, H, D]
        lse_g = torch.cat([lse_g.flatten(0, 1), lse_g.new_full((1, H), float("-inf"))])[m.member_slot]
        lse_t, out_t = lse[:, 0], out[:, 0]
        total = torch.logaddexp(lse_g, lse_t)  # [S, H]
        out = (out_g * (lse_g - total).exp()[..., None] + out_t * (lse_t - total).exp()[..., None])[:, None]
        return out.to(q.dtype)


class TritonDecode:
    """One launch over each sequence's table; or, given cascade `programs` (tables, lens, members, as
    kernels.paged_attention.cascade_programs makes them), each sample's own tail plus each group's shared
    blocks read once for all its members (a second launch), merged by lse. The tails are `meta`'s tail
    tables when it has groups, else its block tables (a CUDA graph's buffers, filled with tails)."""

    def __init__(self, k_cache, v_cache, meta: DecodeMetadata, num_splits: int = 1, programs=None):
        from rpo_engine.kernels import paged_attention  # imports triton: only when used

        self.k_cache, self.v_cache, self.meta, self.num_splits = k_cache, v_cache, meta, num_splits
        self.kernels, self.programs = paged_attention, programs
        self.tables, self.lens = meta.block_tables, meta.context_lens
        if programs is not None and meta.tail_tables is not None:
            self.tables, self.lens = meta.tail_tables.int(), meta.tail_lens.int()

    def __call__(self, layer_idx, q, k, v):
        # q [S, 1, H, D]; k/v [S, 1, KVH, D] -> [S, 1, H, D]
        kc, vc, pa = self.k_cache[layer_idx], self.v_cache[layer_idx], self.kernels
        write_kv(kc, vc, k[:, 0], v[:, 0], self.meta.slot_mapping)
        if self.programs is None:
            return pa.paged_decode(q[:, 0], kc, vc, self.tables, self.lens, self.num_splits)[:, None]
        # Splits for the tails too: in a graph whose step has no groups, the "tails" are whole contexts.
        out_t, lse_t = pa.paged_decode_partials(q[:, 0], kc, vc, self.tables, self.lens, self.num_splits)
        tables, lens, members = self.programs
        out_g, lse_g = pa.paged_decode_partials(q[:, 0], kc, vc, tables, lens, self.num_splits, members)
        return pa.merge_partials(torch.cat([out_t, out_g], 2), torch.cat([lse_t, lse_g], 2), q.dtype)[:, None]


def paged_decode_reference(q, k_cache, v_cache, block_tables: list[list[int]], context_lens: list[int]):
    """One sequence at a time, SDPA over its gathered blocks. q [S, H, D] -> [S, H, D]; for tests."""
    outs = []
    for qi, table, n in zip(q, block_tables, context_lens):
        idx = torch.tensor(table, device=q.device)
        ki = k_cache[idx].flatten(0, 1)[:n].transpose(0, 1)  # [KVH, n, D]
        vi = v_cache[idx].flatten(0, 1)[:n].transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qi[:, None], ki, vi, enable_gqa=ki.shape[0] != qi.shape[0])[:, 0])
    return torch.stack(outs)
