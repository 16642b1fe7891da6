"""The iopub reader process: a kernel's PUB socket to the spool file, as fast as it publishes.

Run by :class:`proxy.spool.Spool` as ``python -m proxy.spool_writer ADDRESS FILE_FD CONTROL_FD``
and kept small (no asyncio, nothing of the proxy), as there is one per kernel. It exits when the
proxy closes its end of the socket pair, also when the proxy is killed. The record format and
the two packets of the socket pair are defined here; see :mod:`proxy.spool` for the protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys

import zmq

log = logging.getLogger("jupyter_replay_proxy.spool")

_COUNT = struct.Struct("<I")  # frames of a message, then each frame's length, then the frames
READ_ALL = struct.Struct("<QQ")  # proxy -> reader: epoch, offset
MORE = struct.Struct("<Q")  # reader -> proxy: epoch
#: Messages the reader takes off the socket per write.
BATCH = 1000


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


def read_into(address: str, file: int, control: socket.socket) -> None:
    """The reader's side: socket to file, as fast as the kernel publishes, until the proxy is
    gone. On a disk error the batch is kept and written again each second, and the rest waits
    in libzmq meanwhile."""
    context = zmq.Context()
    iopub = context.socket(zmq.SUB)
    iopub.setsockopt(zmq.RCVHWM, 0)  # before connect: it applies to new pipes only
    iopub.setsockopt(zmq.SUBSCRIBE, b"")
    iopub.linger = 0
    iopub.connect(address)
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    epoch = written = 0
    waiter: tuple[int, int] | None = None  # the proxy read all up to here and waits
    unwritten = b""
    try:
        while True:
            # a batch not written yet (disk error): the rest waits in libzmq meanwhile
            poller.register(iopub, 0 if unwritten else zmq.POLLIN)
            events = dict(poller.poll(1000 if unwritten else None))
            if control.fileno() in events:  # a non-zmq socket is given back as its fd
                packet = control.recv(READ_ALL.size)
                if not packet:
                    return
                waiter = READ_ALL.unpack(packet)
                if waiter == (epoch, written) and written:
                    os.ftruncate(file, 0)
                    epoch, written = epoch + 1, 0
            if not unwritten:
                batch = []
                with contextlib.suppress(zmq.Again):
                    while len(batch) < BATCH:
                        batch.append(encode(iopub.recv_multipart(zmq.NOBLOCK)))
                unwritten = b"".join(batch)
            if unwritten:
                try:
                    count = os.pwrite(file, unwritten, written)
                    if count != len(unwritten):
                        raise OSError(f"wrote {count} of {len(unwritten)} bytes")
                except OSError as error:
                    log.error("cannot write the iopub spool, will retry: %s", error)
                    with contextlib.suppress(OSError):
                        os.ftruncate(file, written)
                else:
                    written += len(unwritten)
                    unwritten = b""
            if waiter is not None and written and waiter != (epoch, written):
                control.send(MORE.pack(epoch))
                waiter = None
    finally:
        iopub.close(linger=0)
        context.term()


def main() -> None:
    logging.basicConfig(format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    address, file, control = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with socket.socket(fileno=control) as pair:
        read_into(address, file, pair)


if __name__ == "__main__":
    main()
