"""Block manager: which cache blocks are free, who holds each one, and which full blocks hold which tokens.

Pure bookkeeping, no tensors (the model runner owns the K/V cache). Each block has a reference
count: forked samples share their parent's blocks, and a prefix-cache hit shares another request's.
Only full blocks are hashed, each hash chained on the previous block's, and a hit is confirmed by
comparing token ids, so a hash collision can never hand out wrong K/V. Freed blocks keep their hash
and stay in the lookup table until they are reused for something else (oldest freed first).

A hash is registered when a block is allocated, before its K/V are written. A hit on such a block in
the same prefill batch is safe because the prefill backend writes every new K/V of a layer before any
sequence reads the cache. A sequence's block that holds its last token is never taken from the cache:
that token must be computed to get its logits.
"""
from __future__ import annotations

from rpo_engine.rollout.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: tuple[int, ...] = ()


def chain_hash(token_ids: tuple[int, ...], prefix_hash: int) -> int:
    # Python's tuple-of-int hash is deterministic across runs (no hash randomization for ints).
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids = dict.fromkeys(range(num_blocks))  # insertion-ordered set: oldest freed first
        self.used_block_ids: set[int] = set()
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self.used_block_ids)

    def reset_prefix_cache(self):
        """Forget every hash: cached K/V were computed with weights that may have changed since."""
        self.hash_to_block_id.clear()
        for block in self.blocks:
            block.hash, block.token_ids = -1, ()

    def _take(self, block_id: int) -> int:
        del self.free_block_ids[block_id]
        self.used_block_ids.add(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _take_new(self) -> int:
        block_id = next(iter(self.free_block_ids))
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its old content is about to be overwritten
        block.hash, block.token_ids = -1, ()
        return self._take(block_id)

    def _release(self, block_id: int):
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.used_block_ids.remove(block_id)
            self.free_block_ids[block_id] = None

    def _register(self, block_id: int, token_ids: tuple[int, ...], h: int):
        block = self.blocks[block_id]
        block.hash, block.token_ids = h, token_ids
        self.hash_to_block_id[h] = block_id

    def _lookup(self, seq: Sequence):
        """[(hash or -1, cached block id or -1)] for each block of `seq`; hits only as a leading run."""
        out, h, hitting = [], -1, self.enable_prefix_caching
        for i in range(seq.num_blocks):
            tokens = seq.block(i)
            if len(tokens) < self.block_size:
                out.append((-1, -1))
                continue
            h = chain_hash(tokens, h)
            block_id = -1
            if hitting and (i + 1) * self.block_size < len(seq):  # never the block of the last token
                block_id = self.hash_to_block_id.get(h, -1)
                block = self.blocks[block_id] if block_id != -1 else None
                if block is not None and (block.hash != h or block.token_ids != tokens):
                    block_id = -1  # hash collision (or stale entry): not a hit
            hitting = hitting and block_id != -1
            out.append((h, block_id))
        return out

    def num_new_blocks(self, seq: Sequence) -> int:
        """Free blocks that allocating `seq` would consume (hits on blocks in use cost nothing)."""
        return sum(b == -1 or b in self.free_block_ids for _, b in self._lookup(seq))

    def allocate(self, seq: Sequence) -> int:
        """Give `seq` a block table for all its tokens; returns the number of tokens found in the cache."""
        assert not seq.block_table
        num_hit_blocks = 0
        for i, (h, block_id) in enumerate(self._lookup(seq)):
            if block_id != -1:
                num_hit_blocks += 1
                if block_id in self.used_block_ids:
                    self.blocks[block_id].ref_count += 1
                else:
                    self._take(block_id)
            else:
                block_id = self._take_new()
                if h != -1 and self.enable_prefix_caching:
                    self._register(block_id, seq.block(i), h)
            seq.block_table.append(block_id)
        seq.num_cached_tokens = num_hit_blocks * self.block_size
        return seq.num_cached_tokens

    def free(self, seq: Sequence):
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def fork(self, child: Sequence):
        """`child` was copied from a sequence's block table: it now holds every block too."""
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self._append_cost(seq)

    def _append_cost(self, seq: Sequence) -> int:
        idx = (len(seq) - 1) // self.block_size  # the block the last token is written to
        if idx == len(seq.block_table):
            return 1
        return int(self.blocks[seq.block_table[idx]].ref_count > 1)  # shared partial block: copy on write

    def may_append(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for the last token's K/V. Returns (src, dst) when a shared block must be copied."""
        idx = (len(seq) - 1) // self.block_size
        copy = None
        if idx == len(seq.block_table):
            seq.block_table.append(self._take_new())
        else:
            block_id = seq.block_table[idx]
            if self.blocks[block_id].ref_count > 1:
                new_id = self._take_new()
                self._release(block_id)
                seq.block_table[idx] = new_id
                copy = (block_id, new_id)
        if len(seq) % self.block_size == 0 and self.enable_prefix_caching:  # this step fills the block
            prev = self.blocks[seq.block_table[idx - 1]].hash if idx > 0 else -1
            if idx == 0 or prev != -1:
                tokens = seq.block(idx)
                self._register(seq.block_table[idx], tokens, chain_hash(tokens, prev))
        return copy
