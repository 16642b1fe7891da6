"""The iopub reader process: kernels' PUB sockets to spool files, as fast as they publish.

Two per proxy, started by :class:`proxy.spool.SpoolReader` as
``python -m proxy.spool_writer CONTROL_FD`` and kept small (no asyncio, nothing else of the
proxy): the primary writes the files; the standby subscribes too and only keeps the last
``STANDBY_SECONDS`` (at most ``STANDBY_BYTES``) of each kernel's output in memory. When the
primary dies, the standby is promoted: it writes what it kept into a new file, then goes on
as the primary did, so nothing published meanwhile is lost (the proxy skips what the dead
primary's file has already). Either exits when the proxy says STOP, the standby also when the
proxy dies. When the proxy dies instead (its end of the socket
pair closes unannounced: ``kill -9``), it goes on writing the kernels' output for the next
proxy, which takes each kernel over once its own subscription is live (a ``.takeover`` marker
beside the file): the reader writes what it still has, stops following that kernel and renames
the file ``.done``. Without a successor it exits after ``ORPHAN_SECONDS``, leaving the files.
The record format and the packets of the socket pair are defined here; see
:mod:`proxy.spool` for the protocol.
"""

from __future__ import annotations

import array
import collections
import contextlib
import hashlib
import logging
import os
import socket
import struct
import sys
import time

import zmq

log = logging.getLogger("jupyter_replay_proxy.spool")

_COUNT = struct.Struct("<I")  # frames of a message, then each frame's length, then the frames
#: proxy -> reader: kind, stream, epoch, offset; OPEN carries after it (NUL between each) the
#: iopub address, the file's path, the link's identity (hex) and the kernel's shell, control
#: and stdin addresses, and the file's descriptor beside it
REQUEST = struct.Struct("<BQQQ")
#: READ_ALL: all up to (epoch, offset) is in the log, the file may be emptied if that is all;
#: WAIT: read up to there, not logged yet; either way, say MORE once there is more.
#: OPEN without a file: a standby's; PROMOTE (payload: the file's path, NUL, the digest of
#: the last message the dead primary wrote, and a descriptor): write what came after that
#: message into this file, then go on as the primary did.
OPEN, READ_ALL, CLOSE, STOP, WAIT, PROMOTE = 1, 2, 3, 4, 5, 6
#: reader -> proxy: kind, stream, epoch, end, start. MORE (epoch): there is more to read.
#: EMPTIED (epoch): the file was emptied after a READ_ALL, and goes on as `epoch` (sent before
#: anything new is written into it, so a proxy never reads new records at an old offset).
#: MOVED_TO_MEMORY / MOVED_TO_DISK (epoch, end, start), with a descriptor: the file ends at
#: `end`; what follows is in this one (a memory file while the disk refuses writes, the
#: spool file again once it takes them) from `start`, as `epoch`
NOTICE = struct.Struct("<BQQQQ")
MORE, MOVED_TO_MEMORY, MOVED_TO_DISK, EMPTIED = 1, 2, 3, 4
#: Messages taken off one socket per write.
BATCH = 1000
_MAX_REQUEST = 4096
#: How long a reader whose proxy died keeps the kernels' output for a successor.
ORPHAN_SECONDS = 600.0
#: Beside a spool file: the successor asks for it (TAKEOVER); the reader is done with it (DONE).
TAKEOVER, DONE = ".takeover", ".done"
#: First frame of a record that is a reply (shell, control, stdin) an orphaned reader caught
#: for the proxy that died, then the channel's name; iopub records are the frames as they came.
REPLY = b"\0replay-proxy-reply:"
#: A record saying how many messages were dropped (second frame, decimal): the disk refused
#: them and `MEMORY_LIMIT` bytes of the kernel's output already waited in memory.
DROPPED = b"\0replay-proxy-dropped"
#: Bytes of one kernel's output kept in memory at most while the disk refuses writes.
MEMORY_LIMIT = 256 * 1024 * 1024
#: Seconds between two tries of the disk while output goes to memory.
DISK_RETRY = 1.0
#: What the standby keeps of each kernel's output: at most so many bytes, so many seconds.
STANDBY_BYTES = 32 * 1024 * 1024
STANDBY_SECONDS = 30.0
#: How long a promoted standby, once it has read all its socket had, still waits for the dead
#: primary's last message (then it writes all it kept: that message came before it subscribed).
SEEK_SECONDS = 0.5


