"""The CPU meter of benchmarks/http_throughput: it finds a server's core among its children
and counts the cores each process kept busy."""

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
