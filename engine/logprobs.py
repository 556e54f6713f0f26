"""Logprob entries (`TokenLogprob`) from logits rows, read back in one device-to-host copy.

A row's entry is the logprob of one chosen token (sampled, or the next prompt token) under
the model's own distribution (log-softmax of the raw logits, as OpenAI reports it) and the
top-k alternatives at that position. Every row's numbers go into one fp64 table on the
device (token ids are exact in fp64) so that the host reads them back with one `.tolist()`.
"""

from __future__ import annotations

import torch

from engine.request import TokenLogprob


def logprob_table(logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [R, V], tokens [R] long -> [R, 3 + 2 * top_k] fp64 on the logits' device:
    per row the token id, its logprob, its rank (1 + the tokens more likely than it), then
    the top_k ids and their logprobs (descending)."""
    logprobs = logits.float().log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, tokens.unsqueeze(1))  # [R, 1]
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1  # [R, 1]
    columns = [tokens.unsqueeze(1).double(), chosen.double(), rank.double()]
    if top_k:
        top = logprobs.topk(top_k, dim=-1)  # [R, top_k] each
        columns += [top.indices.double(), top.values.double()]
    return torch.cat(columns, dim=1)


def logprob_entries(table: list[list[float]], counts: list[int | None]
                    ) -> list[TokenLogprob | None]:
    """The host copy of `logprob_table` -> one entry per row with `counts[row]` alternatives
    (None where the row asked for none). The table's top_k must be >= every count."""
    top_k = (len(table[0]) - 3) // 2 if table else 0
    entries: list[TokenLogprob | None] = []
    for row, count in zip(table, counts, strict=True):
        if count is None:
            entries.append(None)
            continue
        ids, values = row[3:3 + count], row[3 + top_k:3 + top_k + count]
        top = [(int(token), value) for token, value in zip(ids, values, strict=True)]
        entries.append(TokenLogprob(int(row[0]), row[1], top, rank=int(row[2])))
    return entries