def digest(record: bytes) -> bytes:
    """What identifies a message among a kernel's (its signature and msg_id are in it)."""
    return hashlib.blake2b(record, digest_size=16).digest()


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
    """One kernel's iopub: its SUB socket, and the file it goes to (a memory file while the
    disk refuses writes)."""

    def __init__(self, context: zmq.Context, opening: list[str], file: int | None) -> None:
        address, self.path, *replies = opening
        self.identity = bytes.fromhex(replies[0]) if replies else b""
        self.reply_addresses = [a for a in replies[1:] if a]  # shell, control, stdin
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # before connect: it applies to new pipes only
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.linger = 0
        self.socket.connect(address)
        self.disk = self.file = file if file is not None else -1
        #: a standby's: what it received lately, and when, oldest first (None: it writes a file)
        self.kept: collections.deque[tuple[float, bytes]] | None = (
            collections.deque() if file is None else None
        )
        self.kept_bytes = 0
        #: promoted: the digest of the dead primary's last message, to be seen first, and until
        #: when (None until the socket has been read empty once)
        self.seeking: tuple[bytes, float | None] | None = None
        self.memory: int | None = None  # the memory file, while the disk refuses writes
        self.disk_end = 0  # meanwhile: where the spool file's content ends
        self.retry_disk_at = 0.0
        self.dropping = False  # past MEMORY_LIMIT
        self.replies: dict[zmq.Socket, bytes] = {}  # caught for a proxy that died
        self.epoch = self.written = 0
        self.waiter: tuple[int, int] | None = None  # the proxy read all up to here and waits
        self.unwritten = b""  # a batch no file took yet: the rest waits in libzmq
        self.unwritten_count = 0
        #: what the proxy is to be told: (kind, epoch, end, start, descriptor)
        self.notices: list[tuple[int, int, int, int, int | None]] = []

    def read_all(self, epoch: int, offset: int, logged: bool) -> bool:
        """The proxy has read up to (epoch, offset) and waits for more; `logged`: its log
        has all of that, so if that is all, start over (in memory, the spool file too).
        Whether it did (the proxy is then told before anything new is written)."""
        self.waiter = (epoch, offset)
        if logged and self.waiter == (self.epoch, self.written) and self.written:
            os.ftruncate(self.file, 0)
            if self.memory is not None:
                os.ftruncate(self.disk, 0)
                self.disk_end = 0
                self.dropping = False
            self.epoch, self.written = self.epoch + 1, 0
            return True
        return False

    def catch_replies(self, context: zmq.Context) -> None:
        """The proxy died: take its place for the kernel's replies (its sockets' identity; the
        kernel routes to the newest connection of an identity), which the kernel would drop
        with nobody there. A successor's own connection takes that place back."""
        if not self.identity:
            return
        channels = ("shell", "control", "stdin")[: len(self.reply_addresses)]
        for channel, address in zip(channels, self.reply_addresses, strict=True):
            dealer = context.socket(zmq.DEALER)
            dealer.identity = self.identity
            dealer.linger = 0
            dealer.connect(address)
            self.replies[dealer] = REPLY + channel.encode()

    def pump(self) -> None:
        """Write what the sockets have (a batch at a time), or retry a refused batch; a
        standby keeps it instead."""
        if self.kept is not None:
            self._keep()
            return
        if not self.unwritten:
            batch = []
            with contextlib.suppress(zmq.Again):
                while len(batch) < BATCH:
                    batch.append(encode(self.socket.recv_multipart(zmq.NOBLOCK)))
            for dealer, mark in self.replies.items():
                with contextlib.suppress(zmq.Again):
                    while True:
                        batch.append(encode([mark, *dealer.recv_multipart(zmq.NOBLOCK)]))
            self.unwritten, self.unwritten_count = b"".join(batch), len(batch)
        if self.unwritten:
            self._write()

    def _keep(self, limit: int = BATCH) -> None:
        """The standby's pump: up to `limit` messages into memory, what is too old or too much
        out; promoted, once the dead primary's last message is among them, the rest to the
        file."""
        assert self.kept is not None
        now = time.monotonic()
        read_empty = False
        try:
            for _ in range(limit):
                record = encode(self.socket.recv_multipart(zmq.NOBLOCK))
                self.kept.append((now, record))
                self.kept_bytes += len(record)
                if self.seeking is not None and digest(record) == self.seeking[0]:
                    self.kept.clear()  # (the primary wrote all of that)
                    self._file_what_was_kept()
                    return
        except zmq.Again:
            read_empty = True
        if self.seeking is not None:
            last, until = self.seeking
            if until is None and read_empty:  # all published before the primary died is here
                self.seeking = (last, now + SEEK_SECONDS)
            elif until is not None and now > until:
                log.warning("%s: the dead reader's last message never came; writing the last "
                            "%d messages kept", self.path, len(self.kept))  # fmt: skip
                self._file_what_was_kept()
            return
        while self.kept and (
            self.kept_bytes > STANDBY_BYTES or now - self.kept[0][0] > STANDBY_SECONDS
        ):
            self.kept_bytes -= len(self.kept.popleft()[1])

    def promote(self, path: str, file: int, last: bytes) -> None:
        """The primary died: what came after its last message (`last`: the digest of it, or
        empty if it wrote none) goes into `file`, then what comes, as the primary wrote it.
        Not found among what was kept, it is looked for in what comes: the standby may be
        behind (it is not read to the end here: in a flood that end never comes)."""
        assert self.kept is not None
        self.path, self.disk, self.file = path, file, file
        if last:
            for index in range(len(self.kept) - 1, -1, -1):
                if digest(self.kept[index][1]) == last:
                    for _ in range(index + 1):
                        self.kept.popleft()
                    break
            else:
                self.seeking = (last, None)
                return
        self._file_what_was_kept()

    def _file_what_was_kept(self) -> None:
        assert self.kept is not None
        self.unwritten = b"".join(record for _, record in self.kept)
        self.unwritten_count = len(self.kept)
        self.kept, self.kept_bytes, self.seeking = None, 0, None
        self._write()

    def _write(self) -> None:
        """The batch to the spool file; to memory while the disk refuses it (tried again
        every `DISK_RETRY` seconds); dropped, and counted, past `MEMORY_LIMIT` in memory."""
        now = time.monotonic()
        if self.memory is not None and now >= self.retry_disk_at:
            if self._put(self.disk, self.disk_end):
                log.info("%s: the disk takes kernel output again", self.path)
                self.dropping = False
                self._move(MOVED_TO_DISK, self.disk, self.disk_end)
                self.written += len(self.unwritten)
                self.unwritten = b""
                os.close(self.memory)  # (the proxy has its own descriptor of it)
                self.memory = None
                return
            self.retry_disk_at = now + DISK_RETRY
        if self.memory is None:
            if self._put(self.file, self.written):
                self.written += len(self.unwritten)
                self.unwritten = b""
                return
            self.disk_end = self.written
            self.memory = os.memfd_create("replay-proxy-spool", os.MFD_CLOEXEC)
            self._move(MOVED_TO_MEMORY, self.memory, 0)
            self.retry_disk_at = now + DISK_RETRY
        if self.written + len(self.unwritten) > MEMORY_LIMIT:
            if not self.dropping:  # (the proxy logs each drop, with its count)
                log.error("%s: the disk refuses writes and %d MB wait in memory: dropping "
                          "output", self.path, MEMORY_LIMIT >> 20)  # fmt: skip
            self.dropping = True
            self.unwritten = encode([DROPPED, str(self.unwritten_count).encode()])
        if self._put(self.file, self.written):
            self.written += len(self.unwritten)
            self.unwritten = b""

    def _put(self, file: int, offset: int) -> bool:
        """Write the batch at `offset`; False (the file as it was) if it cannot be."""
        try:
            count = os.pwrite(file, self.unwritten, offset)
            if count != len(self.unwritten):
                raise OSError(f"wrote {count} of {len(self.unwritten)} bytes")
        except OSError as error:
            if file == self.file and self.memory is None:
                log.error("%s: cannot write kernel output (%s); keeping it in memory until "
                          "the disk takes it", self.path, error)  # fmt: skip
            with contextlib.suppress(OSError):
                os.ftruncate(file, offset)
            return False
        return True

    def _move(self, kind: int, file: int, start: int) -> None:
        """Go on in `file` from `start`, as a new epoch; the proxy is told where the current
        file ends."""
        self.notices.append((kind, self.epoch + 1, self.written, start, file))
        self.epoch, self.file, self.written = self.epoch + 1, file, start

    def wakes(self) -> bool:
        """Whether the waiting proxy has more to read now (then it no longer waits)."""
        if self.waiter is not None and self.written and self.waiter != (self.epoch, self.written):
            self.waiter = None
            return True
        return False

    def taken_over(self) -> bool:
        """A successor proxy asked for this file (its own subscription is live by then)."""
        return os.path.exists(self.path + TAKEOVER)

    def hand_over(self) -> None:
        """Write what the socket still has, stop following the kernel, and leave the file
        complete for the successor (what waits in memory too, if the disk takes it now)."""
        for _ in range(100):
            before = self.written
            self.pump()
            if not self.unwritten and self.written == before:
                break
        if self.memory is not None:
            self.unwritten = os.pread(self.memory, self.written, 0)
            if not self._put(self.disk, self.disk_end):
                log.error("%s: %d bytes of kernel output lost: the disk is full",
                          self.path, len(self.unwritten))  # fmt: skip
        self.close()
        with contextlib.suppress(OSError):
            os.rename(self.path, self.path + DONE)
            os.unlink(self.path + TAKEOVER)

    def close(self) -> None:
        for dealer in self.replies:
            dealer.close(linger=0)
        self.socket.close(linger=0)
        if self.disk >= 0:
            os.close(self.disk)
        if self.memory is not None:
            os.close(self.memory)


