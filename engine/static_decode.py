"""Decode steps in fixed shapes, captured as one CUDA graph per padded bucket.

A step qualifies when every sequence decodes one token and asks only for its next token's
logits, and the batch and its longest context fit a bucket: batch sizes and context widths
(in KV blocks) are powers of two up to the engine's limits. The step's inputs are copied
into the bucket's static buffers (padded rows decode token 0 at position 0 into a scratch
KV block no request owns, and halt at once), the whole forward (every layer, every loop
step in the masked form: no data-dependent shape, no host sync) replays, and the real rows
of the outputs are read back. On CUDA each bucket is a `torch.cuda.CUDAGraph` captured at
start-up; elsewhere (the CPU tests) the same static-shape forward runs eagerly, so the
padding and bucket logic is tested without a GPU. Steps that do not qualify run eagerly
and never fail.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable

import torch

from engine.flex_paged import FlexDecode
from engine.paged_attention import AttentionPlan, GatherWorkspace
from engine.triton_paged import TritonDecode

logger = logging.getLogger("loopserve.engine")


def powers_of_two(limit: int) -> list[int]:
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


@dataclasses.dataclass
class StaticInputs:
    """A bucket's input buffers ([B] rows, [W] blocks per row), overwritten every replay."""

    token_ids: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long
    slots: torch.Tensor  # [B] long: each row's plane-0 pool row (loop_step.pool_rows)
    halt_below: torch.Tensor  # [N, B] fp32
    decode_blocks: torch.Tensor  # [B, W] long
    decode_contexts: torch.Tensor  # [B] long
    scratch_slot: int  # the padded rows' pool row: position 0, plane 0 of the scratch block

    @classmethod
    def allocate(cls, rows: int, width: int, num_steps: int, scratch_block: int,
                 block_size: int, device: torch.device) -> StaticInputs:
        long = dict(dtype=torch.long, device=device)
        scratch_slot = scratch_block * num_steps * block_size  # (b * N + 0) * bs + 0
        return cls(token_ids=torch.zeros(rows, **long), positions=torch.zeros(rows, **long),
                   slots=torch.full((rows,), scratch_slot, **long),
                   halt_below=torch.full((num_steps, rows), float("inf"), device=device),
                   decode_blocks=torch.full((rows, width), scratch_block, **long),
                   decode_contexts=torch.ones(rows, **long), scratch_slot=scratch_slot)

    def plan(self, block_size: int, workspace: GatherWorkspace | None,
             flex: FlexDecode | None, paged: TritonDecode | None = None) -> AttentionPlan:
        """The decode-only attention plan over these buffers (device ops only: it is built
        inside the captured forward, so the masks follow the buffers' contents)."""
        device = self.positions.device
        keys = torch.arange(self.decode_blocks.shape[1] * block_size, device=device)
        valid = keys[None, :] < self.decode_contexts[:, None]  # [B, W * bs]
        empty = torch.zeros(0, 1, dtype=torch.long, device=device)
        rows = self.positions.numel()
        return AttentionPlan(rows, self.decode_blocks, valid, [], self.positions, empty,
                             torch.full((1,), rows, device=device), [rows],
                             self.decode_contexts, workspace, flex, paged)

    def fill(self, step: dict[str, torch.Tensor], rows: int, scratch_block: int) -> None:
        """The real rows from the step's uploaded tensors; the rest padding (position 0 of
        the scratch block)."""
        width = step["decode_blocks"].shape[1]
        padding = {"token_ids": 0, "positions": 0, "slots": self.scratch_slot,
                   "decode_contexts": 1}
        for name, pad in padding.items():
            buffer = getattr(self, name)
            buffer[:rows].copy_(step[name])
            buffer[rows:].fill_(pad)
        self.halt_below[:, :rows].copy_(step["halt_below"])
        self.halt_below[:, rows:].fill_(float("inf"))
        self.decode_blocks.fill_(scratch_block)
        self.decode_blocks[:rows, :width].copy_(step["decode_blocks"])


class StaticDecode:
    """Buckets of fixed-shape decode forwards; `forward(inputs)` runs the model on static
    inputs and returns (logits [B, V], depths [B, L], gates [B, L, 2])."""

    def __init__(self, forward: Callable, max_rows: int, max_width: int, num_steps: int,
                 block_size: int, scratch_block: int, device: torch.device,
                 capture: bool) -> None:
        self.forward = forward
        self.rows = powers_of_two(max_rows)
        self.widths = powers_of_two(max_width)
        self.num_steps = num_steps
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.capture = capture and device.type == "cuda"
        self._buckets: dict[tuple[int, int], tuple[StaticInputs, object]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        # one side stream for every bucket's warm-up and capture: the caching allocator
        # keeps freed blocks per stream, so a stream per bucket would hold each bucket's
        # warm-up memory apart (GBs at the paper preset's largest buckets)
        self._stream = torch.cuda.Stream(device) if self.capture else None
        self.replays = 0  # steps served by a bucket (for tests and metrics)

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The smallest bucket holding `rows` sequences of up to `width` blocks."""
        if rows > self.rows[-1] or width > self.widths[-1]:
            return None
        return (self.rows[bisect.bisect_left(self.rows, rows)],
                self.widths[bisect.bisect_left(self.widths, width)])

    def capture_all(self) -> None:
        """Capture every bucket now (start-up), largest first so the pool fits them all."""
        for rows in reversed(self.rows):
            for width in reversed(self.widths):
                self._get((rows, width))
        logger.info("captured %d decode graphs", len(self._buckets))

    def run(self, step: dict[str, torch.Tensor], rows: int, width: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The step's outputs (real rows only), or None when no bucket holds it."""
        key = self.bucket(rows, width)
        if key is None:
            return None
        inputs, graph = self._get(key)
        inputs.fill(step, rows, self.scratch_block)
        if graph is None:
            outputs = self.forward(inputs)
        else:
            graph[0].replay()
            outputs = graph[1]
        self.replays += 1
        return tuple(t[:rows] for t in outputs)

    def _get(self, key: tuple[int, int]) -> tuple[StaticInputs, object]:
        if key not in self._buckets:
            inputs = StaticInputs.allocate(key[0], key[1], self.num_steps, self.scratch_block,
                                           self.block_size, self.device)
            graph = self._capture(inputs) if self.capture else None
            self._buckets[key] = (inputs, graph)
        return self._buckets[key]

    def _capture(self, inputs: StaticInputs) -> tuple:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy inits must not happen during capture
                self.forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.forward(inputs)
        return graph, outputs
