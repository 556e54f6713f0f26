"""Deltas that queue up behind a busy consumer come out merged, with nothing lost or
reordered: the merge itself, the request streams that apply it, and the inter-token
latency metric that still counts every delta."""

from __future__ import annotations

import asyncio

import pytest

from engine.compute_stats import ComputeSummary
from engine.output_merge import merge_outputs
from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from engine.request_streams import RequestStreams


def lp(token: int) -> TokenLogprob:
    return TokenLogprob(token_id=token, logprob=-0.5, top_logprobs=[(token, -0.5)])


def delta(tokens: list[int], index: int = 0, finish: str | None = None,
          logprobs: bool = True, **fields) -> RequestOutput:
    choice = CompletionOutput(index=index, token_ids=tokens, text="".join(map(str, tokens)),
                              finish_reason=finish,
                              logprobs=[lp(t) for t in tokens] if logprobs else None,
                              num_tokens=max(tokens) if tokens else 0)
    return RequestOutput(request_id="r", prompt_token_ids=[1, 2], outputs=[choice],
                         finished=finish is not None, **fields)


SUMMARY = ComputeSummary(max_loops=3, tokens=5, loop_sums=(9.0,), gate_sums=(1.0,),
                         flops=10.0, flops_max_depth=20.0)


def test_two_deltas_merge_into_one_with_everything_in_order():
    first = delta([1, 2], prompt_logprobs=[None, lp(2)])
    last = delta([3], finish="length", compute=SUMMARY, metrics={"finished_time": 9.0})
    merged = merge_outputs(first, last, earlier_ready=4.0)
    (choice,) = merged.outputs
    assert choice.token_ids == [1, 2, 3] and choice.text == "123"
    assert [x.token_id for x in choice.logprobs] == [1, 2, 3]
    assert choice.finish_reason == "length" and choice.num_tokens == 3
    assert merged.finished and merged.compute is SUMMARY
    assert merged.metrics == {"finished_time": 9.0}
    assert merged.prompt_logprobs == [None, lp(2)]  # the first delta's, as sent
    assert merged.merged_ready_times == (4.0,)
    assert first.outputs[0].token_ids == [1, 2]  # the inputs are left as they were
    again = merge_outputs(merged, delta([4]), earlier_ready=5.0)
    assert again.merged_ready_times == (4.0, 5.0)


def test_choices_of_n_merge_by_index_and_keep_their_order():
    a = RequestOutput("r", [1], [CompletionOutput(0, [5], "5"), CompletionOutput(1, [6], "6")],
                      finished=False)
    b = RequestOutput("r", [1], [CompletionOutput(1, [7], "7", finish_reason="stop"),
                                 CompletionOutput(2, [8], "8")], finished=False)
    merged = merge_outputs(a, b, earlier_ready=0.0)
    assert [(c.index, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, [5], None), (1, [6, 7], "stop"), (2, [8], None)]
    assert all(c.logprobs is None for c in merged.outputs)  # none asked for: none made


def test_deltas_of_different_requests_are_not_merged():
    other = RequestOutput("s", [1], [CompletionOutput(0, [1], "1")], finished=False)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_outputs(delta([1]), other, earlier_ready=0.0)


async def consume(streams: RequestStreams, request_id: str) -> list:
    got = []
    async for item in streams.deltas(request_id, lambda finished: got.append(finished)):
        got.append(item)
    return got


def test_a_busy_consumer_gets_the_queued_deltas_as_one():
    async def main():
        streams = RequestStreams()
        streams.open("r")
        streams.deliver_all([delta([1]), delta([2])])
        streams.deliver("r", delta([3]))
        streams.deliver("r", delta([4], finish="stop"))
        return await consume(streams, "r")

    merged, closed = asyncio.run(main())
    assert merged.outputs[0].token_ids == [1, 2, 3, 4] and merged.finished
    assert len(merged.merged_ready_times) == 3 and closed is True


def test_a_consumer_that_keeps_up_gets_every_delta_alone():
    async def main():
        streams = RequestStreams()
        streams.open("r")

        async def produce():
            for i in range(1, 4):
                await asyncio.sleep(0.01)
                streams.deliver("r", delta([i], finish="stop" if i == 3 else None))

        task = asyncio.ensure_future(produce())
        got = await consume(streams, "r")
        await task
        return got

    *deltas, closed = asyncio.run(main())
    assert [d.outputs[0].token_ids for d in deltas] == [[1], [2], [3]]
    assert all(d.merged_ready_times == () for d in deltas) and closed is True


def test_an_error_behind_queued_deltas_comes_after_them():
    async def main():
        streams = RequestStreams()
        streams.open("r")
        streams.deliver("r", delta([1]))
        streams.deliver("r", delta([2]))
        streams.deliver("r", RuntimeError("engine core is dead"))
        got = []
        with pytest.raises(RuntimeError, match="core is dead"):
            async for item in streams.deltas("r", got.append):
                got.append(item)
        return got

    merged, closed = asyncio.run(main())
    assert merged.outputs[0].token_ids == [1, 2] and closed is False


def test_inter_token_latency_counts_every_merged_delta():
    from engine import LLMEngine, load_tokenizer
    from engine.async_engine import AsyncEngine
    from server.metrics import ServerMetrics
    from tests.helpers import make_model
    from tests.server_helpers import engine_config

    model = make_model()
    engine = AsyncEngine(LLMEngine(model, load_tokenizer(None, model.config), engine_config()))
    metrics = ServerMetrics(engine, "m")
    observer = metrics.observer("http-1", arrival=0.0)
    observer.on_delta(delta([1]))  # time to first token
    merged = merge_outputs(merge_outputs(delta([2]), delta([3]), 1.0), delta([4]), 2.0)
    observer.on_delta(merged)
    count = sum(s.value for s in metrics.itl.collect()[0].samples
                if s.name.endswith("_count"))
    assert count == 3  # deltas 2, 3 and 4: one observation each, as unmerged
