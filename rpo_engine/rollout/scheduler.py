"""Scheduler: waiting and running queues, admission while blocks last, forks, preemption.

Each step is either a prefill (waiting sequences admitted while blocks, `max_num_seqs` and
`max_num_batched_tokens` allow; prefills go first, as in nano-vllm) or a decode of every running
sequence. When a decode step runs out of blocks, the most recently admitted sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed from its
tokens (prompt + what it has sampled so far; its full blocks are often still cached). A fresh request
admits as one sequence; after its prefill `fork` splits it into its n samples.
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

        copies = []
        while self.running:
            seq = self.running.popleft()
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
        self.running.extendleft(reversed(scheduled))
        return scheduled, False, copies

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
            child = seq.fork(sample_index=i)
            self.block_manager.fork(child)
            samples.append(child)
        seq.num_forks = 1
        self.running.extend(samples[1:])
        return samples

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[float]) -> list[Sequence]:
        """Append each sampled token; free and return the sequences that finished."""
        finished = []
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
            seq.num_cached_tokens = len(seq.token_ids)  # every token so far now has its K/V in the cache
            seq.append_token(token_id, logprob)
            if seq.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
