"""Prefill chunks grouped into padded attention calls, each at most twice its real work.

A step's prefill chunks (and, in a compacted loop step, the subset of each chunk's tokens
still looping) have different query counts n_i and key widths w_i (blocks). One call per
chunk costs a fixed overhead per call (on a CPU a flash-attention call and a gather are
tens of microseconds even when tiny: a compacted step over 64 prompts spent more time in
64 small calls than max-depth spent in one big one); one padded call over all of them
costs G * max(n) * max(w), which can be far more than the sum of n_i * w_i when the
counts differ. `group_prefills` takes the chunks by work, largest first, and lets a
group grow while its padded work stays within `slack` times its real work: the calls
are few (counts within a factor of two share one) and no call pads more than `slack`x.

`PrefillGroup.layout` puts a group's queries into its padded [G, L] layout with one
upload of host-built indices (for the masked form, whose groups are known when the step is
packed, they ride in the step's own upload); `attend_group` is the padded causal call.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

SLACK = 2.0  # a group's padded work over its real work, at most


def group_prefills(counts: list[int], widths: list[int], slack: float = SLACK
                   ) -> list[list[int]]:
    """Chunk indices in groups (chunks with no query are left out), each group sorted.
    counts[i] queries over widths[i] key blocks; a group's padded work
    len * max(count) * max(width) is at most `slack` times the sum of count * width."""
    order = sorted((i for i, n in enumerate(counts) if n > 0),
                   key=lambda i: (-counts[i] * widths[i], i))
    groups: list[list[int]] = []
    most = widest = real = 0
    for i in order:
        n, w = counts[i], widths[i]
        if groups and (len(groups[-1]) + 1) * max(most, n) * max(widest, w) <= \
                slack * (real + n * w):
            groups[-1].append(i)
            most, widest, real = max(most, n), max(widest, w), real + n * w
        else:
            groups.append([i])
            most, widest, real = n, w, n * w
    return [sorted(g) for g in groups]


@dataclasses.dataclass
class PrefillGroup:
    """Where a group's queries go in its padded call, made once per (step, active set)."""

    members: list[int]  # chunk indices, sorted
    blocks: torch.Tensor  # [G, W] the members' block tables (W: the widest member's)
    longest: int  # L, the most queries of a member
    rows: torch.Tensor | None  # [A_g] the group's queries among the call's queries (None:
    # every prefill query, in order: those from bounds[0] on)
    slot: torch.Tensor  # [A_g] each query's member in the group (0..G-1)
    col: torch.Tensor  # [A_g] and its place among that member's queries (0..L-1)

    @classmethod
    def layout(cls, members: list[int], bounds: list[int], widths: list[int],
               all_blocks: torch.Tensor) -> PrefillGroup:
        """bounds [P + 1]: chunk i's queries are [bounds[i], bounds[i+1]) of the call's
        queries (the decodes' come before bounds[0]); all_blocks [P, Wp] on the device.
        Its indices go up in one upload (see `host_index` to put them in the step's)."""
        index, longest = host_index(members, bounds, all_blocks.shape[0])
        return cls.from_index(members, index.to(all_blocks.device), longest, widths,
                              all_blocks)

    @classmethod
    def from_index(cls, members: list[int], index: torch.Tensor, longest: int,
                   widths: list[int], all_blocks: torch.Tensor) -> PrefillGroup:
        """The group from `host_index`'s indices, already on the device (views of them)."""
        everything = _is_everything(members, all_blocks.shape[0])
        parts = 2 if everything else 3
        total = (index.numel() - (0 if everything else len(members))) // parts
        slot, col = index[:total], index[total:2 * total]
        width = max(widths[i] for i in members)
        if everything:
            return cls(members, all_blocks[:, :width], longest, None, slot, col)
        blocks = all_blocks.index_select(0, index[3 * total:])
        return cls(members, blocks[:, :width], longest, index[2 * total:3 * total], slot, col)


def host_index(members: list[int], bounds: list[int], num_chunks: int
               ) -> tuple[torch.Tensor, int]:
    """A group's indices on the host, one int64 tensor: slot [A_g] and col [A_g], then
    (unless the group is every chunk) rows [A_g] and the members [G]; and L."""
    counts = torch.tensor([bounds[i + 1] - bounds[i] for i in members])  # [G]
    starts = torch.tensor([bounds[i] for i in members])  # [G]
    total = int(counts.sum())
    slot = torch.repeat_interleave(torch.arange(len(members)), counts, output_size=total)
    col = torch.arange(total) - torch.repeat_interleave(counts.cumsum(0) - counts, counts,
                                                        output_size=total)
    parts = [slot, col]
    if not _is_everything(members, num_chunks):
        parts += [starts[slot] + col, torch.tensor(members)]
    return torch.cat(parts), int(counts.max())


def _is_everything(members: list[int], num_chunks: int) -> bool:
    return len(members) == num_chunks  # members are distinct chunk indices


def attend_group(group: PrefillGroup, q: torch.Tensor, positions: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a group's queries q [A_g, H, hd] at positions [A_g] over its
    members' k, v [G, C, Hkv, hd] -> [A_g, H * hd]. Padded queries sit at position 0 (they
    see key 0, so no row is empty) and are dropped."""
    num = len(group.members)
    q_pad = q.new_zeros(num, group.longest, *q.shape[1:])  # [G, L, H, hd]
    q_pad[group.slot, group.col] = q
    pos = positions.new_zeros(num, group.longest)  # [G, L]
    pos[group.slot, group.col] = positions
    keys = torch.arange(k.shape[1], device=q.device)
    mask = keys[None, None, :] <= pos[:, :, None]  # [G, L, C]
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], enable_gqa=True)  # [G, H, L, hd]
    return out.transpose(1, 2)[group.slot, group.col].flatten(1)  # [A_g, H * hd]
