"""A kernel's iopub, read off zmq by a process of its own into a file the proxy reads back.

A kernel's PUB socket never waits for a subscriber: whatever the proxy has not read yet waits
in the proxy's receive queue (unbounded: a high-water mark would make the kernel drop messages).
A reading thread in the proxy did not keep that queue short: pyzmq lets go of the GIL for every
frame it receives, and while the event loop is busy each frame then waits out the interpreter's
switch interval (5 ms), so in a flood the thread fell seconds behind and libzmq's queue grew by
100 MB and more. The reader here is a process with an interpreter of its own that does nothing
but move messages from the socket to a file; what the relay has not taken yet waits there, on
disk (in the page cache), in neither process's memory.

The file (private and unlinked, made by the proxy and handed to the reader) is written only by
the reader and read only by the proxy. A socket pair carries two kinds of packets: the proxy's
*read all* ``(epoch, offset)``, when it has read everything there, and the reader's *more*
``(epoch)``, once it wrote more after that. The reader empties the file only when the proxy has
read all of it, and starts a new epoch, so the proxy knows to read from the start again.

The reader is :mod:`proxy.spool_writer`, one process per kernel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .spool_writer import MORE, READ_ALL, decode

log = logging.getLogger("jupyter_replay_proxy.spool")

#: How much of the file the proxy reads at a time.
READ_CHUNK = 1024 * 1024
#: The backlog on disk is logged when it first passes this many bytes (and each doubling).
NOTICE_BYTES = 16 * 1024 * 1024
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class Spool:
    """The proxy's side: starts the reader for one iopub address, and reads what it wrote.

    :meth:`take` gives what is there; when it gives nothing, :meth:`more` waits for the reader.
    If the reader dies it is started again on a fresh file, once what it wrote has been taken.
    """

    def __init__(self, address: str, directory: Path | None = None, name: str = "iopub") -> None:
        self.address = address
        self.directory = directory
        self.name = name
        self.peak = 0  # the most bytes ever left waiting in the file after a take
        self._notice = NOTICE_BYTES
        self._file: int | None = None
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._epoch = 0
        self._read = 0
        self._reader_gone = False

    def start(self) -> None:
        with tempfile.TemporaryFile(prefix="replay-proxy-spool-", dir=self.directory) as file:
            self._file = os.dup(file.fileno())  # private to its user, and unlinked
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "proxy.spool_writer", self.address, str(self._file),
                 str(theirs.fileno())],
                pass_fds=(self._file, theirs.fileno()), stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        ours.setblocking(False)
        self._control = ours
        self._epoch = self._read = 0
        self._reader_gone = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

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

    async def more(self) -> None:
        """After :meth:`take` gave nothing: wait until the reader wrote more."""
        assert self._control is not None
        self._notice = NOTICE_BYTES
        if self._reader_gone:
            self._restart()
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self._control, READ_ALL.pack(self._epoch, self._read))
            packet = await loop.sock_recv(self._control, MORE.size)
        except OSError:
            packet = b""
        if not packet:  # the reader is gone: take what it wrote, then start it again
            self._reader_gone = True
            return
        (epoch,) = MORE.unpack(packet)
        if epoch != self._epoch:  # the reader emptied the file
            self._epoch, self._read = epoch, 0

    def _restart(self) -> None:
        code = self._process.wait() if self._process is not None else None
        log.error("%s: the iopub reader exited (%s); starting it again", self.name, code)
        self._close_files()
        self.start()

    def _close_files(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def close(self) -> None:
        """Stop the reader (it exits when its socket pair closes) and free the file."""
        self._close_files()
        if self._process is not None:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
