"""Write the bundled model's held-out test problems as JSONL, for `loopserve bench`.

One line per problem: `prompt` (plain completion text), `messages` (the same question in
chat form), `answer`, `max_tokens`, `task`, `difficulty`. The bench reads this file over
HTTP only, so clients/ never imports training/.

    python -m training.heldout_prompts models/loopserve-tiny/test_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.tokenizer import ByteTokenizer
from training.data import Corpus, Example


def problem_lines(examples: list[Example], tokenizer: ByteTokenizer) -> list[dict]:
    """Merge each problem's chat and plain renderings into one JSONL record."""
    records: dict[str, dict] = {}
    for example in examples:
        problem = example.problem
        key = f"{problem.task}:{problem.key}:{problem.phrasing}"
        record = records.setdefault(key, {
            "task": problem.task, "difficulty": problem.difficulty,
            "answer": problem.answer, "max_tokens": len(example.answer_ids) + 2})
        text = tokenizer.decode(example.prompt)  # the bos token is the server's to add
        if example.format == "plain":
            record["prompt"] = text
        else:
            record["messages"] = [{"role": "user",
                                   "content": _chat_question(example, tokenizer)}]
    return list(records.values())


def _chat_question(example: Example, tokenizer: ByteTokenizer) -> str:
    """The user's text inside a chat prompt: the bytes between <|user|> and <eos>."""
    ids = example.prompt
    start = ids.index(tokenizer.role_ids["user"]) + 1
    end = ids.index(tokenizer.eos_token_id, start)
    return tokenizer.decode(ids[start:end])


def write(path: str | Path, per_cell: int = 16, seed: int = 0) -> int:
    corpus = Corpus(seed=seed)
    lines = problem_lines(corpus.held_out("test", per_cell), corpus.tokenizer)
    with Path(path).open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--per-cell", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write(args.path, args.per_cell, args.seed)} problems to {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
