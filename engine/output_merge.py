"""Merging a request's queued output deltas into one, for a consumer that fell behind.

When the API's event loop is busy (many streams, a slow client), several deltas of one
request can wait in its queue; the consumer then takes them as one delta (as vLLM's
output collector does): one SSE event, one JSON encoding and one socket write instead of
several, with the same tokens, text and logprobs in the same order. Nothing waits to be
merged: a consumer that keeps up gets every delta alone, as before. The time each
merged-away delta was ready stays on the merged one (`RequestOutput.merged_ready_times`),
so inter-token latency metrics keep one observation per delta.
"""

from __future__ import annotations

import dataclasses

from engine.request import CompletionOutput, RequestOutput


def merge_choice(earlier: CompletionOutput, later: CompletionOutput) -> CompletionOutput:
    """One choice's two consecutive deltas as one: tokens, text and logprobs joined; the
    finish reason and running count are the later's."""
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])
    return dataclasses.replace(later, token_ids=earlier.token_ids + later.token_ids,
                               text=earlier.text + later.text, logprobs=logprobs)


def merge_outputs(earlier: RequestOutput, later: RequestOutput, earlier_ready: float
                  ) -> RequestOutput:
    """Two consecutive deltas of one request (`earlier` was ready at `earlier_ready`,
    `time.monotonic()`) as one. Choices keep their order of first appearance; a choice in
    only one of them is taken as it is. Prompt logprobs come in a request's first delta
    only, so the earlier's win; compute, metrics and `finished` are the later's."""
    if earlier.request_id != later.request_id:
        raise ValueError(f"deltas of {earlier.request_id!r} and {later.request_id!r} "
                         f"cannot be merged")
    choices = {c.index: c for c in earlier.outputs}
    for choice in later.outputs:
        before = choices.get(choice.index)
        choices[choice.index] = choice if before is None else merge_choice(before, choice)
    prompt_logprobs = earlier.prompt_logprobs if earlier.prompt_logprobs is not None \
        else later.prompt_logprobs
    return dataclasses.replace(
        later, outputs=list(choices.values()), prompt_logprobs=prompt_logprobs,
        merged_ready_times=(*earlier.merged_ready_times, earlier_ready,
                            *later.merged_ready_times))
