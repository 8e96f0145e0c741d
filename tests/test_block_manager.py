"""Block manager and scheduler bookkeeping: ref counts, copy-on-write, prefix hashing, preemption."""
import random
import re

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
                                 dict(top_p=1.5), dict(top_k=-2), dict(stop_token_ids="2"), dict(seed=1.5),
                                 dict(min_p=1.5), dict(min_p=-0.1), dict(top_k=2.5), dict(repetition_penalty=0.0),
                                 dict(repetition_penalty=-1.2), dict(repetition_penalty=float("nan")),
                                 dict(repetition_penalty=True)])
def test_sampling_params_validation(bad):
    (field, value), = bad.items()
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must .*, got {re.escape(repr(value))}$"):
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


def test_free_releases_the_last_block_first_so_a_freed_prefix_stays_cached_longest():
    """`free` returns a table's blocks last first: the free list hands out the oldest freed first, so the
    prompt's leading (most shareable) blocks are the last to be overwritten."""
    bm = BlockManager(3, BS)
    a = make_seq(list(range(9)))  # 2 full blocks (hashed) + a partial one: the whole cache
    bm.allocate(a)
    bm.free(a)
    other = make_seq([50, 51, 52])
    bm.allocate(other)  # one new block: a's partial one, not its first
    bm.free(other)
    assert bm.allocate(make_seq(list(range(9)))) == 8  # both of a's full blocks still hit


def test_append_cost_is_what_may_append_takes():
    """`append_cost` (what can_append and fits_ahead reserve) equals the free blocks `may_append` then
    takes, at every position of a block: a new block, none, or a copy of a shared partial block."""
    for start in range(1, 3 * BS):
        bm = BlockManager(12, BS)
        parent = make_seq(list(range(start)), n=2)
        bm.allocate(parent)
        samples = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64).fork(parent)
        for step in range(2 * BS):
            for s in samples:
                s.token_ids.append(100 + step)
                cost, free = bm.append_cost(s), bm.num_free_blocks
                bm.may_append(s)
                assert free - bm.num_free_blocks == cost, (start, step)
    # a lone sequence whose K/V exactly fill the cache still fits: no preemption of itself
    bm = BlockManager(3, BS)
    seq = make_seq(list(range(11)))
    bm.allocate(seq)
    seq.token_ids.append(99)  # 12 tokens: the step writes token 11's K/V into block 2
    assert bm.append_cost(seq) == 0 and bm.can_append(seq)


def test_a_block_filled_after_an_unhashed_one_is_not_hashed_as_a_first_block():
    """Async scheduling leaves a block unhashed when its last token was still pending as it filled; a later
    block then has no chain to hash on. Hashed on its own (as a first block) it would hand K/V computed
    after a different prefix to any prompt starting with its tokens."""
    bm = BlockManager(8, BS)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    seq.num_pending = 1  # token 3 sampled on the device, unread: block 0 fills but is not hashed
    bm.may_append(seq)
    seq.num_pending = 0
    seq.token_ids.append(4)  # read back by a synchronous step (postprocess registers nothing then)
    assert bm.blocks[seq.block_table[0]].hash == -1
    for t in (5, 6, 7, 8):
        seq.token_ids.append(t)
        bm.may_append(seq)
    other = make_seq([5, 6, 7, 8, 9])  # its first block's tokens are seq's block 1
    assert bm.allocate(other) == 0


def test_reset_prefix_cache_empties_the_lookup_table():
    """Every generate call starts with a reset: the table must not keep one stale entry per hashed block of
    every earlier call (it would grow over a whole training run)."""
    bm = BlockManager(8, BS)
    for prompt in (list(range(9)), list(range(20, 29))):
        seq = make_seq(prompt)
        bm.allocate(seq)
        bm.free(seq)
        assert bm.hash_to_block_id
        bm.reset_prefix_cache()
        assert bm.hash_to_block_id == {}


def test_prefill_admission_honours_max_num_seqs_and_max_num_batched_tokens():
    """Samples (forks) count against max_num_seqs, up to it exactly; prompt tokens against
    max_num_batched_tokens; the first request is always admitted."""
    sched = Scheduler(BlockManager(40, BS), max_num_seqs=4, max_num_batched_tokens=64)
    for n in (2, 2, 1):
        sched.add(make_seq(list(range(10 * n, 10 * n + 5)), n=n))
    seqs, is_prefill, _ = sched.schedule()
    assert is_prefill and [s.num_forks for s in seqs] == [2, 2] and len(sched.waiting) == 1
    sched = Scheduler(BlockManager(40, BS), max_num_seqs=8, max_num_batched_tokens=10)
    for start in (0, 20, 40):
        sched.add(make_seq(list(range(start, start + 6))))
    seqs, _, _ = sched.schedule()
    assert len(seqs) == 1 and len(sched.waiting) == 2  # 6 + 6 > 10


