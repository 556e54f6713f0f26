"""The masked loop step's elementwise chains, written to be fused by `torch.compile`.

A masked (layer, step) in eager mode launches about 40 kernels, most of them short
elementwise ops between the matmuls (norms, sigmoid, softmax, RoPE, casts, the KV rule's
`where`, the ACT update). Here the step is two pure functions around the paged attention
call, which stays eager (its shapes follow the attention plan):

- `pre_attention`: memory read, qkv projection, head norms, RoPE (in real arithmetic:
  inductor does not fuse complex numbers), the cast, k/v stacked and the KV rule's
  `where(active, kv_t, kv_last)`;
- `post_attention`: output projection, MLP, router (an fp32 row reduction, not a GEMV),
  halting and the ACT accumulation, returning the layer's new state functionally.

Compiled (`CompiledChains`, opt-in: `EngineConfig.compile_chains`), inductor keeps each
matmul as one library call and fuses every chain between them into one generated kernel.
The functions take every weight as an argument, so one compiled graph serves all layers
and steps (nothing per layer is baked in: no recompiles), with dynamic row counts.
Eagerly they compute what `ServingBlock` and `loop_step.masked_step` compute, re-associated
only where fusion needs it; tests hold both, compiled and not, to `reference_forward`.

Counting: under a `TorchDispatchMode` (benchmarks/op_counts.OpCounter) dynamo falls back
to eager, which would count the unfused ops. So while an `OpCounter` listens
(`count_launches`), a compiled call runs with the counter's modes suspended under the
profiler, and the kernels inductor's graph launches (its fused kernels and library calls)
are reported to the counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.serving_block import ServingBlock


@dataclasses.dataclass(frozen=True)
class ChainWeights:
    """One layer's tensors in the order the chains take them (views of `ServingBlock`)."""

    memory: tuple[torch.Tensor, ...] | None  # norm, gate weight, gate bias, keys^T, values
    qkv_weight: torch.Tensor  # [(H + 2 Hkv) hd, D], rows in pair order
    qk_norm: torch.Tensor  # [H + Hkv, hd] fp32
    attn_out_t: torch.Tensor  # [H hd, D]
    gate_up: torch.Tensor  # [2F, D]
    down_t: torch.Tensor  # [F, D]
    scales: tuple[torch.Tensor, ...]  # per step, 0-d fp32: s_t
    router_weight: torch.Tensor  # [D] fp32
    router_bias: tuple[torch.Tensor, ...]  # per step, [1] fp32 (step feature folded in)

    @classmethod
    def of(cls, block: ServingBlock) -> ChainWeights:
        memory = None
        if block.has_memory:
            memory = (block.memory_norm, block.gate_weight, block.gate_bias, block.keys_t,
                      block.values)
        device = block.qkv_weight.device
        return cls(memory=memory, qkv_weight=block.qkv_weight, qk_norm=block.qk_norm,
                   attn_out_t=block.attn_out_t, gate_up=block.gate_up, down_t=block.down_t,
                   scales=tuple(torch.tensor(s, device=device) for s in block.scales),
                   router_weight=block.router_weight.squeeze(-1).contiguous(),
                   router_bias=tuple(block.router_bias))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The constants the chains specialise on (the same in every layer)."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    slots: tuple[int, ...]  # memory slots per bank read
    bank_columns: tuple[int, ...]  # which of (local, global) the banks are

    @classmethod
    def of(cls, block: ServingBlock) -> Shapes:
        cfg = block.cfg
        memory = block.has_memory
        return cls(heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   hidden=block.hidden, eps=block.eps,
                   slots=tuple(block.slots) if memory else (),
                   bank_columns=tuple(block.bank_columns) if memory else ())


