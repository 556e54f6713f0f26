"""Prompt logprobs (vLLM's `prompt_logprobs`): which logits rows of a step a chunk asks the
runner for, and the prompt entries they give.

The logits at prompt position p give the logprob of prompt token p + 1 (entry p + 1; entry
0 is None). A chunk asks for the logits of its prompt positions whose entry is still
missing, so a prompt computed over several steps (chunked prefill) fills its entries in
order, and a prompt recomputed after preemption adds none twice. A request that asks for
prompt logprobs takes no prefix-cache hits (`BlockManager.computed_blocks`): every prompt
position is computed, in the served semantics (the request's own threshold and max_loops).
Only the leader (choice 0) of an n > 1 request scores its prompt; the choices share it.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.logprobs import logprob_entries, logprob_table
from engine.request import Request
from engine.sampling_batch import take_rows, upload
from engine.scheduler import ScheduledChunk


@dataclasses.dataclass(frozen=True)
class ChunkRows:
    """The logits rows one chunk needs: positions that score the next prompt token, then
    (when `samples`) its last token, whose logits give the next token."""

    scored: range  # prompt positions
    samples: bool

    @classmethod
    def of(cls, chunk: ScheduledChunk) -> ChunkRows:
        """Read before the step's results are recorded (it depends on the entries so far)."""
        request = chunk.request
        samples = chunk.samples and request.params.max_tokens > 0  # 0: score the prompt only
        return cls(_missing_positions(request, chunk.start, chunk.num_tokens), samples)

    def offsets(self, chunk: ScheduledChunk) -> list[int]:
        """The rows as token offsets within the chunk, in flat order."""
        rows = [p - chunk.start for p in self.scored]
        return rows + [chunk.num_tokens - 1] if self.samples else rows

    @property
    def count(self) -> int:
        return len(self.scored) + int(self.samples)


def _missing_positions(request: Request, start: int, num_tokens: int) -> range:
    if not request.num_prompt_logprobs_missing:
        return range(0)
    first = len(request.prompt_logprobs) - 1  # the position of the first missing entry
    if first < start:
        raise RuntimeError(
            f"request {request.request_id} skipped prompt positions {first}..{start - 1}: a "
            f"request with prompt_logprobs must compute its whole prompt (no prefix hits)")
    return range(first, min(start + num_tokens, request.prompt_len - 1))


def record_prompt_logprobs(chunks: list[ScheduledChunk], layout: list[ChunkRows],
                           logits: torch.Tensor) -> None:
    """Append the entries that this step's logits [R, V] (rows as in `layout`) give, with
    one device-to-host copy for all of them."""
    rows: list[int] = []
    targets: list[int] = []
    counts: list[int] = []
    row = 0
    for chunk, chunk_rows in zip(chunks, layout, strict=True):
        request = chunk.request
        for position in chunk_rows.scored:
            rows.append(row)
            targets.append(request.prompt_token_ids[position + 1])
            counts.append(request.params.prompt_logprobs)
            row += 1
        row += int(chunk_rows.samples)
    if not rows:
        return
    scored = take_rows(logits, rows)  # [P, V]
    tokens = upload(torch.tensor(targets, dtype=torch.long), logits.device)  # [P]
    table = logprob_table(scored, tokens, max(counts)).tolist()
    entries = iter(logprob_entries(table, counts))
    for chunk, chunk_rows in zip(chunks, layout, strict=True):
        if chunk_rows.scored:
            chunk.request.prompt_logprobs.extend(next(entries) for _ in chunk_rows.scored)
