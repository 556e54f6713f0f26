"""The two exact forms of one (layer, loop step), over a layer's full-row state.

`LayerState` holds every token of the engine step, halted or not: its hidden state, ACT
mixture, remaining mass R, whether it still loops, its depth, gate sums and the k/v of its
last computed step. A (layer, step) runs in one of two forms (DESIGN section 4):

- **masked** (fixed shape): every row goes through the step; plane t receives
  `where(active, kv_t, kv_last)` (the KV rule without copies). No data-dependent shape and
  no host sync: capturable as a graph. A halted row's state goes on looping (its h_t is
  what a max-depth run computes for it, so it stays finite) while it adds nothing: its R
  is 0, so its ACT weight is 0, and its gates and depth are masked by `active`.
- **compacted**: the active rows are gathered into a smaller batch (fewer FLOPs; the
  active count is data-dependent, so `nonzero` costs a host sync on a GPU) and scattered
  back; plane t receives the same `kv_last` with the active rows replaced. Having paid
  for the count, the runner skips the gathers where every row is active (the masked
  form runs) and the step's work where none is (only the KV rule's fill).

Step 1 of a layer is always masked (`first_masked_step`): every row runs it.

Both write plane t for every row, so the forms mix freely from one step to the next, and
both equal `LoopLM.reference_forward`. A row's R is set to 0 when it halts (its leftover
mass has gone to its last state), so later steps add nothing for it without a mask. Only
the active rows' state is ever read (the compacted form gathers those), and nothing reads
a layer's state after its last step.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.paged_attention import AttentionPlan
from engine.serving_block import ServingBlock


@dataclasses.dataclass
class StepTokens:
    """Per-token inputs of one engine step that every layer shares."""

    rope: torch.Tensor  # [T, 1, hd/2] complex64 (see serving_block.rope_table)
    halt_below: torch.Tensor  # [N, T] fp32: a token halts at step t once R_t < [t-1]: its
    # request's threshold, or +inf from its request's max_loops on
    slots: torch.Tensor  # [N, T] long: the pool row (`pool_rows`) of each token's k/v at
    # each loop plane
    plan: AttentionPlan
    _halted: tuple[torch.Tensor, ...] | None = dataclasses.field(default=None, init=False,
                                                                  repr=False)
    _zero_gates: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def halted_rows(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(active [T] bool False, R [T] fp32 0, depth [T] long 1) of rows that ran one step
        and halted, made once per step and shared by every one-loop layer; the depth is
        every layer's after step 1 (read only: later steps replace it, never update it)."""
        if self._halted is None:
            total, device = like.shape[0], like.device
            self._halted = (torch.zeros(total, dtype=torch.bool, device=device),
                            torch.zeros(total, dtype=torch.float32, device=device),
                            torch.ones(total, dtype=torch.long, device=device))
        return self._halted

    def zero_gates(self, like: torch.Tensor) -> torch.Tensor:
        """[T, 2] fp32 zeros: the gates of a layer without memory, made once per step and
        shared by every such layer (read only: its gate sums are never added to)."""
        if self._zero_gates is None:
            self._zero_gates = torch.zeros(like.shape[0], 2, dtype=torch.float32,
                                           device=like.device)
        return self._zero_gates

    @property
    def rope_pairs(self) -> torch.Tensor:
        """[T, 1, hd/2, 2] fp32 (cos, sin): the rope table as real pairs (a view)."""
        return torch.view_as_real(self.rope)


@dataclasses.dataclass
class LayerState:
    """Every token of the step inside one layer, updated in place step by step."""

    state: torch.Tensor  # [T, D] h_{t-1} of the active rows (model dtype; halted: unread)
    mixture: torch.Tensor  # [T, D] fp32: sum of p_t h_t (+ R h_d at the halt); h_1 in a
    # one-loop model (model dtype: its only step takes all the mass)
    remaining: torch.Tensor  # [T] fp32: R
    active: torch.Tensor  # [T] bool: still loops
    depth: torch.Tensor  # [T] long: steps computed
    gate_sum: torch.Tensor  # [T, 2] fp32
    kv_last: torch.Tensor  # [T, 2, Hkv, hd] k/v of the last computed step


def pool_rows(cache: torch.Tensor) -> torch.Tensor:
    """One layer's pool [blocks, N, bs, 2, Hkv, hd] as rows [blocks * N * bs, 2, Hkv, hd]
    (a view): position p of block b at plane t is row (b * N + t) * bs + p."""
    return cache.view(-1, *cache.shape[3:])


