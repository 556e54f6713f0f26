"""`loopserve complete` and `loopserve chat`: stream an answer from a running server.

    loopserve complete "12+30=" --max-tokens 8 --compute
    loopserve chat --system "Answer briefly." --halt-threshold 0.05
    loopserve chat -m "What is the capital of Veltria?" --compute

The answer goes to stdout as it streams; with --compute the request's compute (loops per
layer as a bar, FLOPs, compute saved) goes to stderr after it. Options can also come from
LOOPSERVE_URL and LOOPSERVE_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from clients.client import Client, Stream
from clients.display import format_compute
from clients.errors import LoopserveError
from clients.types import Usage

CHAT_HELP = "empty line or Ctrl-D: quit; /reset: forget the conversation"


def connection_args(parser: argparse.ArgumentParser) -> None:
    """--url, --api-key, --model, --timeout, --max-retries (shared with `loopserve bench`)."""
    parser.add_argument("--url", default=os.environ.get("LOOPSERVE_URL", "http://localhost:8000"),
                        help="server root or /v1 URL (env LOOPSERVE_URL)")
    parser.add_argument("--api-key", default=os.environ.get("LOOPSERVE_API_KEY"),
                        help="bearer key (env LOOPSERVE_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the server's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="retries on 429/503 and connection failures")


def sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeat)")
    parser.add_argument("--halt-threshold", type=float, default=None,
                        help="loopserve: stop looping once the remaining mass is below this")
    parser.add_argument("--max-loops", type=int, default=None,
                        help="loopserve: at most this many loop steps per layer")
    parser.add_argument("--compute", action="store_true",
                        help="show the request's compute: loops per layer, FLOPs, saved")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"loopserve {command}", description=(
        "Stream a completion from a running server." if command == "complete" else
        f"Chat with a running server ({CHAT_HELP})."))
    if command == "complete":
        parser.add_argument("prompt", nargs="?", default=None,
                            help="the prompt (default: read standard input)")
    else:
        parser.add_argument("-m", "--message", default=None,
                            help="send one message, print the answer and exit")
        parser.add_argument("--system", default=None, help="a system message")
    connection_args(parser)
    sampling_args(parser)
    return parser


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "halt_threshold",
             "max_loops")
    return {name: getattr(args, name) for name in names}


def print_stream(stream: Stream, out: TextIO) -> tuple[str, Usage | None]:
    """Write the deltas of choice 0 as they arrive; returns the whole text and the usage."""
    parts = []
    with stream:
        for chunk in stream:
            if chunk.text:
                parts.append(chunk.text)
                out.write(chunk.text)
                out.flush()
    out.write("\n")
    out.flush()  # before the compute goes to stderr
    return "".join(parts), stream.usage


def show_compute(usage: Usage | None, err: TextIO) -> None:
    if usage is None or usage.compute is None:
        print("(the server reported no compute for this request)", file=err)
        return
    print(f"tokens      {usage.prompt_tokens} prompt + {usage.completion_tokens} generated",
          file=err)
    print(format_compute(usage.compute), file=err)


def run_complete(client: Client, args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _, usage = print_stream(client.stream_complete(prompt, **sampling_params(args)), sys.stdout)
    if args.compute:
        show_compute(usage, sys.stderr)


def chat_turn(client: Client, history: list[dict[str, str]], args: argparse.Namespace) -> None:
    stream = client.stream_chat(history, **sampling_params(args))
    answer, usage = print_stream(stream, sys.stdout)
    history.append({"role": "assistant", "content": answer})
    if args.compute:
        show_compute(usage, sys.stderr)


def run_chat(client: Client, args: argparse.Namespace) -> None:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    if args.message is not None:
        history.append({"role": "user", "content": args.message})
        chat_turn(client, history, args)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {client.base_url} ({CHAT_HELP})", file=sys.stderr)
    start = len(history)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        if not line.strip():
            return
        if line.strip() == "/reset":
            del history[start:]
            continue
        history.append({"role": "user", "content": line})
        try:
            chat_turn(client, history, args)
        except LoopserveError as error:  # say so and let the user go on
            history.pop()
            print(f"error: {error}", file=sys.stderr)


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command not in ("complete", "chat"):
        print(f"clients.cli: unknown command {command!r}", file=sys.stderr)
        return 2
    args = build_parser(command).parse_args(rest)
    run = run_complete if command == "complete" else run_chat
    try:
        with Client(args.url, api_key=args.api_key, model=args.model, timeout=args.timeout,
                    max_retries=args.max_retries) as client:
            run(client, args)
    except LoopserveError as error:
        print(f"loopserve {command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