def test_prefill_admission_counts_only_the_tokens_a_prefix_hit_leaves_to_compute():
    """max_num_batched_tokens bounds the tokens a prefill computes: a request whose first 8 tokens are cached
    costs 1, so a 9-token one joins it under a budget of 10."""
    bm = BlockManager(40, BS)
    tokens = list(range(9))
    earlier = make_seq(tokens)
    bm.allocate(earlier)
    bm.free(earlier)  # its two full blocks stay cached
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(make_seq(tokens))
    sched.add(make_seq(list(range(50, 59))))
    seqs, is_prefill, _ = sched.schedule()
    assert is_prefill and len(seqs) == 2 and seqs[0].num_cached_tokens == 8


def test_a_decode_step_that_fills_a_block_hashes_it_for_prefix_hits():
    """Through the scheduler: the decode step that writes a block's last token registers the block, so a later
    request holding those tokens finds them cached (the steps within a block take a path that hashes nothing)."""
    bm = BlockManager(40, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seq = make_seq(list(range(5)))
    sched.add(seq)
    for token in (20, 21, 22):  # 6, 7, then 8 tokens: the step for token 22 fills block 1
        seqs, _, _ = sched.schedule()
        sched.postprocess(seqs, [token], [0.0])
    sched.schedule()
    assert bm.hash_to_block_id[bm.blocks[seq.block_table[1]].hash] == seq.block_table[1]
    later = make_seq(seq.token_ids + [99])
    assert bm.allocate(later) == 8


def test_admission_keeps_a_block_per_new_sample_for_its_first_decode():
    """A request joining a busy batch is admitted only if its blocks and one more per sample are free."""
    bm = BlockManager(5, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make_seq(list(range(8))))  # 2 blocks
    sched.add(make_seq(list(range(20, 27)), n=2))  # 2 blocks + 2 for its samples' first decode: 1 short
    seqs, _, _ = sched.schedule()
    assert len(seqs) == 1 and len(sched.waiting) == 1


def test_preemption_takes_the_newest_and_puts_it_back_first_in_line():
    """Out of blocks, each sequence's decode preempts the newest running one (not the next in line), and
    the preempted go back to the front of the waiting queue, in their order, before a request that waits."""
    bm = BlockManager(8, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d = (make_seq([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]) for i in range(4))
    for s in (a, b, c, d):
        sched.add(s)
    seqs, _, _ = sched.schedule()
    assert seqs == [a, b, c, d] and bm.num_free_blocks == 4
    sched.postprocess(seqs, [90, 91, 92, 93], [0.0] * 4)  # 5 tokens each: every one needs a 2nd block
    bm.allocate(make_seq(list(range(100, 116))))  # another holder takes the 4 free blocks
    late = make_seq(list(range(200, 209)))
    sched.add(late)  # waits: no block for it
    seqs, is_prefill, _ = sched.schedule()
    assert not is_prefill and seqs == [a, b] and sched.num_preemptions == 2
    assert list(sched.waiting) == [c, d, late]


def test_abort_frees_every_block_and_slot():
    bm = BlockManager(10, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make_seq(list(range(9)), n=3))
    seqs, _, _ = sched.schedule()
    sched.fork(seqs[0])
    sched.add(make_seq([1, 2]))
    sched.abort()
    assert sched.is_finished() and bm.num_used_blocks == 0 and bm.num_free_blocks == 10
    assert len(bm.tables.free_slots) == bm.tables.rows.shape[0]


def test_fits_ahead_leaves_out_sequences_whose_last_token_is_pending():
    """Async: a sequence whose pending token is its last runs no more steps, so it reserves no block."""
    bm = BlockManager(3, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seq = Sequence(list(range(7)), SamplingParams(max_new_tokens=2), BS, stop_token_ids=(), key=0, request_index=0)
    sched.add(seq)
    sched.schedule()
    sched.postprocess([seq], [9], [0.0])  # 8 tokens: the next step writes token 7 into block 1
    sched.schedule()
    seq.num_pending = 1  # its 2nd and last token in flight: a next step would need block 2
    bm.allocate(make_seq([1]))  # another holder takes the last free block
    assert bm.num_free_blocks == 0
    assert sched.fits_ahead()


def test_a_stop_token_that_is_the_last_of_the_budget_finishes_as_stop():
    seq = make_seq([1, 2, 3])
    seq.stop_token_ids = frozenset({7})
    for t in (5,) * 7 + (7,):  # the 8th (max_new_tokens) token is the stop token
        seq.append_token(t, 0.0)
    assert seq.finish_reason == "stop" and seq.completion().finish_reason == "stop"


def test_sampling_params_accept_their_documented_values():
    """top_k -1 is off (vLLM's convention), min_p 1 and top_p 1 the ends of their ranges, any integer seed."""
    for kwargs in (dict(top_k=-1), dict(top_k=0), dict(min_p=1.0), dict(min_p=0.0), dict(top_p=1.0),
                   dict(seed=-5), dict(seed=2 ** 63 - 1), dict(temperature=1e-5)):
        SamplingParams(**kwargs)
