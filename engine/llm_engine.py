"""LLMEngine: the synchronous engine core. One step reads as schedule, run, postprocess.

Not thread-safe: `AsyncEngine` drives it from a single thread; `LLM` from the caller's.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.compute_stats import ComputeTracker
from engine.engine_config import EngineConfig
from engine.errors import ConfigError, InvalidRequestError
from engine.input_processor import InputProcessor, PreparedRequest
from engine.kv_sizing import num_kv_blocks
from engine.output_processor import (
    append_token,
    completion_delta,
    finish_aborted,
    finish_scored,
    request_output,
)
from engine.prompt_logprobs import ChunkRows, record_prompt_logprobs
from engine.request import Request, RequestOutput
from engine.runner import DeviceStepOutput, ModelRunner, StepInput, StepOutput
from engine.sampler import Sampler
from engine.sampling_batch import take_rows
from engine.sampling_params import OutputKind, SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from model.flops import FlopTable
from model.looplm import LoopLM
from model.tokenizer import Tokenizer, load_tokenizer
from model.weights import load_model

logger = logging.getLogger("loopserve.engine")


@dataclasses.dataclass
class StepStats:
    """What one engine step did, for metrics (the server turns it into Prometheus)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preempted: int
    num_prompt_tokens: int  # prompt tokens computed this step
    num_generation_tokens: int  # tokens sampled this step
    prefix_queries: int  # cumulative
    prefix_hits: int  # cumulative
    active_per_call: list[tuple[int, int, int]]  # (layer, step, active tokens)
    layer_iterations: list[int]  # [L] loop steps run in each layer this step
    layer_tokens: int  # tokens that went through every layer this step
    layer_gates: list[list[float]]  # [L][2] mean gate (local, global) of this step's tokens
    step_seconds: float = 0.0  # wall time of the step, scheduling to sampled ids on the host


