"""OpCounter on small snippets with known answers, so its counts of the engine can be trusted."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.host_overhead import build_llm, count_decode_step, start_decode_batch
from benchmarks.op_counts import OpCounter

GRAD_MODES = [torch.no_grad, torch.inference_mode]


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


def count(fn, grad_mode=torch.inference_mode, **options) -> OpCounter:
    with grad_mode(), OpCounter(**options) as counter:
        fn()
    return counter


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_item_is_one_sync_and_the_reduction_one_kernel(x, grad_mode):
    c = count(lambda: x.sum().item(), grad_mode)
    assert (c.syncs, c.kernels) == (1, 1)
    assert c.by_op == {"aten.sum": 1}
    assert c.syncs_by_kind == {"item": 1}


@pytest.mark.parametrize("read", [bool, int, float])
def test_scalar_reads_are_syncs(x, read):
    c = count(lambda: read(x[0, 0] > 0))
    assert (c.syncs, c.kernels) == (1, 1)


def test_boolean_mask_indexing_and_assignment_are_syncs(x):
    mask = x > 0
    assert count(lambda: x[mask]).syncs_by_kind == {"bool_index": 1}

    def assign():
        y = x.clone()
        y[mask] = 0.0

    c = count(assign)
    assert c.syncs == 1
    assert c.by_op == {"aten.clone": 1, "aten.index_put_": 1}


def test_integer_index_is_a_kernel_not_a_sync(x):
    rows = torch.tensor([0, 2], device=x.device)
    c = count(lambda: x[rows])
    assert (c.syncs, c.kernels) == (0, 1)


def test_data_dependent_shapes_are_syncs(x):
    assert count(lambda: (x > 0).nonzero()).syncs_by_op == {"aten.nonzero": 1}
    assert count(lambda: x.masked_select(x > 0)).syncs == 1
    repeats = torch.tensor([1, 2, 0, 1], device=x.device)
    assert count(lambda: x.repeat_interleave(repeats, dim=0)).syncs_by_kind == {
        "repeat_interleave": 1}
    assert count(lambda: x.repeat_interleave(repeats, dim=0, output_size=4)).syncs == 0


def test_elementwise_is_one_kernel_and_views_are_none(x):
    assert count(lambda: x + 1).kernels == 1
    c = count(lambda: (x.view(24), x.t(), x.unsqueeze(0), x.expand(2, 4, 6), x[0], x[:, 1:],
                       x.permute(1, 0), x.transpose(0, 1), x.detach(), x.reshape(2, 12),
                       x.unflatten(-1, (2, 3)), x.split(3, dim=-1), torch.empty_like(x)))
    assert (c.kernels, c.syncs) == (0, 0)
    assert count(lambda: x.t().reshape(24)).by_op == {"aten.clone": 1}  # a copy


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_composite_ops_count_their_kernels(x, grad_mode):
    weight = torch.randn(5, 6)
    assert count(lambda: F.linear(x, weight), grad_mode).by_op == {"aten.mm": 1}
    assert count(lambda: x * 2 + 1, grad_mode).by_op == {"aten.mul": 1, "aten.add": 1}
    norm = torch.ones(6)
    assert count(lambda: F.rms_norm(x, (6,), norm, 1e-6), grad_mode).kernels == 1
    assert count(lambda: x.bfloat16(), grad_mode).by_op == {"aten._to_copy": 1}
    assert count(lambda: x.float(), grad_mode).kernels == 0  # already fp32: no cast


def test_copy_to_host_is_one_sync_and_work_on_the_copy_is_host_work(x):
    c = count(lambda: x.cpu().argmax(-1).tolist())
    assert (c.syncs, c.kernels, c.host_ops) == (1, 0, 1)
    assert c.syncs_by_op == {"Tensor.cpu": 1}
    assert count(lambda: x.tolist()).syncs == 1
    assert count(lambda: x.to("cpu")).syncs == 1
    assert count(lambda: x.numpy()).syncs == 1


def test_host_copy_is_a_copy_as_on_a_gpu(x):
    with torch.inference_mode(), OpCounter():
        copy = x.cpu()
    assert copy is not x
    before = x[0, 0].item()
    x[0, 0] = before + 1
    assert copy[0, 0].item() == before


def test_tensors_from_python_data(x):
    c = count(lambda: torch.tensor([1, 2, 3]).tolist())  # made on the host: no sync
    assert (c.syncs, c.kernels, c.uploads) == (0, 0, 0)
    c = count(lambda: torch.tensor([1, 2, 3], device=x.device))
    assert (c.syncs, c.kernels, c.uploads) == (0, 0, 1)
    assert count(lambda: torch.tensor([1, 2, 3], device=x.device).tolist()).syncs == 1
    assert count(lambda: torch.zeros(3, device=x.device)).by_op == {"aten.zeros": 1}
    c = count(lambda: torch.zeros(3) + 1)
    assert (c.kernels, c.host_ops) == (0, 2)
    assert count(lambda: torch.arange(3).to(x.device)).uploads == 1


def test_mark_host_declares_earlier_tensors_host(x):
    table = torch.arange(5.0)
    with torch.inference_mode(), OpCounter() as c:
        c.mark_host(table)
        value = float(table[-1])
        table.sum().tolist()
    assert value == 4.0
    assert (c.syncs, c.kernels) == (0, 0)


def test_sync_sites_name_this_file(x):
    c = count(lambda: x.max().item())
    (site,) = c.syncs_by_site
    assert site.startswith("tests/test_op_counts.py:")
    assert c.kernels_by_site == {"tests/test_op_counts.py <lambda>": 1}


def test_real_device_mode_treats_cpu_tensors_as_host(x):
    c = count(lambda: (x.sum().item(), x[x > 0]), simulate=False)
    assert (c.syncs, c.kernels) == (0, 0)
    assert c.host_ops == 3


def test_counting_changes_no_result(x):
    mask = x > 0
    plain = (x[mask].sum(), x.cpu().tolist(), (x @ x.t()).softmax(-1))
    with torch.inference_mode(), OpCounter():
        counted = (x[mask].sum(), x.cpu().tolist(), (x @ x.t()).softmax(-1))
    assert torch.equal(plain[0], counted[0]) and plain[1] == counted[1]
    assert torch.equal(plain[2], counted[2])


def test_nothing_is_counted_outside_the_block(x):
    counter = OpCounter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(counter)
        x.sum().item()
    x.sum().item()
    assert (counter.syncs, counter.kernels) == (1, 1)


def test_count_decode_step_on_the_engine():
    llm = build_llm("tiny", dtype="fp32", batch=4, context=16)
    start_decode_batch(llm, batch=4, prompt_len=3, max_tokens=4, threshold=0.1)
    counts = count_decode_step(llm)
    cfg = llm.engine.model_config
    assert counts["prompt_tokens"] == 0 and counts["decode_tokens"] == 4
    assert 1 <= counts["layer_step_calls"] <= cfg.n_layers * cfg.max_loops
    assert counts["syncs"] >= 1  # the sampled tokens must come back to the host
    assert counts["kernels"] >= cfg.n_layers * 4  # at least qkv, out, gate_up and down
    assert counts["per_layer_step"]["syncs"] == counts["syncs"] / counts["layer_step_calls"]
    assert counts["gpu_host_estimate"]["host_ms_per_step"] == pytest.approx(
        ((counts["kernels"] + counts["uploads"]) * 5 + counts["syncs"] * 15) / 1e3)
