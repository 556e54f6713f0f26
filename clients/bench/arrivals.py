"""When requests start: a Poisson process or a gamma process with a burstiness factor.

Gaps between starts are gamma-distributed with shape = burstiness and mean 1 / rate, as in
vLLM's `bench serve`: burstiness 1 is a Poisson process, below 1 is burstier (clustered
arrivals), above 1 is more regular. An infinite rate starts every request at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def gaps(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless seconds between successive request starts."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    scale = 0.0 if math.isinf(rate) else 1.0 / (rate * burstiness)
    while True:
        yield 0.0 if scale == 0.0 else rng.gammavariate(burstiness, scale)


def start_times(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless start offsets in seconds from the run's start: 0 first, then non-decreasing."""
    now = 0.0
    for gap in gaps(rate, burstiness, seed):
        yield now
        now += gap
