"""Shared test factories: tiny seeded models, requests for the scheduler and sampler,
random prompts, and greedy decoding with the uncached reference forward to compare the
engine against."""

from __future__ import annotations

import os

import torch

from engine.compute_stats import ComputeTracker
from engine.llm import LLM
from engine.request import Request
from engine.sampling_params import SamplingParams
from model import LoopLM, ModelConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)
CFG = ModelConfig()
# the device the engine tests build their models on (benchmarks/gpu_suite.sh sets cuda)
TEST_DEVICE = os.environ.get("LOOPSERVE_TEST_DEVICE", "cpu")


def make_model(seed: int = 0, **overrides) -> LoopLM:
    """A tiny LoopLM with random weights; router and loop scales spread so depths vary."""
    torch.manual_seed(seed)
    config = ModelConfig(**overrides)
    model = LoopLM(config).eval()
    with torch.no_grad():
        for block in model.layers:
            block.loop_scale.uniform_(-1.0, 1.0)  # make every step matter
            block.router.weight.normal_(0.0, 0.3)
            block.router.bias.normal_(0.0, 0.5)
    return model.to(TEST_DEVICE)


def make_request(name: str = "r", prompt: list[int] | int = 3,
                 params: SamplingParams | None = None, block_size: int = 4,
                 output: tuple[int, ...] = (), index: int = 0, parent: str | None = None,
                 halt_threshold: float = 0.1, max_loops: int = 3) -> Request:
    """A scheduler/sampler request; `prompt` is token ids or a length (ids 0..n-1)."""
    ids = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    request = Request(request_id=name, parent_id=parent or name, index=index,
                      prompt_token_ids=ids, params=params or SamplingParams(),
                      halt_threshold=halt_threshold, max_loops=max_loops,
                      compute=ComputeTracker(CFG, max_loops),
                      eos_token_id=CFG.eos_token_id, max_total_tokens=256,
                      block_size=block_size)
    for token in output:
        request.append_token(token)
    return request


def random_prompts(count: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model: LoopLM, prompt: list[int], max_tokens: int,
                     threshold: float | None, max_loops: int | None
                     ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with the uncached reference forward; returns tokens and logits."""
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(max_tokens):
        out = model.reference_forward(torch.tensor([ids], device=model.device),
                                      halt_threshold=threshold, max_loops=max_loops)
        row = out.logits[0, -1]
        logits.append(row.cpu())  # the recorder's rows are host copies (any device)
        tokens.append(int(row.argmax()))
        ids.append(tokens[-1])
    return tokens, logits


def served_threshold(model: LoopLM, llm: LLM, params: SamplingParams) -> float | None:
    """The threshold the engine serves `params` with (None: exact, in max-depth mode)."""
    if llm.engine.config.mode == "max_depth":
        return None
    return model.config.halt_threshold if params.halt_threshold is None else (
        params.halt_threshold)


class LogitRecorder:
    """Wraps the engine's sampler to keep the logits each request was sampled from."""

    def __init__(self, llm: LLM) -> None:
        self.by_parent: dict[str, list[torch.Tensor]] = {}
        self._sampler = llm.engine.sampler
        llm.engine.sampler = self

    def sample(self, logits, requests):
        for row, request in enumerate(requests):
            self.by_parent.setdefault(request.parent_id, []).append(logits[row].cpu())
        return self._sampler.sample(logits, requests)


def check_against_reference(model: LoopLM, llm: LLM, prompts, params_list,
                            recorder: LogitRecorder | None = None) -> None:
    """Greedy engine outputs equal reference decoding (and the logits, when recorded);
    afterwards every block is free and the pool is consistent."""
    outputs = llm.generate(prompts, params_list)
    for i, (prompt, params, out) in enumerate(zip(prompts, params_list, outputs, strict=True)):
        tokens, logits = reference_greedy(model, prompt, params.max_tokens,
                                          served_threshold(model, llm, params),
                                          params.max_loops)
        assert out.token_ids == tokens, f"prompt {i} diverged"
        if recorder is not None:
            got = recorder.by_parent[out.request_id]
            assert len(got) == len(logits)
            for position, (a, b) in enumerate(zip(got, logits, strict=True)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4,
                                           msg=f"prompt {i} position {position}")
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.usage() == 0.0


def mixed_params(count: int, max_tokens: int = 6) -> list[SamplingParams]:
    thresholds = [None, 0.0, 0.2, 0.5, 0.05]
    return [SamplingParams(max_tokens=max_tokens, halt_threshold=thresholds[i % 5],
                           max_loops=[None, 1, 2, 3][i % 4], **GREEDY) for i in range(count)]


def count_a_decode_step(llm: LLM, prompts: list[list[int]]):
    """Prefill greedy `prompts`, then run one decode step of the runner under `OpCounter`:
    returns (the whole step's counter, one counter per layer run). The step runs eagerly,
    layer by layer, even where the engine has decode buckets (on CUDA: graphs, which
    would run no `_run_layer` to count), and with the norms a GPU runs (fused). The
    requests stay running (step the engine to finish them)."""
    from benchmarks.op_counts import OpCounter
    from engine.row_norm import fused_norms

    engine = llm.engine
    for prompt in prompts:
        engine.add_request(engine.prepare(prompt, SamplingParams(max_tokens=20, **GREEDY)))
    engine.step()  # the prefill
    runner, in_layers = engine.runner, []
    run_layer = runner._run_layer

    def counted_layer(*args):
        with OpCounter() as layer_counter:
            result = run_layer(*args)
        in_layers.append(layer_counter)
        return result

    runner._run_layer = counted_layer
    static, runner.static = runner.static, None
    try:  # the GPU's norms (an fp32 CPU engine composes its own: engine/row_norm.py)
        with fused_norms(runner.blocks), OpCounter() as counter:
            runner.fetch(runner.run(engine._pack(engine.scheduler.schedule())[0]))
    finally:
        del runner._run_layer
        runner.static = static
    assert len(in_layers) == engine.model_config.n_layers, "the step ran no eager layers"
    return counter, in_layers
