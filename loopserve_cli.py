"""The `loopserve` command: one entry point dispatching to each room's own CLI.

Imports stay lazy so that `loopserve complete` (a pure HTTP client) never loads torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": ("server.cli", "start the OpenAI-compatible HTTP server"),
    "train": ("training.cli", "train a looped model on the synthetic corpus"),
    "eval": ("training.evaluate", "evaluate a checkpoint on the held-out test split"),
    "complete": ("clients.cli", "stream a completion from a running server"),
    "chat": ("clients.cli", "chat with a running server"),
    "bench": ("clients.bench", "load-test an OpenAI-compatible server"),
}


def usage() -> str:
    lines = ["usage: loopserve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"loopserve: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main([command, *rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
