"""Checkpoints: `save_model` / `load_model` with config.json + model.safetensors (+ tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.errors import CheckpointError
from model.looplm import LoopLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "loopserve-tiny"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map 'bf16' / 'float32' / torch.dtype / None to a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def save_model(model: LoopLM, directory: str | Path, tokenizer_dir: str | Path | None = None
               ) -> Path:
    """Write config.json and model.safetensors (contiguous CPU tensors) into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / CONFIG_FILE)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model": "LoopLM"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (out / name).resolve():
                shutil.copy(src, out / name)
    return out


def load_model(directory: str | Path | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoopLM:
    """Load a checkpoint directory (default: the bundled model) into an eval-mode `LoopLM`."""
    path = Path(directory) if directory is not None else BUNDLED_MODEL_DIR
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a loopserve checkpoint: {CONFIG_FILE} is missing")
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a loopserve checkpoint: {WEIGHTS_FILE} is missing")
    config = ModelConfig.load(path / CONFIG_FILE)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    model = LoopLM(config)
    _check_tensors(model, tensors, path)
    model.load_state_dict(tensors, strict=True)
    model.to(device=device, dtype=resolve_dtype(dtype))
    return model.eval()


def _check_tensors(model: LoopLM, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Name the first tensor that is missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} lacks tensor '{name}' (shape "
                                  f"{tuple(ref.shape)}) that its config.json requires")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor '{name}' in {path} has shape {tuple(tensors[name].shape)}, but its "
                f"config.json requires {tuple(ref.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint {path} has tensor '{extra[0]}' that its config.json "
                              f"does not define ({len(extra)} unexpected in all)")