def receive(control: socket.socket, size: int) -> tuple[bytes, list[int]] | None:
    """A packet of at most `size` bytes that waits on the socket pair, and the descriptors sent
    with it; None if none waits; an empty packet if the other end is gone (closed, or reset:
    it died with a packet unread). (socket.recv_fds ignores its flags before Python 3.12.)"""
    fds = array.array("i")
    try:
        packet, ancillary, _, _ = control.recvmsg(
            size, socket.CMSG_LEN(fds.itemsize), socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        return None
    except OSError:
        return b"", []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return packet, list(fds)


def serve(control: socket.socket, orphan_seconds: float = ORPHAN_SECONDS) -> None:
    """Follow the proxy's requests and pump every open stream, until the proxy says STOP;
    if it dies instead, hand each stream that writes a file over to a successor, or give up
    after a while (a standby's streams end with the proxy)."""
    context = zmq.Context()
    streams: dict[int, _Stream] = {}
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    orphaned_at: float | None = None
    try:
        while True:
            if orphaned_at is not None:
                for key in [k for k, stream in streams.items() if stream.taken_over()]:
                    stream = streams.pop(key)
                    for polled in (stream.socket, *stream.replies):
                        poller.register(polled, 0)  # (0: no longer polled)
                    stream.hand_over()
                if not streams or time.monotonic() - orphaned_at > orphan_seconds:
                    return
            for stream in streams.values():
                for polled in (stream.socket, *stream.replies):
                    poller.register(polled, 0 if stream.unwritten else zmq.POLLIN)
            waiting = orphaned_at is not None or any(
                s.unwritten or s.seeking for s in streams.values()
            )
            ready = dict(poller.poll(100 if waiting else None))
            while orphaned_at is None and (received := receive(control, _MAX_REQUEST)) is not None:
                request, fds = received
                if not request and all(s.kept is not None for s in streams.values()):
                    return  # a standby (the primary keeps the dead proxy's output)
                if not request:  # the proxy died without a word: keep its output
                    log.warning("the proxy is gone; keeping %d kernels' output", len(streams))
                    poller.unregister(control)
                    orphaned_at = time.monotonic()
                    for stream in streams.values():
                        stream.catch_replies(context)
                    break
                kind, key, epoch, offset = REQUEST.unpack_from(request)
                if kind == OPEN:
                    opening = request[REQUEST.size :].decode().split("\0")
                    streams[key] = _Stream(context, opening, fds[0] if fds else None)
                elif kind == PROMOTE and key in streams:
                    path, last = request[REQUEST.size :].decode().split("\0")
                    streams[key].promote(path, fds[0], bytes.fromhex(last))
                elif kind in (READ_ALL, WAIT) and key in streams:
                    stream = streams[key]
                    if stream.read_all(epoch, offset, logged=kind == READ_ALL):
                        control.send(NOTICE.pack(EMPTIED, key, stream.epoch, 0, 0))
                elif kind == CLOSE and key in streams:
                    stream = streams.pop(key)
                    poller.register(stream.socket, 0)  # (0: no longer polled)
                    stream.close()
                elif kind == STOP:
                    return
            for key, stream in streams.items():
                if (
                    stream.unwritten or stream.seeking
                    or any(s in ready for s in (stream.socket, *stream.replies))
                ):  # fmt: skip
                    stream.pump()  # (not every idle kernel's)
                notices, stream.notices = stream.notices, []
                if orphaned_at is None:
                    for kind, epoch, end, start, file in notices:
                        notice = NOTICE.pack(kind, key, epoch, end, start)
                        socket.send_fds(control, [notice], [] if file is None else [file])
                    if stream.wakes():
                        control.send(NOTICE.pack(MORE, key, stream.epoch, 0, 0))
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
