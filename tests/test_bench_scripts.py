"""The decode benchmarks run on any preset, including the paper's (whose config names a
Hugging Face tokenizer no random model ships): their requests are token ids."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import decode_bench, gpu_summary, paged_gather
from benchmarks.host_overhead import token_ids_tokenizer
from engine import LoopLM, get_preset


def test_decode_bench_prefills_a_model_whose_config_names_a_hf_tokenizer():
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), tokenizer="hf")
    model = LoopLM(config).eval()
    args = decode_bench.parse_args(["--batch", "2", "--context", "6", "--steps", "2"])
    llm = decode_bench.prefilled(model, args, "adaptive")
    assert llm.engine.num_running == 2
    assert token_ids_tokenizer(model).vocab_size == config.vocab_size
    result = decode_bench.time_decode(llm, args)
    assert result["tokens_per_s"] > 0 and len(result["active_per_call"]) == 2


def test_decode_bench_times_the_whole_batch_when_its_prefill_takes_many_steps():
    """batch * context over several prefill steps (the first requests decode meanwhile):
    every timed step still decodes every row, and tokens/s counts the rows decoded."""
    args = decode_bench.parse_args(["--preset", "tiny", "--batch", "8", "--context", "2000",
                                    "--steps", "2"])  # 8 prefill steps of 2,048 tokens
    model = decode_bench.build_model(args)
    llm = decode_bench.prefilled(model, args, "adaptive")
    result = decode_bench.time_decode(llm, args)
    assert result["decoded_rows_per_step"] == [8, 8]
    assert result["tokens_per_s"] == pytest.approx(8 / result["step_seconds"])


def test_decode_bench_prints_adaptive_against_max_depth(capsys):
    out = decode_bench.main(["--batch", "2", "--context", "6", "--steps", "2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["flop_ratio"] == out["flop_ratio"] >= 1.0
    assert printed["compile_chains"] is False
    assert set(printed["adaptive"]) >= {"step_seconds", "flops_per_s", "bytes_per_s"}


def test_paged_gather_times_every_variant_and_checks_them_against_v0(capsys, tmp_path):
    out = paged_gather.main(["--preset", "tiny", "--dtype", "fp32", "--batches", "2",
                             "--contexts", "20", "--rounds", "1", "--flex"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last)
    (row,) = printed["results"]
    # FlexAttention over the pool in place agreed with v0 (else flex_error says why)
    assert row["flex_error"] is None and row["flex_over_now"] > 0
    cfg = get_preset("tiny")  # 2 rows of 2 blocks of 16 positions, k and v, fp32
    per_block = 16 * 2 * cfg.n_kv_heads * cfg.head_dim * 4
    assert row["gathered_bytes"] == out["results"][0]["gathered_bytes"] == 2 * 2 * per_block
    assert set(row["seconds"]) == {"aten_index", "select_fresh", "select_workspace",
                                   "attend_v0", "attend_gqa", "attend_now", "flex_in_place"}
    (tmp_path / "paged-attention.json").write_text("log line\n" + last + "\n")
    (summary,) = gpu_summary.paged_rows(tmp_path)
    assert summary["batch"] == 2 and summary["flex_error"] is None


def test_gpu_summary_reports_skipped_and_failed_steps(tmp_path):
    skipped = '{"skipped": "decode-flex: no time left in the suite\'s budget"}\n'
    (tmp_path / "decode-flex-paper-loop3-mem-256.json").write_text(skipped)
    (tmp_path / "decode-paper-loop3-mem-64.json").write_text("Traceback (most recent call last)\n")
    (tmp_path / "paged-attention.json").write_text(skipped)
    summary = gpu_summary.main([str(tmp_path)])
    flex, failed = summary["decode"]  # sorted by name
    assert flex["skipped"].startswith("decode-flex") and "error" in failed
    assert summary["paged_attention"][0]["skipped"]


def test_engine_throughput_sets_both_engines_side_by_side(capsys):
    """A tiny random model through the adaptive and max-depth engines: the same tokens
    generated, FLOPs and (layer, step) calls counted on both, halting saving some."""
    from benchmarks import engine_throughput

    result = engine_throughput.main(["--preset", "tiny", "--batch-sizes", "1", "3",
                                     "--prompt-len", "4", "--output-len", "3",
                                     "--repeats", "2", "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for row in result["results"]:
        assert row["adaptive_tokens_per_s"] > 0 and row["max_depth_tokens_per_s"] > 0
        assert row["flop_ratio"] > 1.0  # its routers halt some tokens early
        assert 0 < row["adaptive_layer_step_calls"] < row["max_depth_layer_step_calls"]
        assert row["layer_step_ratio"] == pytest.approx(
            row["max_depth_layer_step_calls"] / row["adaptive_layer_step_calls"])
        assert len(row["round_throughput_ratios"]) == 2
