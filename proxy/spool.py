"""Kernels' iopub, read off zmq by a process of its own into files the proxy reads back.

A kernel's PUB socket never waits for a subscriber: whatever the proxy has not read yet waits
in the proxy's receive queue (unbounded: a high-water mark would make the kernel drop messages).
A reading thread in the proxy did not keep that queue short: pyzmq lets go of the GIL for every
frame it receives, and while the event loop is busy each frame then waits out the interpreter's
switch interval (5 ms), so in a flood the thread fell seconds behind and libzmq's queue grew by
100 MB and more. The reader here (:mod:`proxy.spool_writer`, one process for all of the proxy's
kernels) has an interpreter of its own and does nothing but move messages from the sockets to
files; what the relay has not taken yet waits there, on disk (in the page cache), in neither
process's memory.

Each kernel's file (private and unlinked, made by the proxy and handed over with its
descriptor) is written only by the reader and read only by the proxy. The socket pair between
them carries the proxy's *open*, *close* and *read all* ``(epoch, offset)`` (sent when it has
read everything there) and the reader's *more* ``(epoch)``, once it wrote more after that. The
reader empties a file only when the proxy has read all of it, and starts a new epoch, so the
proxy knows to read from the start again. If the reader dies it is started again, and each
kernel goes on in a fresh file once what the old one held has been taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .spool_writer import CLOSE, MORE, OPEN, READ_ALL, REQUEST, decode

log = logging.getLogger("jupyter_replay_proxy.spool")

#: How much of a file the proxy reads at a time.
READ_CHUNK = 1024 * 1024
#: A backlog on disk is logged when it first passes this many bytes (and each doubling).
NOTICE_BYTES = 16 * 1024 * 1024
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class SpoolReader:
    """The proxy's reader process, shared by its zmq links; started at the first use."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._spools: dict[int, Spool] = {}
        self._keys = itertools.count(1)

    def spool(self, address: str, name: str = "iopub") -> Spool:
        """A kernel's iopub at `address`, to be :meth:`Spool.open`\\ ed."""
        return Spool(self, address, name)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "proxy.spool_writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        self._control = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_packets)

    def _on_packets(self) -> None:
        assert self._control is not None
        while True:
            try:
                packet = self._control.recv(MORE.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                packet = b""
            if not packet:
                self._exited()
                return
            key, epoch = MORE.unpack(packet)
            spool = self._spools.get(key)
            if spool is not None:
                spool.woken(epoch)

    def _exited(self) -> None:
        assert self._control is not None and self._process is not None
        asyncio.get_running_loop().remove_reader(self._control.fileno())
        self._control.close()
        self._control = None
        code = self._process.wait()  # (at once: it closed its end as it exited)
        log.error("The iopub reader exited (%s); it is started again as kernels need it", code)
        self._process = None
        for spool in self._spools.values():
            spool.reader_gone()

    def request(
        self,
        kind: int,
        key: int,
        epoch: int = 0,
        offset: int = 0,
        *,
        address: str = "",
        file: int | None = None,
    ) -> None:
        """Send a request (blocking, which never lasts: each kernel has at most one packet on
        its way each way, so the socket pair's buffers never fill)."""
        if self._control is None:
            raise ConnectionError("the iopub reader is gone")
        packet = REQUEST.pack(kind, key, epoch, offset) + address.encode()
        socket.send_fds(self._control, [packet], [] if file is None else [file])

    def follow(self, spool: Spool, file: int) -> int:
        """Have the reader write the spool's address into `file`; the spool's key."""
        if self._control is None:
            self._start()
        key = next(self._keys)
        self._spools[key] = spool
        self.request(OPEN, key, address=spool.address, file=file)
        return key

    def unfollow(self, key: int) -> None:
        self._spools.pop(key, None)
        with contextlib.suppress(OSError):  # gone already: nothing to stop
            self.request(CLOSE, key)

    async def close(self) -> None:
        """Stop the reader: it exits when its socket pair closes (killed after 5 s)."""
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        process, self._process = self._process, None
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


class Spool:
    """One kernel's iopub: :meth:`take` gives what the reader wrote; when it gives nothing,
    :meth:`more` waits for the reader to write more."""

    def __init__(self, reader: SpoolReader, address: str, name: str) -> None:
        self.reader = reader
        self.address = address
        self.name = name
        self.peak = 0  # the most bytes ever left waiting in the file after a take
        self._notice = NOTICE_BYTES
        self._key = 0
        self._file: int | None = None
        self._epoch = self._read = 0
        self._woken: asyncio.Future[None] | None = None
        self._reader_gone = False

    def open(self) -> None:
        """Have the reader follow the address into a new file."""
        with tempfile.TemporaryFile(prefix="replay-proxy-spool-", dir=self.reader.directory) as f:
            self._file = os.dup(f.fileno())  # private to its user, and unlinked
        self._epoch = self._read = 0
        self._reader_gone = False
        self._key = self.reader.follow(self, self._file)

    def take(self) -> list[list[bytes]]:
        """The whole messages past what was taken, a chunk of the file at a time."""
        assert self._file is not None
        size = READ_CHUNK
        while True:  # a message larger than the chunk: read more
            data = os.pread(self._file, size, self._read)
            messages, used = decode(data)
            if messages or len(data) < size:
                break
            size *= 2
        if messages:
            self._read += used
            behind = os.fstat(self._file).st_size - self._read
            self.peak = max(self.peak, behind)
            if behind >= self._notice:
                log.info("%s: iopub %d MB behind, waiting on disk", self.name, behind >> 20)
                while self._notice <= behind:
                    self._notice *= 2
        return messages

    def backlog(self) -> int:
        """Bytes written by the reader and not yet taken by the relay."""
        if self._file is None:
            return 0
        return max(0, os.fstat(self._file).st_size - self._read)

    async def more(self) -> None:
        """After :meth:`take` gave nothing: wait until the reader wrote more (or is gone)."""
        self._notice = NOTICE_BYTES
        if self._reader_gone:  # what it wrote has been taken: go on in a new file
            self._close_file()
            self.open()
        self._woken = asyncio.get_running_loop().create_future()
        with contextlib.suppress(OSError):  # it died just now: its packet handler sees the end
            self.reader.request(READ_ALL, self._key, self._epoch, self._read)
        try:
            await self._woken
        finally:
            self._woken = None

    def woken(self, epoch: int) -> None:
        if epoch != self._epoch:  # the reader emptied the file
            self._epoch, self._read = epoch, 0
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    def reader_gone(self) -> None:
        self._reader_gone = True
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    def _close_file(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def close(self) -> None:
        """The reader stops following this kernel; the file is freed."""
        self.reader.unfollow(self._key)
        self._close_file()
