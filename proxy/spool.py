"""Kernels' iopub, read off zmq by a process of its own into files the proxy reads back.

A kernel's PUB socket never waits for a subscriber: whatever the proxy has not read yet waits
in the proxy's receive queue (unbounded: a high-water mark would make the kernel drop messages).
A reading thread in the proxy did not keep that queue short: pyzmq lets go of the GIL for every
frame it receives, and while the event loop is busy each frame then waits out the interpreter's
switch interval (5 ms), so in a flood the thread fell seconds behind and libzmq's queue grew by
100 MB and more. The readers here (:mod:`proxy.spool_writer`: a primary and a standby, each
one process for all of the proxy's kernels) have interpreters of their own and do nothing but
move messages from the sockets to files (the standby: to memory); what the relay has not taken
yet waits there, on disk (in the page cache), in neither process's memory.

Each kernel's file (private to its user, named ``<kernel>.<reader pid>.<n>.spool`` in the
spool directory beside the log, made by the proxy and handed over with its descriptor) is
written only by the primary and read only by the proxy. The socket pair between them carries
the proxy's *open*, *close*, *stop* and *read all* ``(epoch, offset)`` (sent when everything
there is committed to the log) and the reader's *emptied* ``(epoch)`` (before it writes anew
into a file it emptied), *more* ``(epoch)``, once it wrote more after that, and *moved* (a
memory file while the disk refuses writes, and back). The reader empties
a file only when all of it is in the log, and starts a new epoch, so the proxy knows to read
from the start again. So what is in the files survives the proxy: when it is killed, its
reader goes on writing, and the next proxy takes each kernel over from it
(:meth:`SpoolReader.leftovers`) and relays what its log lacks. If the primary dies, the
standby is promoted (:meth:`SpoolReader._exited`): it writes what came after the last message
of the dead one's file into a new file, which the relay reads after that one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .spool_writer import (
    CLOSE,
    DONE,
    DROPPED,
    EMPTIED,
    MORE,
    MOVED_TO_MEMORY,
    NOTICE,
    OPEN,
    PROMOTE,
    READ_ALL,
    REQUEST,
    STOP,
    TAKEOVER,
    WAIT,
    decode,
    digest,
    encode,
    receive,
)

log = logging.getLogger("jupyter_replay_proxy.spool")

#: How much of a file the proxy reads at a time.
READ_CHUNK = 1024 * 1024
#: A backlog on disk is logged when it first passes this many bytes (and each doubling).
NOTICE_BYTES = 16 * 1024 * 1024
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class _ReaderProcess:
    """One reader process and the proxy's end of the socket pair to it."""

    def __init__(self, on_packets: Callable[[_ReaderProcess], None]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy.spool_writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # it outlives a proxy killed with its process group
            )  # fmt: skip
        self.control: socket.socket | None = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), on_packets, self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(
        self, kind: int, key: int, epoch: int = 0, offset: int = 0, *, payload: str = "",
        file: int | None = None,
    ) -> None:  # fmt: skip
        """Send a request (blocking, which never lasts: each kernel has at most one packet on
        its way each way, so the socket pair's buffers never fill)."""
        if self.control is None:
            raise ConnectionError("the iopub reader is gone")
        packet = REQUEST.pack(kind, key, epoch, offset) + payload.encode()
        socket.send_fds(self.control, [packet], [] if file is None else [file])

    def notices(self) -> Iterator[tuple[int, int, int, int, int, int | None]]:
        """The notices waiting on the socket, each with the descriptor sent with it; one of
        kind 0 if the process is gone."""
        assert self.control is not None
        while (received := receive(self.control, NOTICE.size)) is not None:
            packet, fds = received
            if not packet:
                yield 0, 0, 0, 0, 0, None
                return
            yield *NOTICE.unpack(packet), (fds[0] if fds else None)

    def gone(self) -> int:
        """It exited (it closed its end as it did): its exit status."""
        self._detach()
        return self.process.wait()

    def _detach(self) -> None:
        if self.control is not None:
            asyncio.get_running_loop().remove_reader(self.control.fileno())

    async def stop(self) -> None:
        """Tell it to stop; kill it after 5 s. The socket closes after its exit (closed with
        notices unread, its end would be reset before it read STOP)."""
        self._detach()
        with contextlib.suppress(OSError):
            self.request(STOP, 0)
        try:
            await asyncio.to_thread(self.process.wait, 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        self.close()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None


class SpoolReader:
    """The proxy's reader processes, shared by its zmq links: the primary, which writes the
    spool files, and its standby (see :mod:`proxy.spool_writer`); started at the first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._primary: _ReaderProcess | None = None
        self._standby: _ReaderProcess | None = None
        self._spools: dict[int, Spool] = {}
        self._keys = itertools.count(1)
        self.dropped = 0  # messages its kernels' readers dropped (see Spool.dropped)
        self.promotions = 0  # times the standby took over from a primary that died

    def spool(
        self,
        kernel_id: str,
        address: str,
        name: str = "iopub",
        identity: bytes = b"",
        replies: tuple[str, str, str] = ("", "", ""),
    ) -> Spool:
        """A kernel's iopub at `address`, to be :meth:`Spool.open`\\ ed. `identity` and the
        kernel's shell, control and stdin addresses (`replies`): where a reader whose proxy
        died catches the replies to it."""
        return Spool(self, kernel_id, address, name, identity, replies)

    @property
    def pid(self) -> int | None:
        return self._primary.pid if self._primary is not None else None

    @property
    def standby_pid(self) -> int | None:
        return self._standby.pid if self._standby is not None else None

    def _primary_process(self) -> _ReaderProcess:
        if self._primary is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._primary = _ReaderProcess(self._on_notices)
        if self._standby is None:
            self._start_standby()
        return self._primary

    def _start_standby(self) -> None:
        self._standby = _ReaderProcess(self._on_notices)
        for key, spool in self._spools.items():
            self._standby.request(OPEN, key, payload="\0".join(spool.opening("")))

    def _on_notices(self, process: _ReaderProcess) -> None:
        for kind, key, epoch, end, start, file in process.notices():
            if kind == 0:
                self._exited(process)
                return
            spool = self._spools.get(key)
            if spool is None:
                if file is not None:
                    os.close(file)
            elif kind == MORE:
                spool.woken(epoch)
            elif kind == EMPTIED:
                spool.emptied(epoch)
            elif file is not None:
                spool.moved(epoch, end, start, file, to_memory=kind == MOVED_TO_MEMORY)

    def _exited(self, process: _ReaderProcess) -> None:
        code = process.gone()
        process.close()
        if process is self._standby:
            log.warning("The iopub reader's standby exited (%s); starting another", code)
            self._start_standby()
            return
        standby, self._primary, self._standby = self._standby, None, None
        if standby is None:  # (both died)
            log.error("The iopub reader exited (%s) with no standby: output may be lost", code)
        else:
            log.error("The iopub reader exited (%s); its standby goes on from there", code)
            self.promotions += 1
            self._primary = standby
            self._start_standby()
        primary = self._primary_process()
        for key, spool in self._spools.items():
            last = spool.last_record()  # (before it goes on)
            file, path = self.new_file(spool.kernel_id)
            spool.go_on(file, path)
            if standby is not None:
                found = digest(last).hex() if last else ""
                primary.request(PROMOTE, key, payload=f"{path}\0{found}", file=file)
            else:
                primary.request(OPEN, key, payload="\0".join(spool.opening(str(path))), file=file)

    def request(
        self, kind: int, key: int, epoch: int = 0, offset: int = 0, *, payload: str = "",
        file: int | None = None,
    ) -> None:  # fmt: skip
        """Send a request to the primary."""
        if self._primary is None:
            raise ConnectionError("the iopub reader is gone")
        self._primary.request(kind, key, epoch, offset, payload=payload, file=file)

    def new_file(self, kernel_id: str) -> tuple[int, Path]:
        """A new spool file of the kernel, for this proxy's reader (started now if need be)."""
        pid = self._primary_process().pid
        path = self.directory / f"{kernel_id}.{pid}.{next(self._keys)}.spool"
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), path

    def follow(self, spool: Spool, file: int, path: Path) -> int:
        """Have the primary write the spool's address into `file`, the standby keep the last
        of it; the spool's key."""
        primary = self._primary_process()
        key = next(self._keys)
        self._spools[key] = spool
        primary.request(OPEN, key, payload="\0".join(spool.opening(str(path))), file=file)
        if self._standby is not None:
            self._standby.request(OPEN, key, payload="\0".join(spool.opening("")))
        return key

    def unfollow(self, key: int) -> None:
        self._spools.pop(key, None)
        for process in (self._primary, self._standby):
            with contextlib.suppress(OSError):  # gone already: nothing to stop
                if process is not None:
                    process.request(CLOSE, key)

    def leftovers(self, kernel_id: str, timeout: float = 5.0) -> list[list[bytes]]:
        """What readers of earlier proxies wrote for the kernel, oldest first, the files
        removed: a reader still running (its proxy was killed) is asked to hand the kernel
        over first. Call it once this proxy's own subscription is live (nothing falls in
        between). Blocking: file I/O, and a wait of at most `timeout` per file."""
        ours = {str(path) for spool in self._spools.values() for path in spool.paths()}
        left = [
            path for path in self.directory.glob(f"{kernel_id}.*.spool*")
            if str(path) not in ours and path.suffix in (".spool", DONE)
        ]  # fmt: skip
        found: list[list[bytes]] = []
        for path in sorted(left, key=lambda p: (p.stat().st_mtime, p.name)):
            if path.suffix == ".spool" and _is_reader(_writer_pid(path)):
                marker = path.with_name(path.name + TAKEOVER)
                marker.touch()
                done = path.with_name(path.name + DONE)
                deadline = time.monotonic() + timeout
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if done.exists():
                    path = done
                with contextlib.suppress(OSError):
                    marker.unlink()
            with contextlib.suppress(OSError):
                messages, _ = decode(path.read_bytes())
                found.extend(messages)
                path.unlink()
        return found

    async def close(self) -> None:
        """Stop the reader processes."""
        processes = [p for p in (self._primary, self._standby) if p is not None]
        self._primary = self._standby = None
        await asyncio.gather(*(process.stop() for process in processes))


