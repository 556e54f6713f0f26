"""ModelConfig validation and JSON round trip; presets against the analytic parameter count."""

from __future__ import annotations

import pytest
import torch

from engine import PRESETS, ConfigError, LoopLM, ModelConfig, get_preset
from model.flops import parameter_count


@pytest.mark.parametrize("changes, message", [
    ({"d_model": 60}, "n_heads * head_dim must equal d_model"),
    ({"n_kv_heads": 3}, "n_kv_heads must divide n_heads"),
    ({"n_kv_heads": 8}, "n_kv_heads must divide n_heads"),
    ({"max_loops": 0}, "max_loops must be an integer >= 1"),
    ({"local_memory_slots": -1}, "local_memory_slots must be an integer >= 0"),
    ({"halt_threshold": 1.0}, "halt_threshold must be in [0, 1)"),
    ({"head_dim": 15, "n_heads": 4, "d_model": 60}, "head_dim must be even"),
    ({"eos_token_id": 999}, "eos_token_id must be in [0, vocab_size=264)"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
])
def test_invalid_configs_name_the_problem(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*")):
        ModelConfig(**changes)


def test_config_json_round_trip(tmp_path):
    config = ModelConfig(max_loops=4, global_memory_slots=0)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown config fields \\['bogus'\\]"):
        ModelConfig.from_dict({"bogus": 1})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="allowed: tiny"):
        get_preset("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_analytic(name):
    config = PRESETS[name]
    with torch.device("meta"):
        model = LoopLM(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)


def test_paper_preset_has_the_papers_shapes():
    paper = PRESETS["paper-loop3-mem"]
    assert (paper.n_layers, paper.d_model, paper.n_heads, paper.n_kv_heads, paper.head_dim,
            paper.ffn_hidden, paper.max_loops) == (12, 768, 12, 12, 64, 2048, 3)
    assert (paper.local_memory_slots, paper.global_memory_slots) == (1024, 512)
    assert parameter_count(paper) == 196_104_276  # untied embeddings: 77.3M of it
    baseline = PRESETS["paper-iso-flop-baseline"]
    assert baseline.n_layers == 3 * PRESETS["paper-loop3-mem"].n_layers
    assert baseline.max_loops == 1 and not baseline.has_memory
