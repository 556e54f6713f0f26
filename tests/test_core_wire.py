"""The engine core's framing: frames survive any split of the byte stream, the event loop's
side never blocks on a full socket yet delivers every byte in order, and both sides see the
other's end."""

from __future__ import annotations

import asyncio
import random
import socket
import threading

import pytest

from engine.core_wire import BlockingWire, FrameReader, LoopWire, frame


def test_frames_survive_any_split_of_the_stream():
    rng = random.Random(0)
    messages = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 300, 70_000])))
                for _ in range(60)]
    stream = b"".join(frame(m) for m in messages)
    reader, seen, at = FrameReader(), [], 0
    while at < len(stream):
        step = rng.choice([1, 3, 8, 9, 1000, 100_000])
        seen += reader.feed(stream[at:at + step])
        at += step
    assert seen == messages
    assert reader.feed(b"") == []


def test_blocking_wire_polls_receives_and_sees_the_end():
    a, b = socket.socketpair()
    left, right = BlockingWire(a), BlockingWire(b)
    assert not right.poll(0.01)
    left.send(b"one")
    left.send(b"")
    assert right.poll(1.0) and right.recv() == b"one" and right.recv() == b""
    left.close()
    assert right.poll(1.0)  # the end is there to see
    with pytest.raises(EOFError):
        right.recv()
    right.close()


def test_the_loop_side_never_blocks_and_keeps_order_through_a_full_socket():
    """Far more than a socket pair holds goes out while nobody reads: `send` returns at
    once each time; a reader that starts later gets every frame whole and in order."""
    a, b = socket.socketpair()
    core = BlockingWire(b)
    payloads = [bytes([i % 256]) * 5000 for i in range(400)]  # 2 MB: the buffer is ~200 KB
    received: list[bytes] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        eof = loop.create_future()
        wire = LoopWire(BlockingWire(a), loop, received.append, lambda: eof.set_result(True))
        for data in payloads:
            wire.send(data)
        backlog = wire.unsent_bytes
        reader = threading.Thread(target=lambda: [core.send(core.recv()) for _ in payloads])
        reader.start()  # echoes each frame back once read
        while len(received) < len(payloads):
            await asyncio.sleep(0.01)
        reader.join(10)
        assert wire.unsent_bytes == 0
        core.close()
        await asyncio.wait_for(eof, 5)
        assert wire.closed
        with pytest.raises(ConnectionResetError):
            wire.send(b"late")
        return backlog

    backlog = asyncio.run(main())
    assert backlog > 0  # the socket did fill: the partial write path ran
    assert received == payloads


def test_frames_read_before_the_loop_attached_are_delivered_first():
    a, b = socket.socketpair()
    sender, blocking = BlockingWire(b), BlockingWire(a)
    sender.send(b"early-1")
    sender.send(b"early-2")
    assert blocking.poll(1.0)  # read into the blocking side's buffer
    received: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        LoopWire(blocking, loop, received.append, lambda: None)
        sender.send(b"late")
        while len(received) < 3:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 5))
    assert received == [b"early-1", b"early-2", b"late"]
    sender.close()


def test_closing_after_the_loop_has_closed_still_closes_the_socket():
    a, b = socket.socketpair()
    loop = asyncio.new_event_loop()
    wire = LoopWire(BlockingWire(a), loop, lambda data: None, lambda: None)
    loop.close()
    wire.close()
    assert wire.closed and a.fileno() == -1
    b.close()
