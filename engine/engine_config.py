"""`EngineConfig`: how the engine runs a model (device, dtype, KV pool, batching, mode)."""

from __future__ import annotations

import dataclasses

import torch

from engine.errors import ConfigError

MODES = ("adaptive", "max_depth")
LOOP_FORMS = ("auto", "masked", "compacted")
STATIC_DECODE = ("auto", "on", "off")
ATTENTION_BACKENDS = ("gather", "flex", "triton")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Validated engine options; every field has a CLI flag in the server."""

    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_mb
    kv_cache_memory_mb: float | None = None  # None: 256 on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory for weights + KV pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's max_position
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    mode: str = "adaptive"  # or "max_depth": every token runs N loops (for comparison)
    scheduling_policy: str = "fcfs"  # or "priority": lower SamplingParams.priority first
    loop_form: str = "auto"  # form of each (layer, loop step): auto (measured), masked, compacted
    # fixed-shape decode buckets: auto = CUDA graphs on CUDA, off elsewhere; on = buckets on
    # any device (eager where there are no graphs: how the CPU tests exercise them); off
    static_decode: str = "auto"
    # masked loop steps through torch.compile'd chains (fewer kernels; compiles at start-up)
    compile_chains: bool = False
    # decode attention: gather (each row's blocks copied, then SDPA), flex (FlexAttention
    # reading the pool in place; compiled at start-up) or triton (a paged kernel reading
    # each row's blocks in place, halted rows one key; CUDA); prefill chunks gather always
    attention_backend: str = "gather"
    seed: int = 0
    num_threads: int | None = None  # CPU threads of torch (process-wide); None: torch's choice

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_mb is not None and self.kv_cache_memory_mb <= 0:
            raise ConfigError(f"kv_cache_memory_mb must be > 0, got {self.kv_cache_memory_mb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if self.loop_form not in LOOP_FORMS:
            raise ConfigError(f"loop_form must be one of {list(LOOP_FORMS)}, got "
                              f"{self.loop_form!r}")
        if self.static_decode not in STATIC_DECODE:
            raise ConfigError(f"static_decode must be one of {list(STATIC_DECODE)}, got "
                              f"{self.static_decode!r}")
        if not isinstance(self.compile_chains, bool):
            raise ConfigError(f"compile_chains must be true or false, got "
                              f"{self.compile_chains!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got "
                              f"{self.scheduling_policy!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolved_device(self) -> torch.device:
        if self.device is None or self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
        return device

    def resolved_dtype(self, device: torch.device) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device.type == "cuda" else "fp32"
