"""Turn rendered examples into padded tensors, and teacher-forced checks on them.

Targets follow the SFT convention: only the answer (and its <eos>) is scored; prompt
positions and padding get `IGNORE`. Padding goes at the end, so under causal attention it
never changes a real token's result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from model.looplm import LoopLM
from training.data import Example

IGNORE = -100


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor  # [B, T] input tokens (padded with pad_id)
    targets: torch.Tensor  # [B, T] next token at answer positions, IGNORE elsewhere
    real: torch.Tensor  # [B, T] bool: not padding


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pad to the longest example; position i predicts token i + 1."""
    width = max(len(e.ids) for e in examples) - 1
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    real = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, example in enumerate(examples):
        seq = torch.tensor(example.ids, dtype=torch.long)
        n = len(seq) - 1
        ids[row, :n], real[row, :n] = seq[:-1], True
        first = example.prompt_len - 1  # the last prompt token predicts the first answer token
        targets[row, first:n] = seq[example.prompt_len:]
    return Batch(ids, targets, real)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclasses.dataclass
class TeacherForced:
    """Per-example results of one teacher-forced forward."""

    correct: torch.Tensor  # [B] bool: every answer token is the argmax
    predicted: torch.Tensor  # [B, T] argmax at every position
    logits: torch.Tensor  # [B, T, V]
    depths: torch.Tensor  # [B, T, L]
    gates: torch.Tensor  # [B, T, L, 2]
    batch: Batch


@torch.no_grad()
def teacher_forced(model: LoopLM, examples: Sequence[Example], threshold: float | None
                   ) -> TeacherForced:
    """Exact match under teacher forcing (= greedy exact match, without a decode loop)."""
    batch = collate(examples, model.config.pad_token_id)
    out = model.reference_forward(batch.ids, halt_threshold=threshold)
    scored = batch.targets != IGNORE
    predicted = out.logits.argmax(-1)
    right = (predicted == batch.targets) | ~scored
    return TeacherForced(right.all(dim=1), predicted, out.logits, out.depths, out.memory_gates,
                         batch)
