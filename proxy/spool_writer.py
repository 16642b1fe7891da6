"""The iopub reader process: kernels' PUB sockets to spool files, as fast as they publish.

One per proxy, started by :class:`proxy.spool.SpoolReader` as
``python -m proxy.spool_writer CONTROL_FD`` and kept small (no asyncio, nothing else of the
proxy). It exits when the proxy closes its end of the socket pair, also when the proxy is
killed. The record format and the packets of the socket pair are defined here; see
:mod:`proxy.spool` for the protocol.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct
import sys

import zmq

log = logging.getLogger("jupyter_replay_proxy.spool")

_COUNT = struct.Struct("<I")  # frames of a message, then each frame's length, then the frames
#: proxy -> reader: kind, stream, epoch, offset; OPEN carries the address after it, and the
#: file's descriptor beside it
REQUEST = struct.Struct("<BQQQ")
OPEN, READ_ALL, CLOSE = 1, 2, 3
#: reader -> proxy: stream, epoch
MORE = struct.Struct("<QQ")
#: Messages taken off one socket per write.
BATCH = 1000
_MAX_REQUEST = 4096


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


class _Stream:
    """One kernel's iopub: its SUB socket, and the file it goes to."""

    def __init__(self, context: zmq.Context, address: str, file: int) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # before connect: it applies to new pipes only
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.linger = 0
        self.socket.connect(address)
        self.file = file
        self.epoch = self.written = 0
        self.waiter: tuple[int, int] | None = None  # the proxy read all up to here and waits
        self.unwritten = b""  # a batch the disk refused (full): the rest waits in libzmq

    def read_all(self, epoch: int, offset: int) -> None:
        self.waiter = (epoch, offset)
        if self.waiter == (self.epoch, self.written) and self.written:  # all of it: start over
            os.ftruncate(self.file, 0)
            self.epoch, self.written = self.epoch + 1, 0

    def pump(self) -> None:
        """Write what the socket has (a batch at a time), or retry a refused batch."""
        if not self.unwritten:
            batch = []
            with contextlib.suppress(zmq.Again):
                while len(batch) < BATCH:
                    batch.append(encode(self.socket.recv_multipart(zmq.NOBLOCK)))
            self.unwritten = b"".join(batch)
        if not self.unwritten:
            return
        try:
            count = os.pwrite(self.file, self.unwritten, self.written)
            if count != len(self.unwritten):
                raise OSError(f"wrote {count} of {len(self.unwritten)} bytes")
        except OSError as error:
            log.error("cannot write an iopub spool, will retry: %s", error)
            with contextlib.suppress(OSError):
                os.ftruncate(self.file, self.written)
        else:
            self.written += len(self.unwritten)
            self.unwritten = b""

    def wakes(self) -> bool:
        """Whether the waiting proxy has more to read now (then it no longer waits)."""
        if self.waiter is not None and self.written and self.waiter != (self.epoch, self.written):
            self.waiter = None
            return True
        return False

    def close(self) -> None:
        self.socket.close(linger=0)
        os.close(self.file)


def _next_request(control: socket.socket) -> tuple[bytes, list[int]] | None:
    """A request that waits and the descriptor sent with it; None if none waits.
    (socket.recv_fds ignores its flags before Python 3.12.)"""
    fds = array.array("i")
    try:
        request, ancillary, _, _ = control.recvmsg(
            _MAX_REQUEST, socket.CMSG_LEN(fds.itemsize), socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        return None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return request, list(fds)


def serve(control: socket.socket) -> None:
    """Follow the proxy's requests and pump every open stream, until the proxy is gone."""
    context = zmq.Context()
    streams: dict[int, _Stream] = {}
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    try:
        while True:
            for stream in streams.values():
                poller.register(stream.socket, 0 if stream.unwritten else zmq.POLLIN)
            ready = dict(poller.poll(1000 if any(s.unwritten for s in streams.values()) else None))
            while (received := _next_request(control)) is not None:
                request, fds = received
                if not request:
                    return  # the proxy is gone
                kind, key, epoch, offset = REQUEST.unpack_from(request)
                if kind == OPEN:
                    streams[key] = _Stream(context, request[REQUEST.size :].decode(), fds[0])
                elif kind == READ_ALL and key in streams:
                    streams[key].read_all(epoch, offset)
                elif kind == CLOSE and key in streams:
                    stream = streams.pop(key)
                    poller.register(stream.socket, 0)  # (0: no longer polled)
                    stream.close()
            for key, stream in streams.items():
                if stream.socket in ready or stream.unwritten:  # (not every idle kernel's)
                    stream.pump()
                if stream.wakes():
                    control.send(MORE.pack(key, stream.epoch))
    finally:
        for stream in streams.values():
            stream.close()
        context.term()


def main() -> None:
    logging.basicConfig(format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    with socket.socket(fileno=int(sys.argv[1])) as control:
        serve(control)


if __name__ == "__main__":
    main()
