"""Attention of a step's active queries over the paged KV cache, one (layer, loop step) plane.

The KV pool of one layer is `[num_blocks, N, block_size, 2, n_kv_heads, head_dim]`; plane
t holds every cached position's k/v at loop step t (a token that halted earlier in the
layer has its last step's k/v copied into the later planes: the KV rule). A query at
position p of a sequence attends to positions 0..p of that sequence in the plane.

The plan is built once per engine step (block tables do not change inside a step) and used
by every (layer, step) call. Sequences with a single new token ("decodes") come first in
the flat token order and are attended to in one padded, batched call; sequences with a
chunk of several tokens are grouped into padded causal calls that at most double a
group's work (`engine/prefill_groups.py`), a chunk unlike the others alone.

A call reads its rows' blocks of the plane with one `index_select` of whole blocks (each a
contiguous [bs, 2, Hkv, hd] run) into a `GatherWorkspace` that lives as long as the runner:
on a CPU, aten's multi-index gather into a fresh buffer costs 2-6x more (it computes each
element's offset, and a fresh buffer of hundreds of MB at long contexts pays a page fault
per 4 KiB it touches; `benchmarks/paged_gather.py` measures both). With a `FlexDecode`
(`--attention-backend flex`) or a `TritonDecode` (`--attention-backend triton`) the decode
calls read the pool in place instead; the Triton kernel also reads a halted row's one key
only, in the masked form.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F

from engine.flex_paged import FlexDecode, FlexMask
from engine.prefill_groups import PrefillGroup, attend_group, group_prefills, host_index
from engine.step_upload import StepUpload
from engine.triton_paged import TritonDecode


class GatherWorkspace:
    """The buffer every attention call gathers its k/v blocks into, reused from one call to
    the next (each call is done with it before the next gathers: calls run in order, on
    one stream). It grows to the largest gather seen and stays there; `None` in place of
    a workspace gathers into a fresh tensor (what a captured CUDA graph needs: its memory
    comes from the graph's pool). The views of each gather shape are kept too: a step's
    calls mostly share one shape, and a view costs a CPU microsecond or two each time."""

    MAX_VIEWS = 256

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def views(self, rows: int, width: int, block: torch.Size, like: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of the buffer, of `like`'s dtype and device: [rows * width, *block] to
        gather whole blocks into, and the same memory as [rows, width * bs, *block[1:]]."""
        key = (rows, width, block, like.dtype, like.device)
        hit = self._views.get(key)
        if hit is not None:
            return hit
        numel = rows * width * math.prod(block)
        buffer = self._buffer
        if (buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype
                or buffer.device != like.device):
            buffer = self._buffer = like.new_empty(numel)
            self._views.clear()
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        flat = buffer[:numel].view(rows * width, *block)
        pair = self._views[key] = (flat, flat.view(rows, width * block[0], *block[1:]))
        return pair


def gather_blocks(cache: torch.Tensor, plane: int, blocks: torch.Tensor,
                  workspace: GatherWorkspace | None) -> torch.Tensor:
    """k/v of plane `plane` in the blocks `blocks` [n, W]: [n, W * bs, 2, Hkv, hd]."""
    view = cache.select(1, plane)  # [num_blocks, bs, 2, Hkv, hd], a strided view
    rows, width = blocks.shape
    if workspace is None:
        out = view.index_select(0, blocks.reshape(-1))
        return out.view(rows, width * view.shape[1], *view.shape[2:])
    flat, result = workspace.views(rows, width, view.shape[1:], cache)
    torch.index_select(view, 0, blocks.reshape(-1), out=flat)
    return result


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
                     ) -> torch.Tensor:
    """One query per row: q [n, H, hd] over k, v [n, C, Hkv, hd] where valid [n, C] ->
    [n, H * hd]. `valid` is bool, or the additive mask of `key_bias` (0 or -inf in q's
    dtype): SDPA turns a bool mask into that on every call, so a plan makes it once.
    The G = H / Hkv query heads that share a kv head go in as that head's G
    query positions (query head h reads kv head h // G, as `enable_gqa` has it), so the
    keys are read once per kv head instead of being repeated G times. The same numbers;
    on a CPU 1.05-1.2x faster with groups of 2 (`benchmarks/paged_gather.py --preset
    tiny`), about 2x with groups of 4 (a one-off timing at 64 rows x 128 keys)."""
    rows, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)  # [n, Hkv, G, hd]
    out = F.scaled_dot_product_attention(
        grouped, k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :])  # [n, Hkv, G, hd]
    return out.reshape(rows, heads * head_dim)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid [n, C] bool -> [n, C] additive mask in `dtype`: 0 where valid, -inf where not
    (what SDPA makes of a bool mask, so the attention is the same to the bit)."""
    return torch.full(valid.shape, float("-inf"), dtype=dtype,
                      device=valid.device).masked_fill_(valid, 0.0)


@dataclasses.dataclass
class PrefillSlice:
    token_start: int  # flat index of the chunk's first token
    token_end: int
    blocks: torch.Tensor  # [nb] the sequence's block table
    context_len: int  # positions 0..context_len-1 are attended to


@dataclasses.dataclass
class AttentionPlan:
    num_decodes: int  # flat tokens [0, num_decodes) are one-token sequences, one row each
    decode_blocks: torch.Tensor  # [S_d, W] block tables, padded with block 0
    decode_key_valid: torch.Tensor  # [S_d, W * block_size] bool: position < context length
    prefills: list[PrefillSlice]
    positions: torch.Tensor  # [T] position of each flat token
    prefill_blocks: torch.Tensor  # [P, Wp] the prefills' block tables, padded with block 0
    slice_starts: torch.Tensor  # [P + 1] flat index where decodes end and each prefill ends
    slice_bounds: list[int]  # the same, on the host
    decode_contexts: torch.Tensor | None = None  # [S_d] positions each decode attends to
    workspace: GatherWorkspace | None = None  # where calls gather k/v (None: fresh tensors)
    flex: FlexDecode | None = None  # decodes read the pool in place (no gather) when set
    paged: TritonDecode | None = None  # decodes read the pool in place, to their lengths
    # plane -> the flex mask of every decode row: built by the step's first layer, reused
    flex_masks: dict[int, FlexMask] = dataclasses.field(default_factory=dict)
    # dtype -> decode_key_valid as an additive mask: made by the step's first layer, reused
    decode_key_bias: dict[torch.dtype, torch.Tensor] = dataclasses.field(default_factory=dict)
    # the every-token prefill bounds -> their attention calls (made by `build`)
    prefill_calls: dict[tuple[int, ...], list] = dataclasses.field(default_factory=dict)

    @staticmethod
    def pack(upload: StepUpload, block_tables: list[list[int]], starts: list[int],
             lengths: list[int], num_decodes: int, block_size: int) -> dict:
        """Put the plan's tables into the step's upload; returns the host-side layout that
        `build` needs. Sequences in flat order; the first `num_decodes` have length 1."""
        contexts = [s + n for s, n in zip(starts, lengths, strict=True)]
        widths = [-(-c // block_size) for c in contexts]
        dec_width = max(widths[:num_decodes], default=1)
        upload.add("decode_blocks", _padded(block_tables[:num_decodes], dec_width),
                   (num_decodes, dec_width))
        upload.add("decode_contexts", contexts[:num_decodes])
        pre_width = max(widths[num_decodes:], default=1)
        num_prefills = len(block_tables) - num_decodes
        upload.add("prefill_blocks", _padded(block_tables[num_decodes:], pre_width),
                   (num_prefills, pre_width))
        ends = list(itertools.accumulate(lengths[num_decodes:], initial=num_decodes))
        upload.add("slice_starts", ends)
        groups = []  # the masked form's prefill calls: (members, L of a padded group)
        for members in group_prefills(lengths[num_decodes:], widths[num_decodes:]):
            if len(members) == 1:
                groups.append((members, None))
                continue
            index, longest = host_index(members, ends, num_prefills)
            upload.add(f"prefill_group{len(groups)}", index.tolist())
            groups.append((members, longest))
        return {"num_decodes": num_decodes, "block_size": block_size, "ends": ends,
                "contexts": contexts[num_decodes:], "widths": widths[num_decodes:],
                "groups": groups}

    @classmethod
    def build(cls, layout: dict, uploaded: dict[str, torch.Tensor],
              workspace: GatherWorkspace | None = None, flex: FlexDecode | None = None,
              paged: TritonDecode | None = None) -> AttentionPlan:
        """The plan from `pack`'s layout and the uploaded tensors (no further copies)."""
        num_decodes, block_size, ends = layout["num_decodes"], layout["block_size"], \
            layout["ends"]
        positions = uploaded["positions"]
        dec_blocks = uploaded["decode_blocks"]
        keys = torch.arange(dec_blocks.shape[1] * block_size, device=positions.device)
        dec_valid = keys[None, :] < uploaded["decode_contexts"][:, None]  # [S_d, W * bs]
        padded = uploaded["prefill_blocks"]
        prefills = [PrefillSlice(ends[i], ends[i + 1], padded[i, :width], context)
                    for i, (width, context) in enumerate(zip(layout["widths"],
                                                             layout["contexts"], strict=True))]
        slice_starts = uploaded["slice_starts"]
        plan = cls(num_decodes, dec_blocks, dec_valid, prefills, positions, padded,
                   slice_starts, ends, uploaded["decode_contexts"],
                   workspace, flex, paged)
        if prefills:  # every token's prefill calls, from the step's upload
            plan.prefill_calls[tuple(ends)] = [
                members[0] if longest is None else PrefillGroup.from_index(
                    members, uploaded[f"prefill_group{j}"], longest, layout["widths"], padded)
                for j, (members, longest) in enumerate(layout["groups"])]
        return plan

    def attend(self, cache: torch.Tensor, plane: int, active: torch.Tensor | None,
               q: torch.Tensor, looping: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [A, H * hd] for the active flat tokens `active` [A] (sorted; None:
        every token of the step, with no host sync) with queries q [A, H, hd], reading plane
        `plane` (0-based) of one layer's `cache`. `looping` [T] bool (with active None, the
        masked form): the rows still looping; where the backend can (triton), a decode row
        that has halted reads one key instead of its context, and its output is unread."""
        if not self.prefills:  # decodes only: no slicing to do
            return self._attend_decodes(cache, plane, active, q, looping)
        whole = active is None  # the masked form: every token of the step
        if whole:
            active = self.all_tokens
            bounds = self.slice_bounds
        else:
            bounds = torch.searchsorted(active, self.slice_starts).tolist()
            looping = None  # compacted: every row given loops
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if bounds[0] > 0:
            out[:bounds[0]] = self._attend_decodes(
                cache, plane, active[:bounds[0]], q[:bounds[0]],
                None if looping is None else looping[:bounds[0]])
        first = bounds[0]
        for call in self._prefill_calls(bounds, reuse=whole):
            if isinstance(call, int):  # one chunk alone
                lo, hi = bounds[call], bounds[call + 1]
                out[lo:hi] = self._attend_prefill(cache, plane, self.prefills[call],
                                                  active[lo:hi], q[lo:hi])
            elif call.rows is None:  # every prefill query, in order
                out[first:] = self._attend_group(cache, plane, call, active[first:], q[first:])
            else:
                out[call.rows] = self._attend_group(cache, plane, call, active[call.rows],
                                                    q[call.rows])
        return out

    @property
    def all_tokens(self) -> torch.Tensor:
        return torch.arange(self.positions.numel(), device=self.positions.device)

    def _prefill_calls(self, bounds: list[int], reuse: bool) -> list[int | PrefillGroup]:
        """The attention calls of the prefill queries split by `bounds` (see
        `engine/prefill_groups.py`): a chunk index for a chunk alone, or a padded group.
        Every token's (`reuse`, the masked form) were made with the plan, from the step's
        upload; a compacted subset's are made here (one upload: its sync came first)."""
        if reuse:
            return self.prefill_calls[tuple(bounds)]
        counts = [hi - lo for lo, hi in itertools.pairwise(bounds)]
        widths = [p.blocks.numel() for p in self.prefills]
        return [g[0] if len(g) == 1 else PrefillGroup.layout(g, bounds, widths,
                                                              self.prefill_blocks)
                for g in group_prefills(counts, widths)]

    def _attend_group(self, cache: torch.Tensor, plane: int, group: PrefillGroup,
                      tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """One padded call over a group's chunks: tokens [A_g] flat, q [A_g, H, hd]."""
        kv = gather_blocks(cache, plane, group.blocks, self.workspace)  # [G, C, 2, Hkv, hd]
        return attend_group(group, q, self.positions[tokens], kv[:, :, 0], kv[:, :, 1])

    def _attend_decodes(self, cache: torch.Tensor, plane: int, rows: torch.Tensor | None,
                        q: torch.Tensor, looping: torch.Tensor | None = None) -> torch.Tensor:
        """rows [n] of the decode rows (None: all of them); looping [n] bool or None."""
        blocks = self.decode_blocks if rows is None else self.decode_blocks[rows]
        if self.paged is not None:
            lengths = self.decode_contexts if rows is None else self.decode_contexts[rows]
            if looping is not None:  # a halted row reads position 0 only
                lengths = torch.where(looping, lengths, 1)
            return self.paged.attend(cache, plane, q, blocks, lengths)
        if self.flex is not None:
            return self.flex.attend(cache, q, self._flex_mask(cache, plane, rows, blocks))
        valid = self._decode_bias(q.dtype)
        valid = valid if rows is None else valid[rows]
        kv = gather_blocks(cache, plane, blocks, self.workspace)  # [n, W * bs, 2, Hkv, hd]
        return decode_attention(q, kv[:, :, 0], kv[:, :, 1], valid)

    def _decode_bias(self, dtype: torch.dtype) -> torch.Tensor:
        bias = self.decode_key_bias.get(dtype)
        if bias is None:
            bias = self.decode_key_bias[dtype] = key_bias(self.decode_key_valid, dtype)
        return bias

    def _flex_mask(self, cache: torch.Tensor, plane: int, rows: torch.Tensor | None,
                   blocks: torch.Tensor) -> FlexMask:
        if rows is not None:  # a compacted subset: its own mask
            return self.flex.mask(cache, plane, blocks, self.decode_contexts[rows])
        mask = self.flex_masks.get(plane)
        if mask is None:
            mask = self.flex_masks[plane] = self.flex.mask(cache, plane, blocks,
                                                           self.decode_contexts)
        return mask

    def _attend_prefill(self, cache: torch.Tensor, plane: int, piece: PrefillSlice,
                        tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        kv = gather_blocks(cache, plane, piece.blocks[None], self.workspace)
        kv = kv[0, :piece.context_len]  # [ctx, 2, Hkv, hd]
        k, v = kv[:, 0], kv[:, 1]  # [ctx, Hkv, hd] views
        query_pos = self.positions[tokens]  # [a]
        key_pos = torch.arange(k.shape[0], device=k.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [a, ctx]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask[None, None], enable_gqa=True)
        return out[0].transpose(0, 1).flatten(1)  # [a, H * hd]


def _padded(tables: list[list[int]], width: int) -> list[int]:
    """Block tables cut or padded (with block 0, masked out) to `width`, row-major."""
    return [b for t in tables for b in (t[:width] + [0] * (width - len(t[:width])))]
