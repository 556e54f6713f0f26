"""Checkpoint round trip and the named errors of mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import CheckpointError, load_model, save_model
from tests.helpers import make_model


def test_round_trip_gives_identical_logits(tmp_path):
    model = make_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 14))
    for threshold in (None, 0.4):
        torch.testing.assert_close(loaded.reference_forward(ids, threshold).logits,
                                   model.reference_forward(ids, threshold).logits, rtol=0, atol=0)
    assert loaded.config == model.config


def test_dtype_and_device_options(tmp_path):
    save_model(make_model(), tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    out = loaded.reference_forward(torch.randint(0, 256, (1, 5)), halt_threshold=0.2)
    assert torch.isfinite(out.logits).all()


def test_wrong_shape_names_the_tensor(tmp_path):
    save_model(make_model(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["layers.1.qkv.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.1.qkv.weight' .* shape \(3, 3\)"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_model(make_model(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["global_bank.keys"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor 'global_bank.keys'"):
        load_model(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path):
    save_model(make_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["global_memory_slots"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'global_bank.keys' that its config.json does not"):
        load_model(tmp_path)


def test_missing_files_and_bad_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(make_model(), tmp_path)
    with pytest.raises(CheckpointError, match="unknown dtype 'fp8'"):
        load_model(tmp_path, dtype="fp8")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path)