def _read_memory(h: torch.Tensor, memory: tuple[torch.Tensor, ...] | None, shapes: Shapes
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, D] -> (x [T, D], gates [T, 2] fp32), as `ServingBlock.read_memory`."""
    if memory is None:
        return h, h.new_zeros(h.shape[0], 2, dtype=torch.float32)
    norm, gate_weight, gate_bias, keys_t, values = memory
    width = (h.shape[-1],)
    gate = torch.sigmoid(F.linear(h, gate_weight, gate_bias))  # [T, banks]
    query = F.rms_norm(F.rms_norm(h, width, norm, shapes.eps), width, None, shapes.eps)
    scores = query @ keys_t  # [T, S]
    weights = torch.cat([p.softmax(dim=-1) * gate[:, b:b + 1]
                         for b, p in enumerate(scores.split(shapes.slots, dim=-1))], dim=-1)
    columns = [torch.zeros_like(gate[:, 0], dtype=torch.float32)] * 2
    for b, column in enumerate(shapes.bank_columns):
        columns[column] = gate[:, b].float()
    return torch.addmm(h, weights, values), torch.stack(columns, dim=-1)


def _rotate(qk: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """qk [T, heads, hd] fp32 in pair order, rope [T, 1, hd/2, 2] (cos, sin) -> rotated:
    the complex product (a + ib)(c + is) in real arithmetic."""
    pairs = qk.unflatten(-1, (qk.shape[-1] // 2, 2))  # [T, heads, hd/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = rope[..., 0], rope[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def pre_attention(h: torch.Tensor, rope: torch.Tensor, kv_last: torch.Tensor | None,
                  active: torch.Tensor | None, weights: ChainWeights, shapes: Shapes
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row of state h [T, D] up to attention: (x [T, D], gates [T, 2] fp32,
    q [T, H, hd], kv [T, 2, Hkv, hd]) where kv already follows the KV rule (a halted row
    keeps kv_last)."""
    heads, hd = shapes.heads + shapes.kv_heads, shapes.head_dim
    x, gates = _read_memory(h, weights.memory, shapes)
    qkv = F.linear(F.rms_norm(x, (x.shape[-1],), None, shapes.eps), weights.qkv_weight)
    qk = qkv[:, :heads * hd].unflatten(-1, (heads, hd))
    v = qkv[:, heads * hd:].unflatten(-1, (shapes.kv_heads, hd))
    qk = F.rms_norm(qk.float(), (hd,), None, shapes.eps) * weights.qk_norm
    qk = _rotate(qk, rope).to(x.dtype)  # [T, heads, hd]
    kv = torch.stack((qk[:, shapes.heads:], v), dim=1)  # [T, 2, Hkv, hd]
    if kv_last is not None:
        kv = torch.where(active[:, None, None, None], kv, kv_last)
    return x, gates, qk[:, :shapes.heads], kv


def _mlp(x: torch.Tensor, attn: torch.Tensor, scale: torch.Tensor, weights: ChainWeights,
         shapes: Shapes) -> torch.Tensor:
    """x [T, D], attention output [T, H hd] -> h_t [T, D], as `ServingBlock.finish_step`."""
    u = x + (attn @ weights.attn_out_t) * scale  # the scale rides on the matmul's epilogue
    gate, up = F.linear(F.rms_norm(u, (u.shape[-1],), None, shapes.eps),
                        weights.gate_up).split(shapes.hidden, dim=-1)
    return u + ((F.silu(gate) * up) @ weights.down_t) * scale


def _halt_probability(h: torch.Tensor, weights: ChainWeights, bias: torch.Tensor | None
                      ) -> torch.Tensor | None:
    """lam_t [T] fp32 as a row reduction (fuses with what follows); None at step N (no
    `bias`), where it is exactly 1."""
    if bias is None:
        return None
    return torch.sigmoid((h.float() * weights.router_weight).sum(-1) + bias)