def plane_slots(slots: torch.Tensor, plane_offsets: torch.Tensor) -> torch.Tensor:
    """Plane-0 rows [T] -> every plane's rows [N, T] (plane_offsets [N]: t * bs)."""
    return slots.unsqueeze(0) + plane_offsets.unsqueeze(1)


def write_plane(cache: torch.Tensor, tokens: StepTokens, plane: int, kv: torch.Tensor) -> None:
    """k/v [T, 2, Hkv, hd] of every row into 0-based `plane` of one layer's pool: a copy of
    whole rows (an index_put over block, plane and offset computes every element's place)."""
    pool_rows(cache).index_copy_(0, tokens.slots[plane], kv)


def halt_thresholds(eps: torch.Tensor, loops: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[N, T]: the threshold R_t is held to at each step: eps [T] before a token's max
    loops [T], +inf from there on (it halts whatever R is)."""
    steps = torch.arange(1, num_steps + 1, device=eps.device).unsqueeze(-1)  # [N, 1]
    return torch.where(loops.unsqueeze(0) <= steps, float("inf"), eps.unsqueeze(0))


def _halting(block: ServingBlock, h: torch.Tensor, remaining: torch.Tensor,
             halt_below: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ACT update of rows h [A, D] with their R [A]: (weight of h_t, new R, halted) [A].
    A halting row's leftover mass goes to its last state, and its R becomes 0."""
    lam = block.halt_probability(h, step)
    p = remaining if lam is None else lam * remaining
    left = remaining - p
    halted = left < halt_below
    return torch.addcmul(p, left, halted), left.masked_fill(halted, 0.0), halted


def _project(block: ServingBlock, tokens: StepTokens, state: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
    """Every row's memory read and projections: x [T, D], gates [T, 2], q [T, H, hd] and
    this step's k/v [T, 2, Hkv, hd] (the masked forms' common start)."""
    if block.has_memory:
        x, gates = block.read_memory(state)
    else:  # nothing to read, and no gates to sum
        x, gates = state, tokens.zero_gates(state)
    return x, gates, *block.project_qkv(x, tokens.rope)


def masked_step(block: ServingBlock, cache: torch.Tensor, tokens: StepTokens,
                layer: LayerState, step: int) -> None:
    """Every row through (layer, step); halted rows keep their mixture, R, depth, gates and
    k/v (their R is 0, so their weight is 0) and loop on in `state` unread."""
    active = layer.active
    x, gates, q, kv = _project(block, tokens, layer.state)
    kv = torch.where(active[:, None, None, None], kv, layer.kv_last)
    write_plane(cache, tokens, step - 1, kv)
    h = block.finish_step(x, tokens.plan.attend(cache, step - 1, None, q, active), step)
    if block.has_memory:
        layer.gate_sum.addcmul_(gates, active.unsqueeze(-1))
    layer.depth = layer.depth + active  # not in place: step 1's depth is shared
    layer.kv_last = kv
    if step == block.cfg.max_loops:
        _last_masked_step(layer, h)
        return
    weight, layer.remaining, halted = _halting(block, h, layer.remaining,
                                               tokens.halt_below[step - 1], step)
    layer.mixture.addcmul_(weight.unsqueeze(-1), h)  # fp32 += fp32 * h: no cast kernel
    layer.state = h  # halted rows too (unread: see the module docstring)
    layer.active = active > halted  # active and not halted, in one kernel


def _last_masked_step(layer: LayerState, h: torch.Tensor) -> None:
    """The model's step N: every row still active halts (lam_N = 1, and its threshold is
    +inf), so `_halting` would give weight p = R (R - R = 0 adds nothing) and R = 0: the
    mixture takes R h_N, bit for bit, in one kernel instead of seven. Nothing reads the
    layer's state, R or active flags after step N (the layer's output is its mixture, its
    depths, gate sums and last k/v), so they are left as they were."""
    layer.mixture.addcmul_(layer.remaining.unsqueeze(-1), h)


def first_masked_step(block: ServingBlock, cache: torch.Tensor, tokens: StepTokens,
                      h: torch.Tensor) -> LayerState:
    """Step 1 of a layer in the masked form: every row is active and R = 1, so the layer's
    state is made from the step's results instead of being started from zeros and ones
    and merged into: the same values bit for bit (0 + a = a, 1 * a = a), and 7 kernels
    fewer per layer (no fills, no merges, no `lam * 1`)."""
    x, gates, q, kv = _project(block, tokens, h)
    write_plane(cache, tokens, 0, kv)
    h1 = block.finish_step(x, tokens.plan.attend(cache, 0, None, q), 1)
    lam = block.halt_probability(h1, 1)
    if lam is None:  # a one-loop model: its only step takes all the mass
        return _one_loop_state(tokens, h1, gates, kv)
    halt_below = tokens.halt_below[0]
    left = torch.rsub(lam, 1.0)  # R - p with R = 1, as `_halting` computes it
    halted = left < halt_below
    weight = torch.addcmul(lam, left, halted)  # [T]
    return LayerState(state=h1, mixture=weight.unsqueeze(-1) * h1,  # fp32 [T, D]
                      remaining=left.masked_fill(halted, 0.0), active=halted.logical_not(),
                      depth=tokens.halted_rows(h1)[2], gate_sum=gates.float(), kv_last=kv)


def _one_loop_state(tokens: StepTokens, h1: torch.Tensor, gates: torch.Tensor,
                    kv: torch.Tensor) -> LayerState:
    """A one-loop layer after its only step: every token halts there (a threshold of +inf
    from max_loops = 1 on) with p = 1 and R = 0, so the mixture is h_1 itself; what
    `first_masked_step` would compute with 8 kernels more (1 * h = h, 1 - 1 = 0), bit for
    bit. The mixture stays in the model dtype: the layer's output is h_1 unrounded. No
    later step updates the state in place, so the flags are the step's shared ones."""
    active, remaining, depth = tokens.halted_rows(h1)
    return LayerState(state=h1, mixture=h1, remaining=remaining, active=active, depth=depth,
                      gate_sum=gates.float(), kv_last=kv)


def active_rows(layer: LayerState) -> torch.Tensor:
    """[A] sorted indices of the rows still looping: the data-dependent shape (a sync)."""
    return layer.active.nonzero().squeeze(1)


def compacted_step(block: ServingBlock, cache: torch.Tensor, tokens: StepTokens,
                   layer: LayerState, step: int, rows: torch.Tensor) -> None:
    """Only the active rows `rows` [A] (from `active_rows`, A > 0) through (layer, step)."""
    x, gates = block.read_memory(layer.state.index_select(0, rows))
    q, kv_rows = block.project_qkv(x, tokens.rope.index_select(0, rows))  # kv [A, 2, Hkv, hd]
    kv = layer.kv_last.index_copy(0, rows, kv_rows)
    write_plane(cache, tokens, step - 1, kv)
    h = block.finish_step(x, tokens.plan.attend(cache, step - 1, rows, q), step)
    if block.has_memory:
        layer.gate_sum.index_add_(0, rows, gates.float())
    layer.depth = layer.depth.index_add(0, rows, torch.ones_like(rows))  # step 1's is shared
    layer.kv_last = kv
    remaining = layer.remaining.index_select(0, rows)
    if step == block.cfg.max_loops:  # as `_last_masked_step`: the rows halt with p = R
        layer.mixture.index_add_(0, rows, remaining.unsqueeze(-1) * h)
        return
    weight, left, halted = _halting(block, h, remaining,
                                    tokens.halt_below[step - 1].index_select(0, rows), step)
    layer.mixture.index_add_(0, rows, weight.unsqueeze(-1) * h)  # promotes to fp32
    layer.state = layer.state.index_copy(0, rows, h)
    layer.remaining = layer.remaining.index_copy(0, rows, left)
    layer.active = layer.active.index_copy(0, rows, halted.logical_not())


def fill_later_planes(cache: torch.Tensor, tokens: StepTokens, layer: LayerState,
                      first_plane: int, num_planes: int) -> None:
    """KV rule for planes the loop did not reach (0-based first_plane..num_planes-1): every
    row shows its last computed k/v there, written in one indexed copy."""
    later = num_planes - first_plane
    if later <= 0:
        return
    rows = tokens.slots[first_plane:num_planes].flatten()  # [later * T], plane-major (a view)
    pool_rows(cache).index_copy_(0, rows, layer.kv_last.repeat(later, 1, 1, 1))
