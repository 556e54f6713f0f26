"""The byte stream between the API process and its engine core: length-prefixed frames on
one end of a socket pair each.

A frame is an 8-byte big-endian length and that many bytes (a pickled message, see
`core_messages`). The core's side blocks (`BlockingWire`: its loop polls between steps);
the API process's side lives on its event loop (`LoopWire`: `add_reader` / `add_writer`, a
write never blocks, a partial one is kept and finished when the socket drains), so no
thread hands messages over and a frozen core can never stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
from collections.abc import Callable
from multiprocessing.connection import Connection

HEADER = struct.Struct("!Q")
READ_CHUNK = 1 << 18


def frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data


class FrameReader:
    """Cuts a byte stream into frames, however the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by `data`, in order; a partial one waits for more."""
        buffer = self._buffer
        buffer += data
        frames, start = [], 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + HEADER.size:end]))
            start = end
        del buffer[:start]
        return frames


def socket_of(conn: Connection) -> socket.socket:
    """The socket under one end of `multiprocessing.Pipe()` (how a spawned process gets
    it), as a socket of its own; `conn` is closed."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    return sock


class BlockingWire:
    """The blocking side (the engine core, and the API process until its event loop runs)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._reader = FrameReader()
        self._frames: list[bytes] = []
        self._eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(frame(data))

    def poll(self, timeout: float) -> bool:
        """True when a frame (or the end of the stream) is there to `recv`."""
        if self._frames or self._eof:
            return True
        if select.select([self.sock], [], [], timeout)[0]:
            self._read()
        return bool(self._frames) or self._eof

    def recv(self) -> bytes:
        """The next frame; EOFError once the other side is gone and nothing is left."""
        while not self._frames:
            if self._eof:
                raise EOFError("the other end of the engine-core socket is closed")
            self._read()
        return self._frames.pop(0)

    def _read(self) -> None:
        data = self.sock.recv(READ_CHUNK)
        if not data:
            self._eof = True
        self._frames.extend(self._reader.feed(data))

    def detach(self) -> tuple[socket.socket, list[bytes], FrameReader]:
        """The socket, the frames read but not taken, and the partial frame: for a LoopWire."""
        return self.sock, self._frames, self._reader

    def close(self) -> None:
        self.sock.close()


class LoopWire:
    """The event loop's side: `on_frame(data)` for each frame, `on_eof()` once, and
    `send` (from the loop's thread only) queues what the socket does not take at once."""

    def __init__(self, wire: BlockingWire, loop: asyncio.AbstractEventLoop,
                 on_frame: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self.sock, pending, self._reader = wire.detach()
        self.sock.setblocking(False)
        self.loop = loop
        self._on_frame = on_frame
        self._on_eof = on_eof
        self._unsent = bytearray()
        self.closed = False
        loop.add_reader(self.sock.fileno(), self._readable)
        for data in pending:
            loop.call_soon(on_frame, data)

    @property
    def unsent_bytes(self) -> int:
        return len(self._unsent)

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("the engine-core socket is closed")
        if self._unsent:  # the socket is full: keep the order
            self._unsent += frame(data)
            return
        out = frame(data)
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            sent = 0
        if sent < len(out):
            self._unsent += out[sent:]
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._unsent)
        except BlockingIOError:
            return
        except OSError:
            self._lost()
            return
        del self._unsent[:sent]
        if not self._unsent:
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        for message in self._reader.feed(data):
            self._on_frame(message)

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self._on_eof()

    def close(self) -> None:
        """Stop watching the socket and close it (what is unsent is dropped)."""
        if self.closed:
            return
        self.closed = True
        fd = self.sock.fileno()
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self.loop.remove_reader(fd)
            if self._unsent:
                self.loop.remove_writer(fd)
        self.sock.close()
