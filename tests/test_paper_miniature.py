"""The paper miniature's arms, its measurement and its report, on two-step runs."""

from __future__ import annotations

import json

from benchmarks import paper_miniature as mini
from benchmarks import paper_miniature_report as report
from model.flops import sequence_matmul_flops
from training.data import Corpus


def test_arms_share_the_width_and_the_dense_arm_matches_loop3_flops():
    configs = {name: v.config() for name, v in mini.VARIANTS.items()}
    assert {c.d_model for c in configs.values()} == {mini.WIDTH.d_model}
    assert configs["base"].max_loops == 1 and configs["base"].global_memory_slots == 0
    assert configs["mem"].max_loops == 1 and configs["mem"].local_memory_slots > 0
    assert configs["dense_iso"].n_layers == 3 * configs["loop3"].n_layers
    dense, loop3 = (sequence_matmul_flops(configs[n], 1) for n in ("dense_iso", "loop3"))
    assert dense <= loop3 <= 1.005 * dense  # loop3 adds only its halting routers
    assert mini.VARIANTS["loop3_mem_ponder0"].ponder_weight == 0.0
    assert configs["loop3_mem_gate3"].gate_bias_init == 3.0


def two_of_every_cell() -> list:
    by_cell: dict[str, list] = {}
    for example in Corpus(0).held_out("test", 2):
        by_cell.setdefault(mini.cell_key(example), []).append(example)
    return [e for cell in by_cell.values() for e in cell[:2]]


def test_runs_measure_and_report(tmp_path):
    examples = two_of_every_cell()
    records = []
    for seed in (0, 1):
        record = mini.run_one(mini.VARIANTS["loop3_mem"], seed, steps=2, batch_size=4,
                              examples=examples, runs=tmp_path / "runs")
        (tmp_path / f"loop3_mem-s{seed}.json").write_text(json.dumps(record))
        records.append(record)
    served = records[0]["adaptive"]
    assert sum(records[0]["cell_sizes"].values()) == len(examples)
    assert set(served["exact_match"]) == set(records[0]["cell_sizes"])
    assert len(served["loops_per_layer"]) == mini.WIDTH.n_layers
    assert all(1.0 <= x <= 3.0 for x in served["loops_per_layer"])
    assert records[0]["exact"]["loops_per_layer"] == [3.0, 3.0]  # exact: every step runs
    assert served["answer_bits_per_byte"] > 0
    assert set(served["answer_bits_per_byte_by_task"]) == {"add", "sub", "mul", "expr", "fact"}
    assert records[0]["adaptive"] != records[1]["adaptive"]  # seeds differ

    page = tmp_path / "page.md"
    page.write_text("STALE\n<!-- notes: written by hand below this line; training/card.py keeps"
                    " them -->\nmy notes\n")
    assert report.main(["--results", str(tmp_path), "--page", str(page)]) == 0
    text = page.read_text()
    assert "| Loop-3 + Mem | 2 |" in text and " ± " in text
    assert "| variant | add | sub | mul | expr | fact |" in text
    assert text.rstrip().endswith("my notes") and "STALE" not in text
    assert page.with_suffix(".png").stat().st_size > 1000