class LLMEngine:
    def __init__(self, model: LoopLM, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 stats_callback: Callable[[StepStats], None] | None = None,
                 detokenize: bool = True) -> None:
        """detokenize=False: outputs carry token ids only, and stop strings are left to the
        caller (`engine.detokenizer`, in the API process of an engine-core process)."""
        self.config = config or EngineConfig()
        self.detokenize = detokenize
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)  # process-wide, as torch has it
        self.model = model.eval()
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.max_model_len = min(self.config.max_model_len or model.config.max_position,
                                 model.config.max_position)
        if (not self.config.enable_chunked_prefill
                and self.config.max_num_batched_tokens < self.max_model_len):
            raise ConfigError(
                f"without chunked prefill, max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) must be at least max_model_len "
                f"({self.max_model_len}), or long prompts could never be scheduled")
        num_blocks = self._num_blocks()
        self.block_manager = BlockManager(num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens,
                                   self.config.enable_chunked_prefill,
                                   self.config.scheduling_policy)
        self.runner = ModelRunner(model, num_blocks, self.config.block_size,
                                  max_depth=self.config.mode == "max_depth",
                                  loop_form=self.config.loop_form,
                                  calibration_rows=min(256, self.config.max_num_batched_tokens),
                                  static_decode=self._static_decode(model),
                                  max_num_seqs=self.config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  compile_chains=self.config.compile_chains,
                                  attention_backend=self.config.attention_backend)
        self.sampler = Sampler(self.config.seed)
        self.flop_table = FlopTable(model.config)
        self.stats_callback = stats_callback
        self.processor = InputProcessor(tokenizer, model.config, self.max_model_len, num_blocks,
                                        self.config.block_size, self.config.max_num_seqs)
        self.num_steps = 0
        self._step_started = 0.0  # perf_counter at the start of the step in progress
        self.last_progress = time.monotonic()  # when a step last computed a token
        self.requests: dict[str, list[Request]] = {}  # parent id -> its choices
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None,
                        config: EngineConfig | None = None, **kwargs) -> LLMEngine:
        config = config or EngineConfig()
        device = config.resolved_device()
        model = load_model(model_dir, device=device, dtype=config.resolved_dtype(device))
        tokenizer = load_tokenizer(model_dir or _bundled_dir(), model.config)
        return cls(model, tokenizer, config, **kwargs)

    def _static_decode(self, model: LoopLM) -> bool:
        choice = self.config.static_decode
        return choice == "on" or (choice == "auto" and model.device.type == "cuda")

    def _num_blocks(self) -> int:
        per_block = ModelRunner.kv_bytes_per_token(self.model) * self.config.block_size
        return num_kv_blocks(self.config, self.model.device, per_block)

    # ------------------------------------------------------------------ requests
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None) -> PreparedRequest:
        """Tokenize and validate at the front door (see `InputProcessor`)."""
        return self.processor.prepare(request_id or self.new_request_id(), prompt,
                                      params or SamplingParams())

    def add_request(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (its choices share the prompt's computation)."""
        request_id = prepared.request_id
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        children = [self._new_choice(prepared, index) for index in range(prepared.params.n)]
        self.scheduler.add(children[0], children[1:])
        self.requests[request_id] = children
        return request_id

    def _new_choice(self, prepared: PreparedRequest, index: int) -> Request:
        cfg = self.model_config
        choice = Request(
            request_id=f"{prepared.request_id}#{index}", parent_id=prepared.request_id,
            index=index, prompt_token_ids=list(prepared.prompt_token_ids),
            params=prepared.params, halt_threshold=prepared.halt_threshold,
            max_loops=prepared.max_loops, compute=ComputeTracker(cfg, prepared.max_loops),
            eos_token_id=self.tokenizer.eos_token_id, max_total_tokens=self.max_model_len,
            block_size=self.config.block_size, arrival_time=prepared.arrival_time)
        if self.detokenize:
            choice.detokenizer = self.tokenizer.stream_decoder()
        return choice

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any point and free its blocks; its final output, if it ran."""
        children = self.requests.pop(request_id, None)
        if children is None:
            return None
        deltas = []
        for child in children:
            if child.finish_reason is None:
                finish_aborted(child)
                self.scheduler.finish(child)
            delta = completion_delta(child)
            if delta is not None:
                deltas.append(delta)
        return request_output(request_id, children, deltas)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        self._step_started = time.perf_counter()
        self.num_steps += 1
        schedule = self.scheduler.schedule()
        if schedule.block_copies:
            self.runner.copy_blocks(schedule.block_copies)
        if not schedule.chunks:
            return []
        step_input, chunks = self._pack(schedule)
        result = self.runner.run(step_input)
        self.last_progress = time.monotonic()
        return self._postprocess(schedule, chunks, step_input, result)

    def _pack(self, schedule: SchedulerOutput) -> tuple[StepInput, list[ScheduledChunk]]:
        """Flatten the chunks: one-token chunks first (the runner batches them)."""
        now = time.monotonic()
        chunks = sorted(schedule.chunks, key=lambda c: c.num_tokens != 1)
        token_ids, positions, sample_rows = [], [], []
        for chunk in chunks:
            request = chunk.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            offset = len(token_ids)
            token_ids += request.token_ids[chunk.start:chunk.start + chunk.num_tokens]
            positions += range(chunk.start, chunk.start + chunk.num_tokens)
            # the last token's row if it samples, and any prompt rows it scores
            sample_rows += [offset + i for i in ChunkRows.of(chunk).offsets(chunk)]
        tables = self.block_manager.tables
        step_input = StepInput(
            token_ids=token_ids, positions=positions,
            block_tables=[tables[c.request.request_id] for c in chunks],
            starts=[c.start for c in chunks], lengths=[c.num_tokens for c in chunks],
            halt_thresholds=[c.request.halt_threshold for c in chunks],
            max_loops=[c.request.max_loops for c in chunks], sample_rows=sample_rows,
            num_decodes=sum(1 for c in chunks if c.num_tokens == 1))
        return step_input, chunks

    def _postprocess(self, schedule: SchedulerOutput, chunks: list[ScheduledChunk],
                     step_input: StepInput, device_out: DeviceStepOutput
                     ) -> list[RequestOutput]:
        layout = [ChunkRows.of(c) for c in chunks]  # the logits rows, as `_pack` asked
        self.scheduler.advance(schedule)
        rows, sampling, forks, scored_only = self._sampling_rows(chunks, layout)
        draw = (self.sampler.sample(take_rows(device_out.logits, rows), sampling)
                if sampling else None)
        # the step's one read-back: depths, gate means, sampled ids and their logprobs
        result, table = self.runner.fetch(device_out, draw.table if draw else None)
        sampled = draw.result(table) if draw else None
        self._account_compute(chunks, step_input, result)
        self._record_prompt_logprobs(chunks, layout, result.logits)
        touched: dict[str, None] = {}
        for row, request in enumerate(sampling):
            append_token(request, sampled.token_ids[row], sampled.logprobs[row])
            request.compute.add_logits(self.flop_table.head)
            touched[request.parent_id] = None
        for request in scored_only:
            finish_scored(request)
            touched[request.parent_id] = None
        for leader, choices in forks:
            self.scheduler.fork(leader, choices)
        for request in (*sampling, *scored_only):
            if request.finish_reason is not None:
                self.scheduler.finish(request)
        self._report(schedule, step_input, result, len(sampling))
        return [out for parent in touched if (out := self._output_for(parent)) is not None]

    def _record_prompt_logprobs(self, chunks: list[ScheduledChunk], layout: list[ChunkRows],
                                logits: torch.Tensor) -> None:
        """Prompt logprob entries of this step's scored rows; the LM head ran for each."""
        record_prompt_logprobs(chunks, layout, logits)
        for chunk, chunk_rows in zip(chunks, layout, strict=True):
            for _ in chunk_rows.scored:
                chunk.request.compute.add_logits(self.flop_table.head)

    def _sampling_rows(self, chunks: list[ScheduledChunk], layout: list[ChunkRows]
                       ) -> tuple[list[int], list[Request], list[tuple[Request, list[Request]]],
                                  list[Request]]:
        """Logit row and request of every token to sample. A leader whose prompt is done
        lends its row to the choices forked from it: they share the prompt's computation.
        Last, the requests (and choices) that asked only to score their prompt
        (max_tokens 0): they finish without a row."""
        rows: list[int] = []
        sampling: list[Request] = []
        forks: list[tuple[Request, list[Request]]] = []
        scored_only: list[Request] = []
        row = 0
        for chunk, chunk_rows in zip(chunks, layout, strict=True):
            row += len(chunk_rows.scored)
            if not chunk.samples:
                continue
            choices = self.scheduler.take_forks(chunk.request)
            group = (chunk.request, *choices)
            if chunk_rows.samples:
                rows += [row] * len(group)
                sampling += group
                row += 1
            else:
                scored_only += group
            if choices:
                forks.append((chunk.request, choices))
        return rows, sampling, forks, scored_only

    def _output_for(self, parent_id: str) -> RequestOutput | None:
        children = self.requests.get(parent_id)
        if children is None:
            return None
        if (children[0].params.output_kind is OutputKind.FINAL
                and any(c.finish_reason is None for c in children)):
            children[0].held_delta_times.append(time.monotonic())
            return None
        deltas = [d for c in children if (d := completion_delta(c)) is not None]
        output = request_output(parent_id, children, deltas)
        if output.finished:
            del self.requests[parent_id]
        if deltas or output.finished or output.prompt_logprobs is not None:
            return output
        return None

    # ------------------------------------------------------------------ accounting
    def _account_compute(self, chunks: list[ScheduledChunk], step_input: StepInput,
                         result: StepOutput) -> None:
        """Per-request loops, gates and FLOPs of the tokens computed this step: one table
        [T, 2L + 2] (loops, gate means, FLOPs, max-depth FLOPs per token) summed per
        chunk, and one read of it (a step of decodes, one token a chunk, sums nothing)."""
        table = self._per_token_compute(step_input.positions, result)
        if len(chunks) != table.shape[0]:  # chunks of several tokens: sum each chunk's rows
            lengths = torch.tensor(step_input.lengths)
            owner = torch.arange(len(chunks)).repeat_interleave(lengths)  # [T]
            table = table.new_zeros(len(chunks), table.shape[1]).index_add_(0, owner, table)
        layers = self.model_config.n_layers
        for chunk, length, row in zip(chunks, step_input.lengths, table.tolist(), strict=True):
            chunk.request.compute.add(length, row[:layers], row[layers:2 * layers],
                                      row[-2], row[-1])

    def _per_token_compute(self, positions: list[int], result: StepOutput) -> torch.Tensor:
        """[T, 2L + 2] fp64: each token's loops per layer, gate means per layer, FLOPs and
        FLOPs at full depth."""
        where = torch.tensor(positions, dtype=torch.float64)  # [T]
        flops = self.flop_table.trunk(result.depths, where)  # [T]
        flops_max = self.flop_table.trunk_max_depth(where)  # [T]
        return torch.cat((result.depths.double(), self._gate_means(result.gates).double(),
                          flops.unsqueeze(1), flops_max.unsqueeze(1)), dim=1)

    def _gate_means(self, gates: torch.Tensor) -> torch.Tensor:
        """[T, L, 2] -> [T, L]: mean over the banks the model has."""
        cfg = self.model_config
        banks = [b for b, slots in enumerate((cfg.local_memory_slots, cfg.global_memory_slots))
                 if slots]
        if not banks:
            return torch.zeros(gates.shape[:2])
        return gates.mean(-1) if len(banks) == 2 else gates[..., banks].mean(-1)

    def _report(self, schedule: SchedulerOutput, step_input: StepInput, result: StepOutput,
                num_sampled: int) -> None:
        if self.stats_callback is None:
            return
        try:
            self.stats_callback(self._step_stats(schedule, step_input, result, num_sampled))
        except Exception:  # noqa: BLE001 - metrics must never stop the engine
            logger.exception("stats callback failed")

    def _step_stats(self, schedule: SchedulerOutput, step_input: StepInput, result: StepOutput,
                    num_sampled: int) -> StepStats:
        prompt_tokens = sum(
            max(0, min(c.start + c.num_tokens, c.request.prompt_len) - c.start)
            for c in schedule.chunks)
        gates = result.gates.mean(0).tolist() if result.gates.numel() else []
        return StepStats(
            num_running=self.num_running, num_waiting=self.num_waiting,
            kv_cache_usage=self.block_manager.usage(), num_preempted=len(schedule.preempted),
            num_prompt_tokens=prompt_tokens, num_generation_tokens=num_sampled,
            prefix_queries=self.block_manager.prefix_queries,
            prefix_hits=self.block_manager.prefix_hits,
            active_per_call=result.active_per_call,
            layer_iterations=result.depths.sum(0).tolist(), layer_tokens=len(step_input.token_ids),
            layer_gates=gates, step_seconds=time.perf_counter() - self._step_started)


def _bundled_dir() -> Path:
    from model.weights import BUNDLED_MODEL_DIR
    return BUNDLED_MODEL_DIR
