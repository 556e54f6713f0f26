"""Scheduler: moves requests between `waiting` and `running` and counts tokens.

There is no prefill or decode phase: each request has computed tokens that catch up to its
tokens, under one token budget per step. Running requests go first (so decodes are never
starved by new prompts), then waiting requests in arrival order, chunked to fit the budget.
When KV blocks run out, the newest running request is preempted: its blocks are freed and
it is recomputed later (its finished blocks usually come back from the prefix cache).

The scheduler never touches tensors.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `request` starting at position `start`, computed this step."""

    request: Request
    start: int
    num_tokens: int
    samples: bool  # after this chunk the request has computed every token: sample the next

    @classmethod
    def next_for(cls, request: Request, num_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return cls(request, start, num_tokens, start + num_tokens == request.num_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, chunks, preempted)
        if not preempted:
            self._schedule_waiting(budget, chunks)
        return SchedulerOutput(chunks, preempted)

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk],
                          preempted: list[Request]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request.request_id,
                                           request.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return budget
            chunks.append(ScheduledChunk.next_for(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.request_id not in self.blocks.tables:
                cached = self.blocks.match_prefix(request.request_id, request.token_ids,
                                                  request.extra_keys)
                request.num_computed_tokens = cached
                if request.num_output_tokens == 0:
                    request.num_cached_tokens = cached
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget)
            if num_new < remaining and not self.enable_chunked_prefill:
                break
            if not self.blocks.allocate(request.request_id, request.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk.next_for(request, num_new))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first for recomputation."""
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after a step
    def advance(self, output: SchedulerOutput) -> None:
        """Count the chunks' tokens as computed and offer full blocks to the prefix cache."""
        for chunk in output.chunks:
            request = chunk.request
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            self.blocks.cache_full_blocks(request.request_id, request.token_ids,
                                          request.num_computed_tokens, request.extra_keys)

    def finish(self, request: Request) -> None:
        """Take a finished (or aborted) request out of the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self.blocks.free(request.request_id)
