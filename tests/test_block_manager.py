"""Block manager and scheduler bookkeeping: ref counts, copy-on-write, prefix hashing, preemption."""
import random

import pytest

from rpo_engine.rollout import SamplingParams, block_manager as bm_module
from rpo_engine.rollout.block_manager import BlockManager
from rpo_engine.rollout.scheduler import Scheduler
from rpo_engine.rollout.sequence import Sequence
from tests.helpers import check_tables

BS = 4


def make_seq(tokens, n=1):
    return Sequence(tokens, SamplingParams(n=n, max_new_tokens=8), BS, stop_token_ids=(), key=0, request_index=0,
                    num_forks=n)


def check_totals(bm: BlockManager):
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert not set(bm.free_block_ids) & bm.used_block_ids
    for block in bm.blocks:
        assert (block.ref_count > 0) == (block.block_id in bm.used_block_ids)


def test_allocate_free_and_totals():
    bm = BlockManager(10, BS)
    seq = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert bm.num_new_blocks(seq) == 3
    assert bm.allocate(seq) == 0
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    check_totals(bm)
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == []
    check_totals(bm)


def test_forks_share_full_blocks_and_copy_partial_on_write():
    G = 5
    bm = BlockManager(20, BS)
    parent = make_seq(list(range(10)), n=G)
    bm.allocate(parent)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=64)
    samples = sched.fork(parent)
    assert len(samples) == G and {s.sample_index for s in samples} == set(range(G))
    full, partial = parent.block_table[:2], parent.block_table[2]
    for block_id in parent.block_table:
        assert bm.blocks[block_id].ref_count == G  # held once, by G sequences
    assert bm.num_used_blocks == 3
    check_totals(bm)
    copies = []
    for i, s in enumerate(samples):
        s.token_ids.append(100 + i)  # the sampled token, written at position 10 (the shared partial block)
        assert bm.can_append(s)
        copies.append(bm.may_append(s))
        check_totals(bm)
    # G - 1 samples copy the shared partial block; the last holder writes in place.
    assert [c is not None for c in copies] == [True] * (G - 1) + [False]
    assert all(src == partial for src, _ in copies[:-1])
    assert samples[-1].block_table[2] == partial and bm.blocks[partial].ref_count == 1
    assert all(bm.blocks[b].ref_count == G for b in full)
    assert bm.num_used_blocks == 2 + G
    check_tables(bm, samples)
    for s in samples:
        bm.free(s)
    assert bm.num_used_blocks == 0
    check_totals(bm)
    check_tables(bm, samples)


def test_new_block_at_boundary_and_hash_on_fill():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(4)))  # exactly one full block
    bm.allocate(seq)
    seq.token_ids.append(50)
    assert bm.may_append(seq) is None and len(seq.block_table) == 2
    for t in (51, 52, 53):
        seq.token_ids.append(t)
        bm.may_append(seq)
    assert len(seq.block_table) == 2
    # The decode step that writes token 53 fills block 1: it is registered for later prefix hits.
    assert bm.hash_to_block_id[bm.blocks[seq.block_table[1]].hash] == seq.block_table[1]
    assert bm.blocks[seq.block_table[1]].token_ids == (50, 51, 52, 53)


def test_prefix_cache_hit_keeps_last_block_and_survives_free():
    bm = BlockManager(12, BS)
    a = make_seq(list(range(12)))  # 3 full blocks
    bm.allocate(a)
    b = make_seq(list(range(12)))
    assert bm.num_new_blocks(b) == 1  # 2 hits on blocks in use; the last token's block is computed
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    bm.free(b)
    check_totals(bm)
    c = make_seq(list(range(8)) + [99, 98, 97])  # freed blocks keep their hash: 2 hits, from the free list
    assert bm.allocate(c) == 8
    assert bm.num_used_blocks == 3
    bm.free(c)
    bm.reset_prefix_cache()  # new weights: nothing is reused any more
    d = make_seq(list(range(12)))
    assert bm.allocate(d) == 0


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda tokens, prev: 7)  # every block collides
    bm = BlockManager(12, BS)
    bm.allocate(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.allocate(other) == 0  # the token check rejects the hash match


def test_reallocated_block_leaves_the_cache():
    bm = BlockManager(3, BS)
    a = make_seq(list(range(9)))
    bm.allocate(a)
    bm.free(a)
    bm.allocate(make_seq([50] * 9))  # takes all 3 freed blocks, overwriting their content
    assert bm.hash_to_block_id == {bm.blocks[i].hash: i for i in range(3) if bm.blocks[i].hash != -1}
    assert len(bm.hash_to_block_id) == 2


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    sched.add(a)
    sched.add(b)
    seqs, is_prefill, _ = sched.schedule()
    assert is_prefill and seqs == [a, b]
    sched.postprocess(seqs, [7, 8], [0.0, 0.0])  # 4 tokens each; both need a 2nd block, then a 3rd
    for step in range(8):
        seqs, is_prefill, _ = sched.schedule()
        assert not is_prefill
        check_totals(bm)
        if sched.num_preemptions:
            break
        sched.postprocess(seqs, [1] * len(seqs), [0.0] * len(seqs))
    assert sched.num_preemptions == 1 and sched.waiting[0] is b and seqs == [a]
    assert b.block_table == [] and len(b) > 3  # keeps its tokens; recomputed when readmitted


@pytest.mark.parametrize("bad", [dict(n=0), dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(stop_token_ids="2"), dict(seed=1.5)])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_tables_mirrored_and_frees_everything(seed):
    """Prefills with forks, copy-on-write, prefix-cache hits, preemption under a tight budget and
    random finishes: after every step the accounting holds and each live table's mirror row equals
    it; at the end every block and slot is free. The mirror starts small, so it also grows."""
    rng = random.Random(seed)
    bm = BlockManager(14, BS, tables=bm_module.BlockTables(width=14, pad=14, capacity=2))
    sched = Scheduler(bm, max_num_seqs=12, max_num_batched_tokens=40)
    common = [rng.randrange(3, 50) for _ in range(2 * BS)]  # a shared prompt start: prefix-cache hits
    seqs = []
    for _ in range(8):
        tokens = (common if rng.random() < 0.5 else []) + [rng.randrange(3, 50) for _ in range(rng.randint(1, 9))]
        seq = Sequence(tokens, SamplingParams(n=rng.randint(1, 4), max_new_tokens=rng.randint(1, 14)), BS,
                       stop_token_ids=(2,), key=0, request_index=0, num_forks=0)
        seq.num_forks = seq.params.n
        sched.add(seq)
        seqs.append(seq)
    for _ in range(500):
        if sched.is_finished():
            break
        batch, is_prefill, _ = sched.schedule()
        if is_prefill:
            batch = [sample for seq in batch for sample in sched.fork(seq)]
            seqs += [s for s in batch if s not in seqs]
        tokens = [2 if rng.random() < 0.08 else rng.randrange(3, 50) for _ in batch]  # 2 stops a sample
        sched.postprocess(batch, tokens, [0.0] * len(batch))
        check_totals(bm)
        check_tables(bm, seqs)
    assert sched.is_finished() and all(s.finish_reason for s in seqs)
    assert sched.num_preemptions > 0 and bm.tables.rows.shape[0] > 2
    assert bm.num_used_blocks == 0 and len(bm.tables.free_slots) == bm.tables.rows.shape[0]
