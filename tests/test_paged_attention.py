"""Paged attention: the Triton decode kernel (interpreter on CPU, compiled with RPO_TEST_DEVICE=cuda) and the
torch backends against plain SDPA."""
import pytest
import torch
import torch.nn.functional as F

from rpo_engine.rollout.attention import (DecodeKV, PagedDecode, PagedPrefill, PrefillMetadata, cascade_groups,
                                          cascade_layout, decode_metadata, gather, paged_decode_reference)
from tests.helpers import DEVICE, ON_CUDA


pytestmark = pytest.mark.usefixtures("one_thread")


def random_cache(num_blocks, block_size, kv_heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def scattered_tables(lens, block_size, num_blocks, seed=0):
    """Each sequence gets its own blocks, in a shuffled order (so paging is really exercised)."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, i = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[i:i + nb])
        i += nb
    return tables


def padded(tables, pad=0):
    width = max(map(len, tables))
    return torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,splits,dtype", [
    (4, 2, 12, 16, 1, torch.float32),  # GQA 2:1, small odd head dim (the llama test model)
    (4, 1, 16, 5, 3, torch.float32),  # MQA, block size not a power of two, flash-decoding splits
    (8, 8, 64, 32, 2, torch.float32),  # MHA, head dim 64
    (12, 2, 128, 16, 1, torch.float32),  # Qwen2.5-1.5B's head layout: 6 query heads per KV head, D 128
    (6, 2, 64, 100, 1, torch.float32),  # a block larger than one 64-token tile
    (4, 2, 64, 16, 2, torch.bfloat16),
])
def test_triton_decode_matches_torch(heads, kv_heads, head_dim, block_size, splits, dtype):
    lens = [1, block_size, block_size + 3, 3 * block_size - 1, 57]  # ragged, block edges included
    out, ref, (k_cache, v_cache, q, tables) = _triton_decode_and_reference(heads, kv_heads, head_dim, block_size,
                                                                           splits, dtype, lens)
    atol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the output
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    # And the torch backend the engine uses on CPU. It first writes each query's own K/V: give it
    # what the cache already holds there, so both read the same cache.
    kc, vc = k_cache.float(), v_cache.float()
    last = [(t[(n - 1) // block_size], (n - 1) % block_size) for t, n in zip(tables, lens)]
    k_last = torch.stack([kc[b, o] for b, o in last])[:, None]  # [S, 1, KVH, D]
    v_last = torch.stack([vc[b, o] for b, o in last])[:, None]
    meta = decode_metadata(padded(tables), lens, block_size, 0, "cpu")
    torch_out = PagedDecode(kc[None], vc[None], meta)(0, q.float()[:, None], k_last, v_last)[:, 0]
    torch.testing.assert_close(out.float(), torch_out, atol=atol, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,splits,dtype", [
    (12, 2, 32, 4, 1, torch.float32),  # 6 query heads per KV head: 10 members a program, 13 in a group
    (4, 4, 16, 16, 2, torch.float32),  # MHA: 64 members a program
    (4, 2, 64, 16, 3, torch.bfloat16),
])
def test_triton_cascade_matches_reference(heads, kv_heads, head_dim, block_size, splits, dtype):
    """Shared prompt blocks attended once per group (members' queries together) + each sample's own tail,
    merged by lse, equal attention over each whole table; rows in no group get the tail alone."""
    from rpo_engine.kernels.paged_attention import (cascade_programs, members_per_program, merge_partials,
                                                    paged_decode_partials)

    g = torch.Generator().manual_seed(0)
    prompts = [(5, 13), (2, 3), (0, 2)]  # (shared blocks, samples): 13 samples > 10 a program; no shared blocks
    num_blocks = 80
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, lens, shared = [], [], []
    for k, samples in prompts:
        prompt = [perm.pop() for _ in range(k)]
        for _ in range(samples):
            tail = int(torch.randint(1, 2 * block_size, (), generator=g))
            tables.append(prompt + [perm.pop() for _ in range(-(-tail // block_size))])
            lens.append(k * block_size + tail)
            shared.append(k)
    k_cache, v_cache = random_cache(num_blocks + 1, block_size, kv_heads, head_dim, dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    table = padded(tables, num_blocks)
    meta = decode_metadata(table, lens, block_size, num_blocks, "cpu",
                           cascade_layout(table, shared, block_size, num_blocks, "cpu"))
    assert meta.group_tables.shape[0] == 2 and meta.member_index.shape[1] == 13
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    kc, vc, qd = dev(k_cache), dev(v_cache), dev(q)
    out_t, lse_t = paged_decode_partials(qd, kc, vc, dev(meta.tail_tables.int()), dev(meta.tail_lens.int()), splits)
    per = members_per_program(heads // kv_heads)
    tables_p, lens_p, members_p = cascade_programs(dev(meta.group_tables), dev(meta.group_lens),
                                                   dev(meta.member_index), len(lens), per, len(lens))
    assert members_p.shape == (-(-13 // per) + -(-3 // per), per)  # 13 samples: two programs when 10 fit one
    assert sorted(members_p[members_p < len(lens)].tolist()) == meta.member_index[meta.member_index < len(lens)
                                                                                  ].sort().values.tolist()
    out_g, lse_g = paged_decode_partials(qd, kc, vc, tables_p, lens_p, splits, members_p)
    grouped = meta.member_slot < meta.member_index.numel()
    assert torch.isinf(lse_g[dev(~grouped)]).all() and torch.isfinite(lse_g[dev(grouped)]).any(-1).all()
    out = merge_partials(torch.cat([out_t, out_g], 2), torch.cat([lse_t, lse_g], 2), dtype).cpu()
    ref = paged_decode_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens)
    torch.testing.assert_close(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="production shapes: run with RPO_TEST_DEVICE=cuda")
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (14, 2, 64), (32, 8, 128)])  # 1.5B, 0.5B, 8B
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_production_shapes(heads, kv_heads, head_dim, splits, dtype):
    lens = torch.randint(1, 4097, (64,), generator=torch.Generator().manual_seed(1)).tolist() + [1, 16, 17, 4096]
    out, ref, _ = _triton_decode_and_reference(heads, kv_heads, head_dim, 16, splits, dtype, lens)
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 4e-3, rtol=0)


@pytest.mark.gpu
def test_triton_decode_refuses_rows_that_do_not_line_up():
    """Tables, lengths and queries of different row counts read past each other (uninitialised rows
    or another sequence's blocks), so they are refused, as is num_splits 0 (which wrote nothing)."""
    from rpo_engine.kernels.paged_attention import paged_decode

    k_cache, v_cache = (c.to(DEVICE) for c in random_cache(8, 4, 2, 16))
    q = torch.randn(3, 4, 16, device=DEVICE)
    tables = torch.arange(6, dtype=torch.int32, device=DEVICE).view(3, 2)
    lens = torch.tensor([8, 5, 1], dtype=torch.int32, device=DEVICE)
    for args, match in [((q, tables[:2], lens[:2]), "a row per sequence"), ((q, tables, lens[:2]), "a row per"),
                        ((q[:2], tables, lens), "a row per"), ((q, tables, lens, 0), "num_splits")]:
        with pytest.raises(ValueError, match=match):
            paged_decode(args[0], k_cache, v_cache, *args[1:])
    assert paged_decode(q, k_cache, v_cache, tables, lens).shape == q.shape


def _triton_decode_and_reference(heads, kv_heads, head_dim, block_size, splits, dtype, lens):
    """The kernel on DEVICE against the fp32 reference on the CPU, over a cache with scattered blocks.
    -> (kernel output on the CPU, reference, (k_cache, v_cache, q, tables) as used, on the CPU)."""
    from rpo_engine.kernels.paged_attention import paged_decode

    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = scattered_tables(lens, block_size, num_blocks)
    q = torch.randn(len(lens), heads, head_dim).to(dtype)
    out = paged_decode(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), padded(tables).to(DEVICE),
                       torch.tensor(lens, dtype=torch.int32, device=DEVICE), splits)
    assert out.dtype == dtype and out.shape == q.shape and out.device == DEVICE
    ref = paged_decode_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens)
    return out.cpu(), ref, (k_cache, v_cache, q, tables)


@pytest.mark.parametrize("block_size", [4, 16])
def test_torch_cascade_decode_matches_reference(block_size):
    """Samples that share prompt blocks (read once per group) + their own tails, and a lone sequence."""
    # caches are [layers, blocks, block_size, KVH, D] in the backends: the tests use one layer
    H, KVH, D = 4, 2, 16
    num_blocks = 64
    k_cache, v_cache = random_cache(num_blocks + 1, block_size, KVH, D)
    prompt_blocks = [[3, 7, 1], [9, 2]]  # two prompts' shared full blocks
    free = [b for b in range(num_blocks) if b not in (3, 7, 1, 9, 2)]
    tables, lens, shared = [], [], []
    for g, (pb, tail_tokens) in enumerate([(prompt_blocks[0], [1, 5, block_size + 2]),
                                           (prompt_blocks[1], [2 * block_size, 3]), ([], [11])]):
        for t in tail_tokens:
            nb = -(-t // block_size)
            tables.append(pb + [free.pop() for _ in range(nb)])
            lens.append(len(pb) * block_size + t)
            shared.append(len(pb))
    S = len(lens)
    q = torch.randn(S, 1, H, D)
    new_k, new_v = torch.randn(S, 1, KVH, D), torch.randn(S, 1, KVH, D)
    table = padded(tables, num_blocks)
    meta = decode_metadata(table, lens, block_size, num_blocks, "cpu",
                           cascade_layout(table, shared, block_size, num_blocks, "cpu"))
    assert meta.group_tables.shape[0] == 2  # the lone sequence has no shared prefix
    # tails are as wide as the longest tail, not padded to the longest table by the lone sequence
    assert meta.tail_tables.shape[1] == max(len(t) - k for t, k in zip(tables, shared)) < table.shape[1]
    for s, (t, k) in enumerate(zip(tables, shared)):  # each tail: the table after its shared blocks, then padding
        tail = meta.tail_tables[s].tolist()
        assert tail == t[k:] + [num_blocks] * (len(tail) - len(t) + k)
        assert meta.tail_lens[s] == lens[s] - k * block_size
    out = PagedDecode(k_cache[None], v_cache[None], meta)(0, q, new_k, new_v)  # writes new_k/new_v at each last slot
    for s in range(S):
        p = lens[s] - 1
        assert torch.equal(k_cache[tables[s][p // block_size], p % block_size], new_k[s, 0])
    ref = paged_decode_reference(q[:, 0], k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out[:, 0], ref, atol=1e-5, rtol=0)
    flat_meta = decode_metadata(padded(tables, num_blocks), lens, block_size, num_blocks, "cpu")
    assert flat_meta.group_tables is None and flat_meta.tail_tables is None
    flat = PagedDecode(k_cache[None], v_cache[None], flat_meta)(0, q, new_k, new_v)
    torch.testing.assert_close(flat, out, atol=1e-5, rtol=0)
    # grouping that saves too little is not worth a second attention: no groups at all
    saved = (3 - 1) * 3 * block_size + (2 - 1) * 2 * block_size
    layout = lambda least: cascade_layout(table, shared, block_size, num_blocks, "cpu", least)  # noqa: E731
    assert layout(saved) is not None and layout(saved + 1) is None


@pytest.mark.parametrize("block_size", [4, 16])
def test_torch_cascade_decode_of_bf16_rounds_once(block_size):
    """bf16 K/V on the CPU: the shared-blocks part and the tail part are merged in fp32, so each output is the
    exact (fp64) attention rounded once to bf16 (merged from two bf16-rounded parts: up to twice that error)."""
    H, KVH, D, num_blocks = 4, 2, 16, 64
    k_cache, v_cache = random_cache(num_blocks + 1, block_size, KVH, D, torch.bfloat16)
    k_cache *= 3  # peaked softmaxes
    tables, lens, shared, free = [], [], [], list(range(10, num_blocks))
    for prompt, tail_tokens in (([3, 7, 1], [1, 5, block_size + 2]), ([9, 2], [2 * block_size, 3])):
        for t in tail_tokens:
            tables.append(prompt + [free.pop() for _ in range(-(-t // block_size))])
            lens.append(len(prompt) * block_size + t)
            shared.append(len(prompt))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), 1, H, D, generator=g).bfloat16()
    new_k, new_v = (torch.randn(len(lens), 1, KVH, D, generator=g).bfloat16() for _ in range(2))
    table = padded(tables, num_blocks)
    meta = decode_metadata(table, lens, block_size, num_blocks, "cpu",
                           cascade_layout(table, shared, block_size, num_blocks, "cpu"))
    assert meta.group_tables is not None
    out = PagedDecode(k_cache[None], v_cache[None], meta)(0, q, new_k, new_v)[:, 0]
    assert out.dtype == torch.bfloat16
    exact = paged_decode_reference(q[:, 0].double(), k_cache.double(), v_cache.double(), tables, lens)
    one_rounding = (exact.bfloat16().double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= one_rounding * 1.01


def test_kept_decode_kv_equals_gathering_each_step():
    """DecodeKV over steps that add one token a row: its copies equal a fresh gather of each row's blocks
    up to its length, across rows outgrowing their copy; a step whose lengths did not grow by exactly one,
    or another batch, gathers anew."""
    block_size, num_blocks, S = 4, 64, 3
    k_cache, v_cache = random_cache(num_blocks + 1, block_size, 2, 8)
    lens = [3, 9, 6]
    tables = scattered_tables([n + 20 for n in lens], block_size, num_blocks)  # blocks for 20 more tokens
    kept, g = DecodeKV(), torch.Generator().manual_seed(1)
    for step in range(20):
        width = max(-(-n // block_size) for n in lens)
        table = padded([t[:width] for t in tables], num_blocks)
        meta = decode_metadata(table, lens, block_size, num_blocks, "cpu")
        new_k, new_v = torch.randn(S, 2, 8, generator=g), torch.randn(S, 2, 8, generator=g)
        meta_slots = meta.slot_mapping
        k_cache.view(-1, 2, 8)[meta_slots], v_cache.view(-1, 2, 8)[meta_slots] = new_k, new_v  # as write_kv does
        assert kept.start_step(("batch",), meta, 1, 1)
        before = kept.tail_kv[0][0].shape[1] if kept.tail_kv else 0  # the copy's capacity in tokens
        keys, values = kept.tails(0, k_cache, v_cache, meta.block_tables, meta.context_lens, new_k, new_v)
        assert keys.shape[1] == values.shape[1] == max(lens)
        for s, n in enumerate(lens):  # what attention reads: each row up to its length
            assert torch.equal(keys[s, :n], gather(k_cache, table)[s, :n])
            assert torch.equal(values[s, :n], gather(v_cache, table)[s, :n])
        capacity = kept.tail_kv[0][0].shape[1]
        assert (capacity != before) == (max(lens) > before)  # gathered again only when a row outgrew it
        lens = [n + 1 for n in lens]
    assert capacity > (3 + 2) * block_size  # it grew past the first copy: 3 blocks, and room for 2 more
    assert kept.start_step(("batch",), meta, 1, 1) and not kept.tail_kv  # the same lengths again: anew
    kept.tails(0, k_cache, v_cache, meta.block_tables, meta.context_lens, new_k, new_v)
    assert kept.start_step(("other",), meta, 1, 1) and not kept.tail_kv and kept.key == ("other",)
    assert not kept.start_step(("other",), meta, 1, 10 ** 9)  # over max_bytes: nothing kept


def test_cascade_groups_are_sequences_with_the_same_leading_blocks():
    """Against grouping by the tuple of leading block ids, on random tables of forked samples."""
    g = torch.Generator().manual_seed(0)
    tables, shared, next_id = [], [], 0
    for _ in range(12):  # prompts: k shared blocks, then 1-5 samples with tails of their own
        k = int(torch.randint(0, 4, (), generator=g))
        prompt = list(range(next_id, next_id + k))
        next_id += k
        for _ in range(int(torch.randint(1, 6, (), generator=g))):
            tail = int(torch.randint(1, 4, (), generator=g))
            tables.append(prompt + list(range(next_id, next_id + tail)))
            shared.append(k)
            next_id += tail
    expected: dict[tuple, list[int]] = {}
    for s, (t, k) in enumerate(zip(tables, shared)):
        if k:
            expected.setdefault(tuple(t[:k]), []).append(s)
    got = cascade_groups(padded(tables, 999), shared)
    assert sorted(members for _, members in got) == sorted(m for m in expected.values() if len(m) > 1)
    assert all(k == shared[members[0]] for k, members in got)
    # Two rows ending their shared part in the same block but differing before it are not a group.
    assert cascade_groups(padded([[1, 2, 7], [3, 2, 8]]), [2, 2]) == []
    assert cascade_groups(padded([[1, 2, 7], [1, 2, 8], [3, 2, 9]]), [2, 2, 2]) == [(2, [0, 1])]


def test_prefill_with_cached_prefix_matches_causal_sdpa():
    """A packed batch: one sequence from scratch, one whose first 8 tokens are already cached."""
    H, KVH, D, bs = 4, 2, 8, 4
    k_cache = torch.zeros(1, 10, bs, KVH, D)
    v_cache = torch.zeros(1, 10, bs, KVH, D)
    full = [(torch.randn(n, H, D), torch.randn(n, KVH, D), torch.randn(n, KVH, D)) for n in (7, 11)]
    tables = [[5, 0], [8, 2, 6]]
    cached = [0, 8]
    for (q, k, v), table, c in zip(full, tables, cached):  # put the cached prefix in place
        for p in range(c):
            k_cache[0, table[p // bs], p % bs], v_cache[0, table[p // bs], p % bs] = k[p], v[p]
    slots = [table[p // bs] * bs + p % bs for (q, _, _), table, c in zip(full, tables, cached) for p in range(c, len(q))]
    meta = PrefillMetadata(torch.tensor(slots), [7, 3], cached, [None, torch.tensor(tables[1])])
    q_new = torch.cat([q[c:] for (q, _, _), c in zip(full, cached)])[None]
    k_new = torch.cat([k[c:] for (_, k, _), c in zip(full, cached)])[None]
    v_new = torch.cat([v[c:] for (_, _, v), c in zip(full, cached)])[None]
    out = PagedPrefill(k_cache, v_cache, meta)(0, q_new, k_new, v_new)[0]
    refs = []
    for (q, k, v), c in zip(full, cached):
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True, enable_gqa=True).transpose(0, 1)
        refs.append(o[c:])
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=0)
