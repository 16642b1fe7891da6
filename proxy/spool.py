"""A kernel's iopub, read off zmq by a thread and queued in order, past a bound on disk.

A kernel's PUB socket never waits for a subscriber: whatever the proxy has not read yet waits
in the proxy's own receive queue (unbounded: a high-water mark would make the kernel drop
messages). When the kernel prints faster than the event loop relays and logs (a flood on a
busy machine), that queue grew with the lag, in memory. Here a thread does nothing but read
the socket, so the kernel's messages leave libzmq at once; up to `memory_limit` bytes wait in
memory for the event loop, and beyond that in a temporary file, which the event loop reads
back in order. What waits for the relay takes bounded memory however far it falls behind.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import zmq

log = logging.getLogger("jupyter_replay_proxy.spool")

_COUNT = struct.Struct("<I")  # frames of a message, then each frame's length, then the frames

#: How much of the backlog waits in memory before the rest goes to disk.
MEMORY_LIMIT = 4 * 1024 * 1024
#: How much of the disk backlog the event loop reads back at a time.
READ_CHUNK = 4 * 1024 * 1024


def encode(frames: list[bytes]) -> bytes:
    """One message as the spool file holds it."""
    header = _COUNT.pack(len(frames)) + b"".join(_COUNT.pack(len(f)) for f in frames)
    return header + b"".join(frames)


def decode(data: bytes | memoryview) -> tuple[list[list[bytes]], int]:
    """The whole messages at the start of `data`, and how many bytes they took."""
    messages: list[list[bytes]] = []
    view = memoryview(data)
    offset = 0
    while offset + _COUNT.size <= len(view):
        (count,) = _COUNT.unpack_from(view, offset)
        lengths_end = offset + _COUNT.size * (1 + count)
        if lengths_end > len(view):
            break
        lengths = struct.unpack_from(f"<{count}I", view, offset + _COUNT.size)
        end = lengths_end + sum(lengths)
        if end > len(view):
            break
        frames, position = [], lengths_end
        for length in lengths:
            frames.append(bytes(view[position : position + length]))
            position += length
        messages.append(frames)
        offset = end
    return messages, offset


class Spool:
    """First in, first out, between one writing thread and the event loop; bounded in memory.

    While nothing is on disk, messages wait in memory up to `memory_limit` bytes; once that is
    full, every message goes to the file until the event loop has read the file to its end, so
    the order is the order of :meth:`put`.
    """

    def __init__(self, directory: Path | None = None, memory_limit: int = MEMORY_LIMIT) -> None:
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._memory: collections.deque[tuple[list[bytes], int]] = collections.deque()  # size
        self._memory_bytes = 0
        self._directory = directory
        self._file: IO[bytes] | None = None  # made at the first spill; private, unlinked
        self._written = 0  # bytes put in the file
        self._read = 0  # bytes of the file taken
        self._wake: Callable[[], None] | None = None
        self.spilled = 0  # messages that went to disk, ever

    def put(self, messages: list[list[bytes]]) -> int:
        """From the reading thread: how many of `messages` were taken, in order; fewer than
        all only when the disk fails (full): the caller offers the rest again later."""
        taken = 0
        with self._lock:
            for frames in messages:
                size = sum(len(f) for f in frames)
                if self._written == self._read and self._memory_bytes + size <= self.memory_limit:
                    self._memory.append((frames, size))
                    self._memory_bytes += size
                elif not self._spill(encode(frames)):
                    break
                taken += 1
            wake, self._wake = self._wake, None
        if wake is not None:
            wake()
        return taken

    def _spill(self, record: bytes) -> bool:
        """Append one message to the file, whole or not at all."""
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                    buffering=0, prefix="replay-proxy-spool-", dir=self._directory
                )
            if self._written == 0:
                log.info("%s: more than %d MB behind, the rest waits on disk",
                         threading.current_thread().name, self.memory_limit >> 20)  # fmt: skip
            written = self._file.write(record)
            if written != len(record):
                raise OSError(f"wrote {written} of {len(record)} bytes")
        except OSError as error:
            log.error("%s: cannot spool to disk, will retry: %s",
                      threading.current_thread().name, error)  # fmt: skip
            if self._file is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._file.fileno(), self._written)
                    self._file.seek(self._written)
            return False
        self._written += len(record)
        self.spilled += 1
        return True

    def take(self, wake: Callable[[], None], limit: int = 500) -> list[list[bytes]]:
        """From the event loop: up to `limit` messages that wait, in order (a disk chunk may
        give more); if none does, `wake` is called (from the thread) at the next :meth:`put`."""
        with self._lock:
            if self._memory:
                taken = []
                for _ in range(min(limit, len(self._memory))):
                    frames, size = self._memory.popleft()
                    self._memory_bytes -= size
                    taken.append(frames)
                return taken
            if self._file is None or self._written == self._read:
                if self._file is not None and self._written:  # read to its end: start over
                    self._file.seek(0)
                    self._file.truncate()
                    self._written = self._read = 0
                self._wake = wake
                return []
            start, end = self._read, self._written
        size = READ_CHUNK
        while True:  # a message larger than the chunk: read more
            data = os.pread(self._file.fileno(), min(size, end - start), start)
            messages, used = decode(data)
            if messages or size >= end - start:
                break
            size *= 2
        with self._lock:
            self._read += used
        return messages

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class IopubReader:
    """The thread that reads a kernel's iopub SUB socket into a :class:`Spool`.

    The socket is made, used and closed by the thread alone (zmq sockets are not thread-safe).
    """

    def __init__(self, context: zmq.Context, address: str, spool: Spool, name: str) -> None:
        self.spool = spool
        self._address = address
        self._context = context
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, 0)  # before connect: it applies to new pipes only
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.linger = 0
        socket.connect(self._address)
        try:
            while not self._stopping.is_set():
                if not socket.poll(100):
                    continue
                batch: list[list[bytes]] = []
                while len(batch) < 1000:
                    try:
                        batch.append(socket.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                while batch:  # the disk failed: libzmq keeps the rest meanwhile, in order
                    batch = batch[self.spool.put(batch) :]
                    if batch and self._stopping.wait(1.0):
                        return
        except zmq.ZMQError as error:
            if not self._stopping.is_set():
                log.error("iopub reader stopped: %s", error)
        finally:
            socket.close(linger=0)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join()
        self.spool.close()
