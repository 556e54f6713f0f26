"""Count host syncs and kernel-launching ops while a block of code runs.

    with OpCounter() as c:
        llm.engine.step()
    c.syncs, c.kernels, c.uploads, c.by_op          # by_op: Counter of kernel ops

Two layers watch the code: a `TorchFunctionMode` sees the Python-level calls (`.cpu()`,
`.tolist()`, `.item()`, `bool(t)`, `torch.tensor(..., device=...)`) and a
`TorchDispatchMode` sees every aten op after composite ops are decomposed, which is what
launches kernels. Counted:

- **syncs** (the host waits for the device): `.item()`/`bool()`/`int()`/`float()` of a
  device tensor (`aten._local_scalar_dense`), `.cpu()`/`.tolist()`/`.numpy()`/`.to("cpu")`
  of a device tensor and device-to-host `copy_`/`_to_copy`, ops whose output shape depends
  on the data (`nonzero`, `masked_select`, `unique`, `bincount`, `equal`), indexing or
  index-assignment with a boolean mask, and `repeat_interleave` without `output_size`.
- **kernels**: every other aten op on device tensors that is not a pure view, metadata or
  allocation-only op (`view`, `expand`, `permute`, `select`, `slice`, `detach`, `empty`...).
  Composite ops are counted by their parts; `_fused_rms_norm` counts as one (a fused CUDA
  kernel exists). Device-to-host copies count as syncs, host-to-device copies as `uploads`.
- **host_ops**: ops on host tensors (bookkeeping a GPU run would also do on the CPU).

On a CPU-only run (``simulate=True``, the default) every tensor stands for a device tensor
except those known to live on the host: results of `.cpu()` (and ops on host tensors
only), tensors built without an explicit ``device=`` (or with ``device="cpu"`` as a
string), and tensors passed to `mark_host`. So ``x.sum().item()`` is one sync, while
``logits.cpu()`` followed by ``.argmax(-1).tolist()`` on the copy is one sync, not two. A
``.cpu()`` or upload that torch would answer with the same tensor on CPU returns a copy
while counting, as it would on a GPU. With ``simulate=False`` (a real accelerator run)
the tensors' devices decide. Modes are per thread: only the calling thread is counted.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from engine.fused_chains import count_launches

NORMAL, HOST, QUIET = "normal", "host", "quiet"  # scopes a Python-level call sets
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)

# aten ops that launch no kernel: metadata, aliasing and allocation only (views are found
# by their schema; these are the in-place views, allocations and no-ops it does not mark)
NOT_KERNELS = frozenset({
    "_unsafe_view", "_reshape_alias", "detach_", "squeeze_", "unsqueeze_", "transpose_", "t_",
    "as_strided_", "swapdims_", "swapaxes_", "set_", "resize_", "resize_as_", "empty",
    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "lift",
    "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "resolve_conj", "resolve_neg", "_local_scalar_dense", "record_stream", "scalar_tensor",
})
# composite ops left whole: a single fused kernel on accelerators (RMSNorm is also caught at
# the Python level, because outside inference mode autograd decomposes it before any mode)
FUSED = frozenset({"aten::_fused_rms_norm"})
FUSED_CALLS = {torch.nn.functional.rms_norm: "aten._fused_rms_norm",
               torch.rms_norm: "aten._fused_rms_norm"}
# ops whose output size depends on the data: the host must read it back
DATA_DEPENDENT = frozenset({
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "bincount", "equal",
})
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
# ops whose outputs live on the host even inside device code (0-d wrapped scalars)
HOST_OUTPUT = frozenset({"scalar_tensor"})

_T = torch.Tensor
SCALAR_READS = frozenset({_T.item, _T.__bool__, _T.__int__, _T.__float__, _T.__index__,
                          _T.__complex__})
HOST_COPIES = frozenset({_T.cpu, _T.tolist, _T.numpy, _T.__array__})
DATA_FACTORIES = frozenset({torch.tensor, torch.as_tensor, torch.asarray})


def _tensors(*trees: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(trees) if isinstance(x, torch.Tensor)]


class OpCounter:
    """Counts syncs, kernels, uploads and host ops while active (see the module docstring).

    Attributes: ``syncs``, ``kernels``, ``uploads``, ``host_ops`` (ints); Counters ``by_op``
    (kernel ops), ``syncs_by_op``, ``syncs_by_kind``, ``syncs_by_site`` ("file:line
    function") and ``kernels_by_site`` ("file function").
    """

    def __init__(self, simulate: bool = True, record_sites: bool = True) -> None:
        self.simulate = simulate
        self.record_sites = record_sites
        self.syncs = self.kernels = self.uploads = self.host_ops = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self.syncs_by_op: collections.Counter[str] = collections.Counter()
        self.syncs_by_kind: collections.Counter[str] = collections.Counter()
        self.syncs_by_site: collections.Counter[str] = collections.Counter()
        self.kernels_by_site: collections.Counter[str] = collections.Counter()
        self._host = WeakTensorKeyDictionary()
        self._scope = NORMAL
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ public
    def __enter__(self) -> OpCounter:
        self._stack.enter_context(_FunctionLayer(self))
        self._stack.enter_context(_DispatchLayer(self))
        self._stack.enter_context(count_launches(self._compiled))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def mark_host(self, *tensors: torch.Tensor) -> None:
        """Declare tensors made before counting started as host tensors (simulate mode)."""
        for t in tensors:
            self._host[t] = True

    def is_host(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        return not self.simulate or t in self._host

    def summary(self, top: int = 12) -> dict:
        """Totals and the largest entries of each Counter, JSON-ready."""
        return {"syncs": self.syncs, "kernels": self.kernels, "uploads": self.uploads,
                "host_ops": self.host_ops, "top_kernel_ops": dict(self.by_op.most_common(top)),
                "syncs_by_kind": dict(self.syncs_by_kind.most_common()),
                "syncs_by_op": dict(self.syncs_by_op.most_common(top)),
                "syncs_by_site": dict(self.syncs_by_site.most_common(top)),
                "kernels_by_site": dict(self.kernels_by_site.most_common(top))}

    # ------------------------------------------------------------------ recording
    def _sync(self, op: str, kind: str) -> None:
        self.syncs += 1
        self.syncs_by_op[op] += 1
        self.syncs_by_kind[kind] += 1
        if self.record_sites:
            self.syncs_by_site[_call_site(with_line=True)] += 1

    def _kernel(self, op: str) -> None:
        self.kernels += 1
        self.by_op[op] += 1
        if self.record_sites:
            self.kernels_by_site[_call_site(with_line=False)] += 1

    def _compiled(self, launches: list[str]) -> None:
        """What one call of compiled code launched (profiler names, see fused_chains)."""
        for name in launches:
            op = name.replace("::", ".") if name.startswith("aten::") else \
                name if name.startswith("triton.") else "inductor.fused"
            if op.removeprefix("aten.") in DATA_DEPENDENT or op == "aten._local_scalar_dense":
                self._sync(op, "compiled")
            self._kernel(op)

    def _mark(self, result: Any) -> None:
        for t in _tensors(result):
            self._host[t] = True

    @contextlib.contextmanager
    def _scoped(self, scope: str) -> Iterator[None]:
        outer, self._scope = self._scope, scope
        try:
            yield
        finally:
            self._scope = outer


class _FunctionLayer(TorchFunctionMode):
    """Python-level calls: host copies, scalar reads, uploads and host-side factories."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func in SCALAR_READS or func in HOST_COPIES:
            kind = "item" if func in SCALAR_READS else "to_host"
            return self._to_host(func, args, kwargs, kind)
        if func is _T.to or func is _T.cuda:
            target = _target_device(c, func, args, kwargs)
            if target is not None:
                return self._move(func, args, kwargs, target)
        tensors = _tensors(args, kwargs)
        if not tensors:
            return self._factory(func, args, kwargs, data=func in DATA_FACTORIES)
        if all(c.is_host(t) for t in tensors):
            return self._host_call(func, args, kwargs)
        if func in FUSED_CALLS:
            c._kernel(FUSED_CALLS[func])
            with c._scoped(QUIET):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _host_call(self, func, args, kwargs):
        with self.c._scoped(HOST):
            result = func(*args, **kwargs)
        self.c._mark(result)
        return result

    def _to_host(self, func, args, kwargs, kind: str):
        source = args[0]
        if self.c.is_host(source):
            return self._host_call(func, args, kwargs)
        self.c._sync(f"Tensor.{func.__name__}", kind)
        with self.c._scoped(QUIET):
            result = func(*args, **kwargs)
            if result is source:  # torch answers .cpu() of a CPU tensor with itself
                result = source.clone()
        self.c._mark(result)
        return result

    def _move(self, func, args, kwargs, target: str):
        """Tensor.to / Tensor.cuda towards `target` ("host" or "device")."""
        source = args[0]
        host = self.c.is_host(source)
        if target == "host" and not host:
            return self._to_host(func, args, kwargs, "to_host")
        if target == "device" and host:
            self.c.uploads += 1
            with self.c._scoped(QUIET):
                result = func(*args, **kwargs)
                return source.clone() if result is source else result
        return self._host_call(func, args, kwargs) if host else func(*args, **kwargs)

    def _factory(self, func, args, kwargs, data: bool):
        """A tensor made from nothing or from Python data. Simulate mode: on the host unless
        an explicit device= (other than the string "cpu") asks for a device. Real mode: where
        it lands. From Python data onto a device, it is an upload."""
        c = self.c
        if c.simulate:
            device = kwargs.get("device")
            on_device = device is not None and not (
                isinstance(device, str) and device.startswith("cpu"))
            if not on_device:
                return self._host_call(func, args, kwargs)
        if not data:
            return func(*args, **kwargs)
        with c._scoped(QUIET):
            result = func(*args, **kwargs)
        if c.simulate or any(t.device.type != "cpu" for t in _tensors(result)):
            c.uploads += 1
        return result


class _DispatchLayer(TorchDispatchMode):
    """aten ops: kernels, data-dependent syncs, device-host copies, host-only ops."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if c._scope == QUIET:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        host = c._scope == HOST
        if not host and name in ("copy_", "_to_copy"):
            return self._copy(func, args, kwargs, name)
        host = host or self._on_host(args, kwargs)
        if func.name() not in FUSED:
            with self, c._scoped(HOST if host else c._scope):
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        result = func(*args, **kwargs)
        if host:
            self._host_op(func, result)
        else:
            self._count(func, args, kwargs, name, result)
        return result

    def _on_host(self, args, kwargs) -> bool:
        inputs = _tensors(args, kwargs)
        if inputs:
            return all(self.c.is_host(t) for t in inputs)
        device = kwargs.get("device")  # a factory op inside device code
        return not self.c.simulate and (device is None or torch.device(device).type == "cpu")

    def _host_op(self, func, result) -> None:
        if not _is_metadata(func):
            self.c.host_ops += 1
        self.c._mark(result)

    def _count(self, func, args, kwargs, name: str, result) -> None:
        c = self.c
        op = f"aten.{name}"
        if name in HOST_OUTPUT:
            c._mark(result)
            return
        if name == "_local_scalar_dense":
            c._sync(op, "item")
        elif name in DATA_DEPENDENT:
            c._sync(op, "data_dependent_shape")
        elif name in MASK_INDEXING and _has_mask(args[1]):
            c._sync(f"{op}[bool mask]", "bool_index")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            c._sync(op, "repeat_interleave")
        if not _is_metadata(func):
            c._kernel(op)

    def _copy(self, func, args, kwargs, name: str):
        """copy_ / _to_copy: a host op, a sync (device to host), an upload or a kernel."""
        c = self.c
        result = func(*args, **kwargs)
        if name == "copy_":
            dst_host, src_host = c.is_host(args[0]), c.is_host(args[1])
        else:
            src_host = c.is_host(args[0])
            dst_host = src_host if c.simulate else result.device.type == "cpu"
        if dst_host and src_host:
            c.host_ops += 1
            c._mark(result)
        elif dst_host:
            c._sync(f"aten.{name}", "to_host")
            c._mark(result)
        elif src_host:
            c.uploads += 1
        else:
            c._kernel(f"aten.{name}")
        return result


def _is_metadata(func) -> bool:
    return func.is_view or func.overloadpacket.__name__ in NOT_KERNELS


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or ()))


def _target_device(counter: OpCounter, func, args, kwargs) -> str | None:
    """Where Tensor.to / Tensor.cuda sends its tensor: "host", "device" or None (a dtype
    change only). In simulate mode only a "cpu" string means the host."""
    if func is _T.cuda:
        return "device"
    target = kwargs.get("device")
    if len(args) > 1 and isinstance(args[1], (str, torch.device, torch.Tensor)):
        target = args[1]
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        return "host" if counter.is_host(target) else "device"
    if torch.device(target).type != "cpu":
        return "device"
    return "host" if not counter.simulate or isinstance(target, str) else "device"


def _call_site(with_line: bool) -> str:
    """The innermost frame outside torch and this file: "path:line function"."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    if path.startswith(REPO_ROOT):
        path = os.path.relpath(path, REPO_ROOT)
    else:
        path = path.split("site-packages/")[-1]
    where = f"{path}:{frame.f_lineno}" if with_line else path
    return f"{where} {frame.f_code.co_name}"
