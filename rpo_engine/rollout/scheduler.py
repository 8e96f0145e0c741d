"""Scheduler: waiting and running queues, admission while blocks last, forks, preemption.

Each step is either a prefill (waiting sequences admitted while blocks, `max_num_seqs` and
`max_num_batched_tokens` allow; prefills go first, as in nano-vllm) or a decode of every running
sequence. When a decode step runs out of blocks, the most recently admitted sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed from its
tokens (prompt + what it has sampled so far; its full blocks are often still cached). A fresh request
admits as one sequence (one per max_num_seqs of its samples); after its prefill `fork` splits it into its
samples.

With async scheduling (the engine's), a decode step is scheduled while the previous one's tokens are
still on the device: each sequence then counts one pending token, a sequence whose pending token is its
last (its budget reached) is not scheduled again, and one that turns out to have sampled a stop token
has run one step on a token nobody keeps (`postprocess` skips that row).
"""
from __future__ import annotations

from collections import deque

from rpo_engine.rollout.block_manager import BlockManager
from rpo_engine.rollout.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        """-> (sequences to run, is_prefill, block copies (src, dst) to do before the forward)."""
        bm, scheduled, num_tokens = self.block_manager, [], 0
        num_seqs = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            busy = bool(scheduled or self.running)
            if busy and num_seqs + seq.num_forks > self.max_num_seqs:
                break
            if busy and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            # Keep one block per new sample for its first decode step, unless the engine is idle
            # (then admit anyway: preemption sorts it out, and a lone sequence always fits).
            if bm.num_free_blocks < bm.num_new_blocks(seq) + (seq.num_forks if busy else 0):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            scheduled.append(seq)
            num_seqs += seq.num_forks
            num_tokens += len(seq) - seq.num_cached_tokens
        if scheduled:
            self.running.extend(scheduled)
            return scheduled, True, []

        copies, kept = [], []  # kept: scheduled, and those done sampling but for a pending token
        bs, blocks = bm.block_size, bm.blocks
        while self.running:
            seq = self.running.popleft()
            n = len(seq.token_ids) + seq.num_pending  # seq.num_tokens, inlined: this loop is per sequence and step
            if seq.num_pending and n - seq.num_prompt_tokens >= seq.params.max_new_tokens:  # _last_is_pending
                kept.append(seq)  # its pending token is its last: it finishes when that arrives
                continue
            if (n - 1) % bs and n % bs and blocks[seq.block_table[(n - 1) // bs]].ref_count == 1:
                scheduled.append(seq)  # mid-block, the block its own: no new block, no copy, no hash (most steps)
                kept.append(seq)
                continue
            while not bm.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())  # the newest sequence yields
                else:
                    self.preempt(seq)
                    break
            else:
                copy = bm.may_append(seq)
                if copy is not None:
                    copies.append(copy)
                scheduled.append(seq)
                kept.append(seq)
        self.running.extendleft(reversed(kept))
        return scheduled, False, copies

    def fits_ahead(self) -> bool:
        """Whether the next decode step can be scheduled before the in-flight step's tokens arrive: no
        request waits (a prefill would need every token) and no running sequence would be preempted."""
        if self.waiting:
            return False
        bm = self.block_manager
        need = sum(bm.append_cost(seq) for seq in self.running if not self._last_is_pending(seq))
        return need <= bm.num_free_blocks

    @staticmethod
    def _last_is_pending(seq: Sequence) -> bool:
        """Async: the sequence's pending token is its last (its budget is reached): no more steps for it."""
        return seq.num_pending > 0 and seq.num_completion_tokens + seq.num_pending >= seq.params.max_new_tokens

    def abort(self):
        for seq in (*self.running, *self.waiting):
            self.block_manager.free(seq)
        self.running.clear()
        self.waiting.clear()

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def fork(self, seq: Sequence) -> list[Sequence]:
        """After a prefill: the request's samples, the sequence itself first. Siblings share every block."""
        samples = [seq]
        for i in range(1, seq.num_forks):
            child = seq.fork(sample_index=seq.sample_index + i)  # a request split in parts: numbered on
            self.block_manager.fork(child)
            samples.append(child)
        seq.num_forks = 1
        self.running.extend(samples[1:])
        return samples

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[float],
                    scheduled_ahead: bool = False) -> list[Sequence]:
        """Append each sampled token; free and return the sequences that finished. `scheduled_ahead`: the
        next decode step (async) was scheduled before these tokens arrived, so it writes their K/V."""
        finished, bs, done = [], self.block_manager.block_size, SequenceStatus.FINISHED
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
            if seq.status is done:  # async: it stopped a step ago, this row's token is void
                continue
            if seq.num_pending:
                seq.num_pending -= 1
            seq.num_cached_tokens = len(seq.token_ids)  # every token so far now has its K/V in the cache
            seq.append_token(token_id, logprob)
            if seq.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
            elif scheduled_ahead and len(seq.token_ids) % bs == 0:  # the step in flight fills this block
                self.block_manager.register_filled_block(seq, len(seq.token_ids) // bs - 1)
        return finished