def post_attention(x: torch.Tensor, attn: torch.Tensor, gates: torch.Tensor,
                   layer: tuple[torch.Tensor, ...], halt_below: torch.Tensor,
                   weights: ChainWeights, shapes: Shapes, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Attention output [T, H hd] to the layer's next state, for every row. `layer` is
    (state, mixture, remaining, active, depth, gate_sum) as in `LayerState`; returns them
    updated. A halted row (R = 0) adds nothing and keeps its state. `scale` is the step's
    s_t, `bias` its router bias (None at step N)."""
    state, mixture, remaining, active, depth, gate_sum = layer
    h = _mlp(x, attn, scale, weights, shapes)
    lam = _halt_probability(h, weights, bias)
    p = remaining if lam is None else lam * remaining
    left = remaining - p
    halted = left < halt_below
    weight = torch.addcmul(p, left, halted)
    return (torch.where(active.unsqueeze(-1), h, state),
            torch.addcmul(mixture, weight.unsqueeze(-1), h),
            left.masked_fill(halted, 0.0), active > halted, depth + active,
            torch.addcmul(gate_sum, gates, active.unsqueeze(-1)))


def first_post_attention(x: torch.Tensor, attn: torch.Tensor, gates: torch.Tensor,
                         halt_below: torch.Tensor, weights: ChainWeights, shapes: Shapes,
                         bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Step 1: every row is active with R = 1, so the state is made, not merged into.
    Returns (state, mixture, remaining, active, depth, gate_sum)."""
    h = _mlp(x, attn, weights.scales[0], weights, shapes)
    lam = _halt_probability(h, weights, bias)
    if lam is None:
        lam = torch.ones_like(halt_below)
    left = torch.rsub(lam, 1.0)
    halted = left < halt_below
    weight = torch.addcmul(lam, left, halted)
    return (h, weight.unsqueeze(-1) * h, left.masked_fill(halted, 0.0), halted.logical_not(),
            torch.ones_like(halted, dtype=torch.long), gates.float())


# --------------------------------------------------------------------- compiled and counted
_LISTENERS: list[Callable[[list[str]], None]] = []  # called with each compiled call's kernels


@contextlib.contextmanager
def count_launches(report: Callable[[list[str]], None]) -> Iterator[None]:
    """While active, each compiled chain call runs with every torch function and dispatch
    mode suspended (so it runs compiled, not traced op by op) under the profiler, and
    reports the names of the kernels it launched to `report`."""
    _LISTENERS.append(report)
    try:
        yield
    finally:
        _LISTENERS.remove(report)


@contextlib.contextmanager
def _modes_suspended() -> Iterator[None]:
    popped = []
    while torch.overrides._get_current_function_mode_stack():
        popped.append(torch.overrides._pop_mode())
    try:
        with torch.utils._python_dispatch._disable_current_modes():
            yield
    finally:
        for mode in reversed(popped):
            torch.overrides._push_mode(mode)


# profiler events inside a compiled graph that launch no kernel
_NOT_LAUNCHES = frozenset({"aten::empty", "aten::empty_strided", "aten::as_strided",
                           "aten::view", "aten::resolve_conj", "aten::resolve_neg",
                           "aten::alias", "aten::t", "aten::transpose", "aten::reshape"})


def require_compiler(what: str, instead: str) -> None:
    """torch.compile on a CPU builds C++: without a compiler, `what` ends start-up."""
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "gcc", "cc")):
        raise ConfigError(f"{what} needs a C/C++ compiler on PATH for torch.compile "
                          f"(install g++), or {instead}")


class CompiledChains:
    """`pre_attention`, `post_attention` and `first_post_attention` under `torch.compile`
    (dynamic row counts, one graph per variant shared by every layer; `ModelRunner` warms
    them up at start-up)."""

    def __init__(self) -> None:
        import torch._inductor.config as inductor_config

        require_compiler("compile_chains", "run without --compile-chains")
        # each fused CPU kernel marks itself for the profiler (what `count_launches` reads)
        inductor_config.cpp.enable_kernel_profile = True
        self.pre = self._wrap(pre_attention)
        self.post = self._wrap(post_attention)
        self.first_post = self._wrap(first_post_attention)

    @staticmethod
    def _wrap(fn: Callable) -> Callable:
        # automatic dynamic shapes: a second row count makes the row dimension symbolic
        return counted(torch.compile(fn, fullgraph=True))


def launch_counted(name: str, launch: Callable[[], object]) -> None:
    """Run `launch`, one kernel no aten op stands for (a Triton kernel): while any
    `count_launches` listener listens, with the modes suspended (its host-side work is not
    the device's), reported as one launch named `name`."""
    if not _LISTENERS:
        launch()
        return
    with _modes_suspended():
        launch()
    for report in list(_LISTENERS):
        report([name])


def counted(compiled: Callable) -> Callable:
    """`compiled` (a torch.compile'd function), reporting its launches to `count_launches`'
    listeners while any listen. Modes are suspended for the call, so syncs inside it are not
    seen: fullgraph compilation leaves none (a host read would be a graph break)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not _LISTENERS:
            return compiled(*args, **kwargs)
        with _modes_suspended(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = compiled(*args, **kwargs)
        launches = _graph_kernels(prof.events())
        for report in list(_LISTENERS):
            report(launches)
        return result

    return call


def _graph_kernels(events: Any) -> list[str]:
    """Names of the kernels the compiled graphs launched: the direct children of each
    `CompiledFxGraph` call that do more than allocate or alias."""
    kernels = []
    for event in events:
        parent = event.cpu_parent
        if parent is None or "CompiledFxGraph" not in parent.name:
            continue
        if event.name not in _NOT_LAUNCHES:
            kernels.append(event.name)
    return kernels
