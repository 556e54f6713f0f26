"""Batched greedy decoding on top of `reference_forward` (no cache: the prefix is recomputed
each step, which is cheap for the corpus' short problems).

There is no attention mask in the reference forward, so prompts are batched only with
prompts of the same length: every row then has the same length at every step and no
padding ever enters a computation. The result is exactly what per-prompt greedy decoding
gives, which is also what the engine must give (DESIGN section 5).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from model.looplm import LoopLM
from training.batching import chunks


def length_groups(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `sequences` in batches of equal length (no padding needed)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, seq in enumerate(sequences):
        by_length[len(seq)].append(index)
    return [list(part) for indices in by_length.values() for part in chunks(indices, batch_size)]


@torch.no_grad()
def forward_each(model: LoopLM, sequences: Sequence[Sequence[int]],
                 halt_threshold: float | None, batch_size: int = 128
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits [T, V], depths [T, L], gates [T, L, 2]) of each sequence, in order."""
    results: list = [None] * len(sequences)
    for part in length_groups(sequences, batch_size):
        ids = torch.tensor([list(sequences[i]) for i in part], dtype=torch.long)
        out = model.reference_forward(ids, halt_threshold=halt_threshold)
        for row, i in enumerate(part):
            results[i] = (out.logits[row], out.depths[row], out.memory_gates[row])
    return results


@torch.no_grad()
def greedy_decode(model: LoopLM, prompts: Sequence[Sequence[int]], halt_threshold: float | None,
                  max_new_tokens: int = 16, batch_size: int = 128) -> list[list[int]]:
    """Generated ids per prompt (in prompt order), up to and including <eos> if produced."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for part in length_groups(prompts, batch_size):
        rows = torch.tensor([list(prompts[i]) for i in part], dtype=torch.long)
        generated = _decode_rows(model, rows, halt_threshold, max_new_tokens)
        for i, tokens in zip(part, generated, strict=True):
            outputs[i] = tokens
    return outputs


def _decode_rows(model: LoopLM, ids: torch.Tensor, halt_threshold: float | None,
                 max_new_tokens: int) -> list[list[int]]:
    """Greedy steps for equal-length rows ids [B, T] until every row has emitted <eos>."""
    eos = model.config.eos_token_id
    generated: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.reference_forward(ids, halt_threshold=halt_threshold).logits  # [B, T, V]
        next_ids = logits[:, -1].argmax(-1)  # [B]
        for row in (~done).nonzero().flatten().tolist():
            generated[row].append(int(next_ids[row]))
        done |= next_ids == eos
        if bool(done.all()) or ids.shape[1] == model.config.max_position:
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    return generated
