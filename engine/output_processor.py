"""After sampling: append tokens, detokenize incrementally, apply stop conditions, and build
the per-request output deltas.

Stop strings are cut, not emitted; while a request runs, text that could still become the
start of a stop string is held back so that a streamed delta never has to be taken back.
As in vLLM, stop strings are looked for only once more than min_tokens tokens are generated
(the sampler masks eos and stop_token_ids until then). Prompt logprobs go out once, with
the request's first output after its prompt is scored. An engine built with
`detokenize=False` (the engine-core process) leaves text and stop strings to the API process
(`engine.detokenizer`): its requests have no detokenizer and their outputs carry ids only.
A request of `OutputKind.FINAL` gets no delta until it finishes; its final output then holds
everything, and its metrics the times at which each held-back delta would have gone out.
"""

from __future__ import annotations

import functools
import time

from engine.compute_stats import ComputeSummary
from engine.request import CompletionOutput, Request, RequestOutput, TokenLogprob
from engine.sampling_params import OutputKind


def append_token(request: Request, token_id: int, logprob: TokenLogprob | None) -> None:
    """Record a sampled token and decide whether the request is done."""
    now = time.monotonic()
    if request.first_token_time is None:
        request.first_token_time = now
    request.token_ids.append(token_id)
    if logprob is not None:
        request.logprobs.append(logprob)
    params = request.params
    if token_id == request.eos_token_id and not params.ignore_eos:
        _finish(request, "stop", None)
    elif token_id in params.stop_token_ids:
        _finish(request, "stop", token_id)
    elif request.detokenizer is not None:  # None: the API process detokenizes
        _append_text(request, request.detokenizer.push(token_id))
    if request.finish_reason is None and (request.num_output_tokens >= params.max_tokens
                                          or request.num_tokens >= request.max_total_tokens):
        _finish(request, "length", None)


def _append_text(request: Request, piece: str) -> None:
    if not piece:
        return
    stops = request.params.stop
    before = len(request.text)
    request.text += piece
    if not stops or request.num_output_tokens <= request.params.min_tokens:
        return
    window = max(len(s) for s in stops) - 1
    search_from = max(0, before - window)
    found = [(request.text.find(s, search_from), s) for s in stops]
    found = [(i, s) for i, s in found if i >= 0]
    if found:
        index, stop = min(found)
        request.text = request.text[:index]
        _finish(request, "stop", stop)


def _finish(request: Request, reason: str, stop_reason: str | int | None) -> None:
    request.finish_reason = reason
    request.stop_reason = stop_reason
    if request.detokenizer is not None and not isinstance(stop_reason, str):
        # (a stop string cut the text: nothing to flush)
        request.text += request.detokenizer.flush()  # pending bytes of a cut character


def finish_aborted(request: Request) -> None:
    request.finish_reason = "abort"


def finish_scored(request: Request) -> None:
    """A max_tokens=0 request is done once its prompt is scored: "length", no token."""
    _finish(request, "length", None)


def take_prompt_logprobs(request: Request) -> list[TokenLogprob | None] | None:
    """The leader's prompt logprobs the first time they are complete, else None."""
    if (request.prompt_logprobs is None or request.prompt_logprobs_emitted
            or request.num_prompt_logprobs_missing):
        return None
    request.prompt_logprobs_emitted = True
    return request.prompt_logprobs


def completion_delta(request: Request) -> CompletionOutput | None:
    """What the request produced since its last delta (None if nothing)."""
    finished = request.finish_reason is not None
    hold = 0
    if not finished and request.params.stop:
        hold = max(len(s) for s in request.params.stop) - 1
    text_end = max(request.emitted_text_len, len(request.text) - hold)
    tokens = request.output_token_ids[request.emitted_token_len:]
    text = request.text[request.emitted_text_len:text_end]
    if not tokens and not text and not finished:
        return None
    logprobs = None
    if request.params.logprobs is not None:
        logprobs = request.logprobs[request.emitted_token_len:]
    request.emitted_text_len = text_end
    request.emitted_token_len = request.num_output_tokens
    return CompletionOutput(index=request.index, token_ids=tokens, text=text,
                            finish_reason=request.finish_reason,
                            stop_reason=request.stop_reason, logprobs=logprobs,
                            num_tokens=request.num_output_tokens)


def request_output(parent_id: str, children: list[Request], deltas: list[CompletionOutput]
                   ) -> RequestOutput:
    finished = all(c.finish_reason is not None for c in children)
    first = children[0]
    output = RequestOutput(request_id=parent_id, prompt_token_ids=first.prompt_token_ids,
                           outputs=deltas, finished=finished,
                           num_cached_tokens=first.num_cached_tokens,
                           prompt_logprobs=take_prompt_logprobs(first))
    if finished:
        output.compute = functools.reduce(ComputeSummary.merge,
                                          (child.compute.summary() for child in children))
        output.metrics = {
            "arrival_time": first.arrival_time,
            "first_scheduled_time": min((c.first_scheduled_time for c in children
                                         if c.first_scheduled_time is not None), default=None),
            "first_token_time": min((c.first_token_time for c in children
                                     if c.first_token_time is not None), default=None),
            "finished_time": time.monotonic(),
            "num_preemptions": sum(c.num_preemptions for c in children),
        }
        if first.params.output_kind is OutputKind.FINAL:  # for inter-token latency metrics
            output.metrics["held_delta_times"] = first.held_delta_times
    return output
