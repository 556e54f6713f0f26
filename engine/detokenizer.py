"""Detokenization and stop strings in the API process, for an engine core that sends token
ids only (as vLLM v1 does: the core never decodes text).

`RequestDetokenizer` turns the core's deltas of one request into deltas with text: each
choice's ids go through an incremental stream decoder; stop strings are looked for once more
than min_tokens tokens are generated, cut (not emitted), and text that could still become
the start of one is held back, exactly as `engine.output_processor` does in one process.
A choice that hits a stop string is finished here: its later tokens are dropped, and once
every choice is finished the caller aborts the request in the core, whose final delta (with
the request's compute) then reports the stop instead of the abort. The compute summary
counts the tokens the core computed before the abort arrived (at most a step or two).
The core's deltas leave out the prompt's ids (this process has them); `process` puts them
back.
"""

from __future__ import annotations

import dataclasses

from engine.request import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from model.tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class _ChoiceText:
    decoder: StreamDecoder
    text: str = ""
    emitted: int = 0  # characters of `text` handed out
    tokens: int = 0  # generated tokens kept (up to a stop string)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    by_stop_string: bool = False


class RequestDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams,
                 prompt_token_ids: list[int] | None = None) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.eos_token_id = tokenizer.eos_token_id
        self.choices = [_ChoiceText(tokenizer.stream_decoder()) for _ in range(params.n)]
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def stopped_here(self) -> bool:
        """Every choice is finished and at least one by a stop string: the core still runs
        the request and must be told to abort it."""
        return (all(c.finish_reason is not None for c in self.choices)
                and any(c.by_stop_string for c in self.choices))

    def process(self, output: RequestOutput) -> RequestOutput:
        """The delta with text (mutated in place: the core's delta is this process's own)."""
        output.outputs = [self._piece(piece) for piece in output.outputs]
        if self.prompt_token_ids is not None:
            output.prompt_token_ids = self.prompt_token_ids
        return output

    def _piece(self, piece: CompletionOutput) -> CompletionOutput:
        choice = self.choices[piece.index]
        if choice.by_stop_string:  # tokens after the stop, or the core's abort: the stop
            return self._out(piece, choice, [], None)
        kept = 0
        for token_id in piece.token_ids:
            kept += 1
            choice.tokens += 1
            if self._push(choice, token_id):
                break
        if not choice.by_stop_string and piece.finish_reason is not None:
            choice.text += choice.decoder.flush()  # pending bytes of a cut character
            choice.finish_reason, choice.stop_reason = piece.finish_reason, piece.stop_reason
        logprobs = None if piece.logprobs is None else piece.logprobs[:kept]
        return self._out(piece, choice, piece.token_ids[:kept], logprobs)

    def _push(self, choice: _ChoiceText, token_id: int) -> bool:
        """Decode one token (not an eos or stop token that ended the choice in the core);
        True if a stop string finished the choice."""
        params = self.params
        if (token_id == self.eos_token_id and not params.ignore_eos
                or token_id in params.stop_token_ids):
            return False
        piece = choice.decoder.push(token_id)
        if not piece:
            return False
        before = len(choice.text)
        choice.text += piece
        if not params.stop or choice.tokens <= params.min_tokens:
            return False
        search_from = max(0, before - self.hold)
        found = [(i, s) for s in params.stop if (i := choice.text.find(s, search_from)) >= 0]
        if not found:
            return False
        index, stop = min(found)
        choice.text = choice.text[:index]
        choice.finish_reason, choice.stop_reason = "stop", stop
        choice.by_stop_string = True
        return True

    def _out(self, piece: CompletionOutput, choice: _ChoiceText, token_ids: list[int],
             logprobs: list | None) -> CompletionOutput:
        finished = choice.finish_reason is not None
        hold = 0 if finished or not self.params.stop else self.hold
        end = max(choice.emitted, len(choice.text) - hold)
        text, choice.emitted = choice.text[choice.emitted:end], end
        if logprobs is None and piece.logprobs is not None:
            logprobs = []
        return CompletionOutput(index=piece.index, token_ids=token_ids, text=text,
                                finish_reason=choice.finish_reason,
                                stop_reason=choice.stop_reason, logprobs=logprobs,
                                num_tokens=choice.tokens)
