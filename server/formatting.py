"""What the generation routes put into a response besides text: logprobs in OpenAI's two
layouts and vLLM's `prompt_logprobs`, `usage` with the request's compute (DESIGN section 6),
and the access log's fields. Everything here is counted from the engine's outputs (the
`PromptTally` of each prompt), never read back from metrics state.
"""

from __future__ import annotations

import functools
from typing import Any

from engine.compute_stats import ComputeSummary
from engine.request import TokenLogprob
from model.tokenizer import Tokenizer
from server.generation import PromptTally

LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a token filtered out by top_k / top_p)


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN also fails >=


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    raw = getattr(tokenizer, "token_bytes", None)
    data = raw(token_id) if raw is not None else tokenizer.token_text(token_id).encode()
    return list(data)


# ---------------------------------------------------------------------- completions layout
class TextOffsets:
    """Where each token starts in a choice's text: the length of what the tokens before it
    decode to (a special token, or the first bytes of a character, add nothing yet)."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0) -> None:
        self._decoder = tokenizer.stream_decoder()
        self.offset = start

    def at(self, token_id: int) -> int:
        start = self.offset
        self.offset += len(self._decoder.push(token_id))
        return start


class CompletionLogprobs:
    """OpenAI's legacy `logprobs` of one choice, built as its tokens arrive (streaming
    calls `take` once per chunk)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._fields: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                         "text_offset": []}

    def _add(self, token_id: int, logprob: float | None, top: dict[str, float] | None,
             offset: int) -> None:
        values = (self.tokenizer.token_text(token_id), logprob, top, offset)
        for key, value in zip(self._fields, values, strict=True):
            self._fields[key].append(value)

    def _top(self, pairs: list[tuple[int, float]]) -> dict[str, float]:
        return {self.tokenizer.token_text(t): _finite(lp) for t, lp in pairs}

    def add_prompt(self, prompt_ids: list[int], entries: list[TokenLogprob | None],
                   top_k: int) -> None:
        """The echoed prompt: entry 0 has no logprob (nothing precedes it)."""
        offsets = TextOffsets(self.tokenizer)
        for token_id, entry in zip(prompt_ids, entries, strict=True):
            if entry is None:
                self._add(token_id, None, None, offsets.at(token_id))
            else:
                self._add(token_id, _finite(entry.logprob), self._top(entry.top_logprobs[:top_k]),
                          offsets.at(token_id))

    def add_generated(self, items: list[TokenLogprob], offsets: TextOffsets) -> None:
        for item in items:
            self._add(item.token_id, _finite(item.logprob), self._top(item.top_logprobs),
                      offsets.at(item.token_id))

    def take(self) -> dict[str, list]:
        """What was added since the last `take` (the whole of it, for a whole response)."""
        taken = self._fields
        self._fields = {key: [] for key in taken}
        return taken


# ---------------------------------------------------------------------- chat layout
def chat_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob]) -> dict[str, Any]:
    """The chat format: one entry per token with its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.token_text(token_id), "logprob": _finite(logprob),
                "bytes": _token_bytes(tokenizer, token_id)}

    return {"content": [{**entry(item.token_id, item.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in item.top_logprobs]}
                        for item in items]}


# ---------------------------------------------------------------------- vLLM's prompt_logprobs
def prompt_logprobs(tokenizer: Tokenizer, prompt_ids: list[int],
                    entries: list[TokenLogprob | None], top_k: int
                    ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's layout: per prompt token, null first, else {token id: {logprob, rank,
    decoded_token}} for the prompt's token and its `top_k` most likely alternatives."""
    def one(token_id: int, entry: TokenLogprob | None) -> dict[str, dict[str, Any]] | None:
        if entry is None:
            return None
        top = entry.top_logprobs[:top_k]
        ranks = {t: rank for rank, (t, _) in enumerate(entry.top_logprobs, start=1)}
        result = {str(token_id): {"logprob": _finite(entry.logprob),
                                  "rank": entry.rank if entry.rank is not None
                                  else ranks.get(token_id),
                                  "decoded_token": tokenizer.token_text(token_id)}}
        for rank, (t, lp) in enumerate(top, start=1):
            result.setdefault(str(t), {"logprob": _finite(lp), "rank": rank,
                                       "decoded_token": tokenizer.token_text(t)})
        return result

    return [one(t, e) for t, e in zip(prompt_ids, entries, strict=True)]


# ---------------------------------------------------------------------- usage
def usage(tallies: list[PromptTally]) -> dict[str, Any]:
    """Token counts and the compute of all the request's prompts, merged."""
    prompt_tokens = sum(t.prompt_tokens for t in tallies)
    completion = sum(t.completion_tokens for t in tallies)
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(t.cached_tokens for t in tallies)}}
    done = [t.compute for t in tallies if t.compute is not None]
    if done:  # exact: the engine's raw sums add
        result["compute"] = functools.reduce(ComputeSummary.merge, done).as_dict()
    return result


def log_fields(response_id: str, usage_: dict[str, Any], reasons: list[str | None]
               ) -> dict[str, Any]:
    """What the access log says about a finished generation."""
    compute = usage_.get("compute") or {}
    return {"response_id": response_id, "prompt_tokens": usage_["prompt_tokens"],
            "completion_tokens": usage_["completion_tokens"],
            "cached_tokens": usage_["prompt_tokens_details"]["cached_tokens"],
            "mean_loops_per_token": compute.get("mean_loops_per_token"),
            "compute_saved": compute.get("compute_saved"), "flops": compute.get("flops"),
            "finish_reasons": reasons}
