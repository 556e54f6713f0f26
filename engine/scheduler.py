"""Scheduler: moves requests between `waiting` and `running` and counts tokens.

There is no prefill or decode phase: each request has computed tokens that catch up to its
tokens, under one token budget per step. Running requests go first (so decodes are never
starved by new prompts), then waiting requests in arrival order, chunked to fit the budget.

KV blocks follow the all-or-nothing contract of `BlockManager`: a waiting request's cached
prefix is looked up without side effects and taken together with its new blocks, or the
request stays waiting with nothing changed; computed tokens advance only after a
successful allocation.

Progress is guaranteed: when a running request cannot get a block, running requests are
preempted newest first (most recently admitted), down to the request itself, and recomputed
later (their full blocks usually come back from the prefix cache). Admission rejects any
request that could not fit the pool alone, so the oldest running request always fits once
the newer ones are gone, every step computes something, and the head of the queue runs as
soon as the requests ahead of it finish.

The choices of an n > 1 request compute the prompt once: only the first choice (the
leader) is scheduled; the others wait in `pending_forks` and, once the leader's prompt is
computed and all choices have sampled their first token from its logits, `fork` gives them
the leader's full blocks by reference and a copy of its last partial block. Requests of
one step that share a not-yet-cached prefix are not computed twice either: a request whose
next block another request of the step is completing waits one step for the cache hit.

Policies: `fcfs` (arrival order) or `priority` (vLLM's: lower `priority` first, then
arrival; preemption takes the running request of the lowest priority, newest first).

The scheduler never touches tensors.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import deque

from engine.block_hash import BlockHash
from engine.block_manager import BlockCopy, BlockManager
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
    block_copies: list[BlockCopy]  # forks of the last step: copy before this step runs


POLICIES = ("fcfs", "priority")


def _rank(request: Request) -> tuple[int, float]:
    """Priority order: lower priority value first, then earlier arrival."""
    return (request.params.priority, request.arrival_time)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True,
                 policy: str = "fcfs") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {list(POLICIES)}, got "
                             f"{policy!r}")
        self.policy = policy
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pending_forks: dict[str, list[Request]] = {}  # leader id -> its other choices
        self.num_preemptions = 0
        self._copies: list[BlockCopy] = []

    def add(self, request: Request, choices: list[Request] | None = None) -> None:
        """Queue `request`; `choices` are the other choices of it, forked from it later."""
        request.status = RequestStatus.WAITING
        self._queue(request, front=False)
        if choices:
            for choice in choices:
                choice.status = RequestStatus.WAITING
            self.pending_forks[request.request_id] = list(choices)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.pending_forks)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(c) for c in self.pending_forks.values())

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, chunks, preempted)
        if not preempted:
            self._schedule_waiting(budget, chunks)
        copies, self._copies = self._copies, []
        return SchedulerOutput(chunks, preempted, copies)

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk],
                          preempted: list[Request]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request, num_new):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return budget
            chunks.append(ScheduledChunk.next_for(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> None:
        completing = self._blocks_completed_by(chunks)
        deferred: list[Request] = []
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self._seats_used() + self._seats_of(request) > self.max_num_seqs:
                break
            hits = self.blocks.computed_blocks(request)
            cached = len(hits) * self.blocks.block_size
            if self._next_block_is_completing(request, len(hits), completing):
                deferred.append(self.waiting.popleft())  # its hit arrives next step
                continue
            remaining = request.num_tokens - cached
            num_new = min(remaining, budget)
            if num_new < remaining and not self.enable_chunked_prefill:
                break
            if not self.blocks.allocate(request, num_new, hits):
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            self._admit(request, cached)
            chunk = ScheduledChunk.next_for(request, num_new)
            chunks.append(chunk)
            completing |= self._blocks_completed_by([chunk])
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _seats_used(self) -> int:
        """Running sequences and the choices their leaders will fork."""
        return len(self.running) + sum(len(self.pending_forks.get(r.request_id, ()))
                                       for r in self.running)

    def _seats_of(self, request: Request) -> int:
        """A leader reserves a sequence slot for every choice it will fork."""
        return 1 + (len(self.pending_forks.get(request.request_id, ())) if
                    request.num_output_tokens == 0 else 0)

    def _blocks_completed_by(self, chunks: list[ScheduledChunk]) -> set[BlockHash]:
        """Hashes of the blocks that these chunks fill (not yet in the prefix cache)."""
        if not self.blocks.enable_prefix_caching:
            return set()
        size = self.blocks.block_size
        done: set[BlockHash] = set()
        for chunk in chunks:
            first, last = chunk.start // size, (chunk.start + chunk.num_tokens) // size
            done.update(chunk.request.block_hashes[first:last])
        return done

    def _next_block_is_completing(self, request: Request, num_hits: int,
                                  completing: set[BlockHash]) -> bool:
        hashes = request.block_hashes
        return num_hits < len(hashes) and hashes[num_hits] in completing

    def _admit(self, request: Request, cached: int) -> None:
        request.num_computed_tokens = cached
        if request.num_output_tokens == 0:
            request.num_cached_tokens = cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _victim(self) -> Request:
        """Taken out of `running`: the newest request (fcfs), or the newest of the lowest
        priority (priority)."""
        if self.policy == "fcfs":
            return self.running.pop()
        index = max(range(len(self.running)),
                    key=lambda i: (self.running[i].params.priority, i))
        return self.running.pop(index)

    def _queue(self, request: Request, front: bool) -> None:
        """Into `waiting`: at the back (or, preempted, the front) under fcfs; in rank order
        under the priority policy."""
        if self.policy == "priority":
            keys = [_rank(r) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, _rank(request)), request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first for recomputation."""
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(request, front=True)

    # ------------------------------------------------------------------ after a step
    def advance(self, output: SchedulerOutput) -> None:
        """Count the chunks' tokens as computed and offer full blocks to the prefix cache."""
        for chunk in output.chunks:
            request = chunk.request
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            self.blocks.cache_full_blocks(request)

    def take_forks(self, leader: Request) -> list[Request]:
        """The choices waiting for `leader`'s prompt, when it is computed for the first time
        (they sample their first token from its logits, then `fork`)."""
        if leader.num_output_tokens or leader.num_computed_tokens < leader.prompt_len:
            return []
        return self.pending_forks.pop(leader.request_id, [])

    def fork(self, leader: Request, choices: list[Request]) -> None:
        """Give each unfinished choice the leader's prompt blocks; a choice that gets no
        block for its copy of the partial last block is recomputed from the queue instead
        (its full blocks come back from the prefix cache)."""
        for choice in choices:
            if choice.finished:
                continue
            copy = self.blocks.fork(leader, choice, leader.prompt_len)
            if copy is False:
                self._queue(choice, front=True)
                continue
            if copy is not None:
                self._copies.append(copy)
            self._admit(choice, leader.prompt_len)
            choice.num_cached_tokens = 0

    def finish(self, request: Request) -> None:
        """Take a finished (or aborted) request out of the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        for leader_id, choices in list(self.pending_forks.items()):
            if request in choices:
                choices.remove(request)
            if not choices or leader_id == request.request_id:
                del self.pending_forks[leader_id]
        request.status = RequestStatus.FINISHED
        self.blocks.free(request.request_id)
