"""Triton paged-attention decode: one query token per sequence over its K/V cache blocks.

`paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits)` equals softmax attention
of q [S, H, D] over the first context_lens[s] tokens found through block_tables[s] (the torch
reference is rollout.attention.paged_decode_reference). Ragged lengths, GQA (H a multiple of KVH),
any head dim and any block size (both padded to powers of two and masked).

One program per (sequence, KV head, split): it loads the GROUP query heads that share the KV head
as one [BLOCK_G, BLOCK_D] tile (so each K/V block is read once for all of them), walks its share of
the sequence's tokens in tiles of TILE_N (each token's row found through the block table, so a tile
may span blocks and any block size works) with an online softmax, and writes a normalized partial
output and its log-sum-exp. `num_splits > 1` is flash-decoding: long contexts are cut into
splits so that few sequences still fill the GPU; the splits are merged by their lse in torch. Every
shape is fixed by (S, num_splits), so the launch can be captured in a CUDA graph.

Cascade (`paged_decode_partials(..., members=...)`): a program may serve the queries of SEVERAL
sequences, `members[p]`, over one block table: the prompt blocks that G samples share are then read
once for up to 64 query rows (members x query heads of a KV head) instead of once per sample. The
engine attends each sample's own tail with the plain launch and merges both parts by their lse; a
program with no members reads nothing, so a CUDA graph can hold a fixed number of programs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, members_ptr, out_ptr, lse_ptr,
                         stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_tab, stride_mem, num_seqs,
                         scale, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         MEMBERS: tl.constexpr, HAS_MEMBERS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Program (p, KV head, split). Its query rows r = member * GROUP + query head within the KV head;
    # without members, p is a sequence and its only member.
    p, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # The split count is the grid's third axis, not a constexpr: the CUDA graphs' batch sizes use ~7
    # different counts, and each value would be one more compile. SPLIT (count > 1) stays a constexpr:
    # the unsplit kernel knows its range statically (the fp32 cascade spilled 1 KB on sm_90 without).
    num_splits = tl.num_programs(2) if SPLIT else 1
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    member, head_in_group = offs_r // GROUP, offs_r % GROUP
    mask_r, mask_d = member < MEMBERS, offs_d < HEAD_DIM
    if HAS_MEMBERS:
        seq = tl.load(members_ptr + p * stride_mem + member, mask=mask_r, other=num_seqs)  # num_seqs: padding
        mask_r = mask_r & (seq < num_seqs)
    else:
        seq = p + member  # MEMBERS == 1: every valid row is sequence p
    heads = kv_head * GROUP + head_in_group  # [BLOCK_R]

    q = tl.load(q_ptr + seq[:, None] * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]
    if UPCAST:  # the interpreter's low-precision dot is unreliable; fp32 products of bf16 are exact
        q = q.to(tl.float32)
    n_ctx = tl.load(lens_ptr + p)
    n_tiles = tl.cdiv(n_ctx, TILE_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, n_tiles)
    last = tl.where(tl.max(mask_r.to(tl.int32), 0) > 0, last, first)  # no member left: read nothing

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for t in range(first, last):
        tok = t * TILE_N + offs_n  # [TILE_N] positions; a tile may span several cache blocks
        valid = tok < n_ctx
        block_id = tl.load(tables_ptr + p * stride_tab + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = (block_id[:, None] * stride_kb + (tok % BLOCK_SIZE)[:, None] * stride_kt + kv_head * stride_kh
                  + offs_d[None, :])
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE_N, BLOCK_D]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_R, TILE_N] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every visited tile holds a valid token
        alpha = tl.exp(m_i - m_new)
        p_tile = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p_tile, 1)
        acc = acc * alpha[:, None] + tl.dot(p_tile.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # a split with no blocks: weight 0 in the merge
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [BLOCK_R] rows of [S, H, num_splits]
    tl.store(out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_r[:, None] & mask_d[None, :])
    tl.store(lse_ptr + base, lse, mask=mask_r)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _tile_n(block_d: int, dtype: torch.dtype) -> int:
    """Tokens per K/V tile: 4096 elements of K per tile in half precision, 2048 in fp32, at least 16 (tl.dot).

    Measured by compiling for sm_90 (tests/triton_aot.py, ptxas -v): bf16 at D = 128 takes 192
    registers with 32 tokens and spills at 64; fp32 at D = 128 with 32 tokens collapses to 32
    registers and 13 KB of spills per thread, with 16 tokens takes 104 and none.
    """
    return max(16, (2048 if dtype == torch.float32 else 4096) // block_d)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, num_splits: int = 1) -> torch.Tensor:
    """q [S, H, D]; k/v_cache [num_blocks, block_size, KVH, D]; block_tables [S, max_blocks] int32;
    context_lens [S] int32 (each >= 1) -> out [S, H, D] in q's dtype."""
    return merge_partials(*paged_decode_partials(q, k_cache, v_cache, block_tables, context_lens, num_splits),
                          q.dtype)