def _read_records(file: int, offset: int, end: int | None) -> tuple[list[list[bytes]], int]:
    """The whole messages of `file` from `offset` (up to `end`), a chunk at a time, and how many
    bytes they take; a message larger than a chunk is read whole."""
    size = READ_CHUNK
    while True:
        want = size if end is None else min(size, end - offset)
        data = os.pread(file, want, offset) if want > 0 else b""
        messages, used = decode(data)
        if messages or len(data) < want or want < size:
            return messages, used
        size *= 2


def _writer_pid(path: Path) -> int:
    """The pid of the reader that wrote a spool file, from its name."""
    try:
        return int(path.name.split(".")[1])
    except (IndexError, ValueError):
        return 0


def _is_reader(pid: int) -> bool:
    """Whether a process of ours with this pid is a spool reader (pids are reused)."""
    try:
        return b"proxy.spool_writer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class _Move:
    """Where the reader went on after `end` of the latest file: `file`, from `start`, as
    `epoch`. `path`: a new spool file, after a primary that died."""

    epoch: int
    end: int
    start: int
    file: int
    in_memory: bool = False
    path: Path | None = None


class Spool:
    """One kernel's iopub: :meth:`take` gives what the reader wrote; when it gives nothing,
    :meth:`more` says all taken is in the log and waits for the reader to write more."""

    def __init__(
        self,
        reader: SpoolReader,
        kernel_id: str,
        address: str,
        name: str,
        identity: bytes,
        replies: tuple[str, str, str],
    ) -> None:
        self.reader = reader
        self.kernel_id = kernel_id
        self.address = address
        self.name = name
        self.identity = identity
        self.replies = replies
        self.peak = 0  # the most bytes ever left waiting in the file after a take
        self._notice = NOTICE_BYTES
        self._key = 0
        self._file: int | None = None
        self.path: Path | None = None
        self._retired: list[Path] = []  # a dead primary's files, removed once logged
        self._epoch = self._read = 0
        self._last: list[bytes] = []  # the last message taken
        self._woken: asyncio.Future[None] | None = None
        self._moves: collections.deque[_Move] = collections.deque()
        self.in_memory = False  # the disk refused the kernel's output: it waits in memory
        self.dropped = 0  # messages the reader dropped: disk full, and too much in memory

    def opening(self, path: str) -> list[str]:
        """What the reader is told when it opens this spool (a standby gets no path)."""
        return [self.address, path, self.identity.hex(), *self.replies]

    def paths(self) -> list[Path]:
        """Its spool files: a dead primary's not yet logged, the current one, the next."""
        moved_to = [move.path for move in self._moves if move.path is not None]
        return [*self._retired, *([self.path] if self.path else []), *moved_to]

    def open(self) -> None:
        """Have the reader follow the address into a new file."""
        self._file, self.path = self.reader.new_file(self.kernel_id)
        self._epoch = self._read = 0
        self.in_memory = False
        self._key = self.reader.follow(self, self._file, self.path)

    def take(self) -> list[list[bytes]]:
        """The whole messages past what was taken, a chunk of the file at a time, and on into
        the file the reader moved to when this one is read to its end."""
        assert self._file is not None
        messages = self._read_file()
        while (
            not messages
            and self._moves
            and (self._read >= self._moves[0].end or self._moves[0].path is not None)
        ):  # (after a primary that died, what is not a whole record is the write it died in)
            self._move_on(self._moves.popleft())
            messages = self._read_file()
        if messages:
            self._last = messages[-1]
            behind = os.fstat(self._file).st_size - self._read
            self.peak = max(self.peak, behind)
            if behind >= self._notice:
                log.info("%s: iopub %d MB behind, waiting on disk", self.name, behind >> 20)
                while self._notice <= behind:
                    self._notice *= 2
        if any(frames[0] == DROPPED for frames in messages):
            for frames in messages:
                if frames[0] == DROPPED:
                    self.dropped += int(frames[1])
                    self.reader.dropped += int(frames[1])
                    log.error("%s: %s messages dropped: the disk is full and too much output "
                              "waits in memory", self.name, frames[1].decode())  # fmt: skip
            messages = [frames for frames in messages if frames[0] != DROPPED]
        return messages

    def _move_on(self, move: _Move) -> None:
        """Read on in the file the reader moved to; in a promoted standby's, past what of it
        was taken already from the dead primary's file."""
        assert self._file is not None
        os.close(self._file)
        self._file, self._epoch, self._read = move.file, move.epoch, move.start
        self.in_memory = move.in_memory
        if move.path is not None:
            if self.path is not None:
                self._retired.append(self.path)
            self.path = move.path

    def _read_file(self) -> list[list[bytes]]:
        """The whole messages of the current file past what was taken (up to where the reader
        moved on from it)."""
        assert self._file is not None
        end = self._moves[0].end if self._moves else None
        messages, used = _read_records(self._file, self._read, end)
        self._read += used
        return messages

    def moved(self, epoch: int, end: int, start: int, file: int, *, to_memory: bool) -> None:
        """The reader went on in `file` (from `start`, as `epoch`) after `end` of the current
        one: to memory because the disk refused a write, or back to the disk."""
        self._moves.append(_Move(epoch, end, start, file, in_memory=to_memory))
        if to_memory:
            log.warning("%s: the disk refuses output; relaying it from memory", self.name)
        self._wake()

    def go_on(self, file: int, path: Path) -> None:
        """The primary died: its promoted standby (or a new primary) writes into `file` what
        comes after the end of the latest file."""
        latest = self._moves[-1].file if self._moves else self._file
        assert latest is not None
        size = os.fstat(latest).st_size
        self._moves.append(_Move(0, size, 0, file, path=path))
        self._wake()

    def last_record(self) -> bytes:
        """The last whole record of the files: what the reader wrote last."""
        last = self._last
        assert self._file is not None
        ends = [move.end for move in self._moves] + [None]
        starts = [(self._file, self._read)] + [(move.file, move.start) for move in self._moves]
        for (file, offset), end in zip(starts, ends, strict=True):
            while True:
                messages, used = _read_records(file, offset, end)
                if not messages:
                    break
                last, offset = messages[-1], offset + used
        return encode(last) if last else b""

    def backlog(self) -> int:
        """Bytes written by the reader and not yet taken by the relay."""
        if self._file is None:
            return 0
        return max(0, os.fstat(self._file).st_size - self._read)

    async def more(self, logged: bool = True) -> None:
        """After :meth:`take` gave nothing: wait until the reader wrote more.
        `logged`: all taken is in the log, so the file may be emptied."""
        self._notice = NOTICE_BYTES
        if logged:
            while self._retired:
                with contextlib.suppress(OSError):
                    self._retired.pop().unlink()
        if self._moves:  # the reader moved on since the last take: take on from there
            return
        self._woken = asyncio.get_running_loop().create_future()
        with contextlib.suppress(OSError):  # it died: its notice handler sees the end
            kind = READ_ALL if logged else WAIT
            self.reader.request(kind, self._key, self._epoch, self._read)
        try:
            await self._woken
        finally:
            self._woken = None

    def emptied(self, epoch: int) -> None:
        """The reader emptied the file (all of it was logged): read it from the start."""
        if epoch != self._epoch and not self._moves:
            self._epoch, self._read = epoch, 0

    def woken(self, epoch: int) -> None:
        self.emptied(epoch)
        self._wake()

    def _wake(self) -> None:
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    def _close_files(self) -> None:
        while self._moves:
            os.close(self._moves.popleft().file)
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def _remove_file(self) -> None:
        paths = self.paths()
        self._close_files()
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()

    def close(self, done: bool = True) -> None:
        """The reader stops following this kernel. `done`: all of it is in the log, the file
        goes too; else it stays for the next proxy to relay."""
        self.reader.unfollow(self._key)
        if done:
            self._remove_file()
        else:
            self._close_files()
