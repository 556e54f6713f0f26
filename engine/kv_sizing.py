"""How many KV blocks the pool gets: a fixed count, a memory budget, or (on CUDA) a share
of the device's memory, as vLLM's `--gpu-memory-utilization`.

On CUDA the pool takes `utilization * total` minus what the process already holds (the
weights) and a headroom for a step's activations; a budget that leaves no block says which
flag to change.
"""

from __future__ import annotations

import torch

from engine.engine_config import EngineConfig
from engine.errors import ConfigError

ACTIVATION_HEADROOM = 0.05  # of the device's memory, kept for a step's activations


def blocks_from_device_memory(total_bytes: int, used_bytes: int, utilization: float,
                              bytes_per_block: int) -> int:
    """Blocks that fit in `utilization * total` after `used` and the activation headroom."""
    budget = int(total_bytes * (utilization - ACTIVATION_HEADROOM)) - used_bytes
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ConfigError(
            f"the KV pool does not fit: {utilization:.2f} of {total_bytes / 2**30:.1f} GiB minus "
            f"{used_bytes / 2**30:.1f} GiB of weights and {ACTIVATION_HEADROOM:.0%} headroom "
            f"leaves {max(budget, 0) / 2**20:.0f} MiB for {bytes_per_block / 2**20:.1f} MiB "
            f"blocks; raise --gpu-memory-utilization, lower --block-size, or set "
            f"--num-kv-blocks / --kv-cache-memory-mb")
    return blocks


def num_kv_blocks(config: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_mb is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return blocks_from_device_memory(total, total - free, config.gpu_memory_utilization,
                                         bytes_per_block)
    budget_mb = config.kv_cache_memory_mb if config.kv_cache_memory_mb is not None else 256.0
    return max(1, int(budget_mb * 2**20 // bytes_per_block))
