"""The held-out prompts file the bench reads: every problem in both formats, test split only."""

from __future__ import annotations

import json

from training.heldout_prompts import write


def test_heldout_prompts_file(tmp_path):
    path = tmp_path / "test_prompts.jsonl"
    count = write(path, per_cell=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == count > 0
    assert {line["task"] for line in lines} == {"add", "sub", "mul", "expr", "fact"}
    for line in lines:
        assert line["prompt"] and line["answer"] and line["max_tokens"] > len(line["answer"])
        assert line["messages"][0]["role"] == "user"
        assert "<" not in line["messages"][0]["content"]  # no special token text leaks
    arithmetic = [line for line in lines if line["task"] != "fact"]
    assert all(line["prompt"].endswith("=") for line in arithmetic)
