"""What every benchmark states about where it ran, and the device barrier it times with."""

from __future__ import annotations

import platform

import torch


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU and the torch threads used."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} {platform.processor()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    """Wait for the device (before reading a host clock around device work)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