def paged_decode_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, num_splits: int = 1, members: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmerged attention: -> (out [S, H, num_splits, D] fp32, lse [S, H, num_splits] fp32).

    Without `members`, row s of block_tables / context_lens is sequence s's. With members [P, M] int32
    (S marks an empty place), row p is a run of blocks that the sequences members[p] all share: each of
    them gets that run's attention. Rows of sequences in no member list stay out 0, lse -inf.
    """
    S, H, D = q.shape
    _, block_size, KVH, Dk = k_cache.shape
    if Dk != D or H % KVH or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_decode: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1):
        raise ValueError("paged_decode: the caches and block tables must be contiguous")
    if members is not None and (members.shape[0] != block_tables.shape[0] or members.stride(1) != 1):
        raise ValueError(f"paged_decode: members {tuple(members.shape)} must be contiguous, a row per table row")
    # Shapes only (free): checking the lengths against the tables' width would sync with the GPU
    # every decode step; the engine builds them together (rollout/attention.py).
    if context_lens.shape != block_tables.shape[:1] or (members is None and block_tables.shape[0] != S):
        raise ValueError(f"paged_decode: {S} queries, block_tables {tuple(block_tables.shape)} and context_lens "
                         f"{tuple(context_lens.shape)} must have a row per sequence (per table row with members)")
    if not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"paged_decode: num_splits must be an int >= 1, got {num_splits!r}")
    q = q.contiguous()
    group = H // KVH
    num_members = 1 if members is None else members.shape[1]
    if members is None:  # every row is written
        out = torch.empty(S, H, num_splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(S, H, num_splits, device=q.device, dtype=torch.float32)
    else:
        out = torch.zeros(S, H, num_splits, D, device=q.device, dtype=torch.float32)
        lse = torch.full((S, H, num_splits), float("-inf"), device=q.device, dtype=torch.float32)
    upcast = os.environ.get("TRITON_INTERPRET") == "1" or q.dtype == torch.float32
    _paged_decode_kernel[(block_tables.shape[0], KVH, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, block_tables if members is None else members, out, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        0 if members is None else members.stride(0), S, D ** -0.5, HEAD_DIM=D, GROUP=group, BLOCK_SIZE=block_size,
        MEMBERS=num_members, HAS_MEMBERS=members is not None, BLOCK_R=_pow2(num_members * group),
        BLOCK_D=_pow2(D), TILE_N=_tile_n(_pow2(D), q.dtype), SPLIT=num_splits > 1, UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32",  # fp32 operands: no TF32 rounding; bf16/fp16: native MMA
        num_warps=4 if members is None else 8)  # 64 query rows: 4 warps would need > 255 registers (ptxas)
    return out, lse


def cascade_programs(group_tables: torch.Tensor, group_lens: torch.Tensor, member_index: torch.Tensor,
                     num_seqs: int, per_program: int, pad_member: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cascade groups as kernel programs of at most `per_program` members each, a group of m members
    getting ceil(m / per_program) programs over its blocks (so never more programs than members):
    -> (tables [P, W] int32, lens [P] int32, members [P, per_program] int32), for
    `paged_decode_partials(..., members=)`. group_tables [G, W], group_lens [G] (tokens), member_index
    [G, max_members] with `num_seqs` marking an empty place, which becomes `pad_member` (at least the
    batch's row count: a CUDA graph's batch has padding rows past num_seqs)."""
    G, width = member_index.shape
    device = member_index.device
    chunks = ((member_index < num_seqs).sum(1) + per_program - 1) // per_program  # [G] programs per group
    group_of = torch.repeat_interleave(torch.arange(G, device=device), chunks)  # [P]
    first = chunks.cumsum(0) - chunks  # [G] each group's first program
    chunk = torch.arange(group_of.shape[0], device=device) - first[group_of]  # [P] which chunk of its group
    cols = chunk[:, None] * per_program + torch.arange(per_program, device=device)[None, :]  # [P, per_program]
    members = member_index[group_of[:, None], cols.clamp_max(width - 1)]
    members = torch.where((cols < width) & (members < num_seqs), members, pad_member).int()
    return group_tables[group_of].int().contiguous(), group_lens[group_of].int(), members.contiguous()


def members_per_program(group: int) -> int:
    """Sequences one cascade program serves: up to 64 query rows (members x query heads per KV head)."""
    return max(1, 64 // group)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out [S, H, P, D], lse [S, H, P]) of P parts of the keys -> attention over all of them [S, H, D]."""
    if out.shape[2] == 1:
        return out[:, :, 0].to(dtype)
    weights = (lse - lse.logsumexp(-1, keepdim=True)).exp()  # [S, H, P]; empty parts get 0
    return (out * weights[..., None]).sum(2).to(dtype)
