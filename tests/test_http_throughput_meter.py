"""The CPU meter of benchmarks/http_throughput (it finds a server's core among its children
and counts the cores each process kept busy) and its per-round paired ratios."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.http_throughput import CpuMeter, child_pids, cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def test_a_busy_child_is_found_and_its_cores_counted():
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               f"{spin!r}])"])
    try:
        deadline = time.monotonic() + 10
        while not child_pids(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        meter = CpuMeter(parent.pid)
        assert set(meter.pids) == {"api", "core"}
        before = meter.read()
        time.sleep(0.6)
        cores = CpuMeter.cores(before, meter.read(), 0.6)
        assert cores["core_cores"] > 0.3 and cores["api_cores"] < 0.3
    finally:
        parent.wait(10)
    assert cpu_seconds(os.getpid()) > 0 and cpu_seconds(parent.pid) is None


def test_one_level_reports_the_steps_each_side_ran(tmp_path):
    """A whole run at one small level: offline and the server ran the same requests, and the
    JSON says how many engine steps each took, their mean time and the IPC cost."""
    from benchmarks.http_throughput import main
    from tests.server_helpers import make_checkpoint

    result = main(["--model", str(make_checkpoint(tmp_path)), "--concurrency", "2",
                   "--requests", "4", "--requests-per-client", "2", "--max-tokens", "4",
                   "--repeats", "1"])
    (level,) = result["levels"]
    best = level["best_round"]
    assert set(best) == {"offline", "http", "stream"}
    for name in ("offline", "http", "stream"):
        steps = best[name]["steps"]
        # 4 requests of 4 tokens, at most 2 at a time: 8 to 16 steps that computed tokens
        assert 8 <= steps["steps"] <= 16 and steps["mean_step_ms"] > 0
        assert 0 < steps["step_share_of_wall"] <= 1
    assert best["http"]["ipc"]["messages_per_token"] > 0
    # every stream event carries at least one token (merged deltas: more than one)
    assert 0 < best["stream"]["stream_events_per_token"] <= 1
    assert best["http"]["cpu"]["core_cores"] > 0
    # /proc counts CPU in 10 ms ticks: so short a run's API share may round down to 0
    assert best["http"]["cpu"]["api_cpu_us_per_token"] >= 0
    for name in ("http", "stream"):  # the window while both clients had work
        steady = best[name]["steady_window"]
        assert steady["tokens_per_s"] > 0 and steady["seconds"] > 0
        assert steady["steps"]["steps"] <= best[name]["steps"]["steps"]
        assert level[f"{name}_steady_over_offline"] > 0


def test_paired_ratios_divide_each_round_by_its_own_offline_round():
    from benchmarks.http_throughput import paired_ratios

    runs = {"offline": [100.0, 200.0, 150.0], "http": [90.0, 210.0, 150.0], "stream": [80.0]}
    found = paired_ratios(runs)
    assert found["http"] == {"median": 1.0, "min": 0.9, "max": 1.05}
    assert found["stream"] == {"median": 0.8, "min": 0.8, "max": 0.8}
    assert paired_ratios({"offline": [1.0], "http": []}) == {}
