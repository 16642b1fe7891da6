"""The iopub spool: its record format as pure properties, and the reader process against a real
zmq PUB socket (an XPUB here, which tells when the reader's subscription has landed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from proxy import spool, spool_writer
from proxy.spool import Spool, SpoolReader
from proxy.spool_writer import (
    DROPPED,
    EMPTIED,
    MORE,
    MOVED_TO_DISK,
    MOVED_TO_MEMORY,
    NOTICE,
    OPEN,
    READ_ALL,
    REQUEST,
    STOP,
    WAIT,
    decode,
    encode,
    serve,
)

frames_strategy = st.lists(st.binary(max_size=300), min_size=1, max_size=7)


@given(st.lists(frames_strategy, max_size=20), st.integers(min_value=0, max_value=50))
def test_decode_gives_back_whole_messages_only(messages: list[list[bytes]], cut: int) -> None:
    data = b"".join(encode(frames) for frames in messages)
    assert decode(data) == (messages, len(data))
    truncated = data[: max(0, len(data) - cut)]
    decoded, used = decode(truncated)
    assert decoded == messages[: len(decoded)]
    assert used == len(b"".join(encode(frames) for frames in decoded))


@pytest.fixture
def publishers() -> Iterator[list[tuple[zmq.Socket, str]]]:
    """Two kernels' iopub, as far as the reader can tell."""
    context = zmq.Context()
    sockets = []
    for _ in range(2):
        xpub = context.socket(zmq.XPUB)
        xpub.setsockopt(zmq.SNDHWM, 0)  # the test publishes faster than anyone reads
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every reader's subscription, also a second
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        sockets.append((xpub, f"tcp://127.0.0.1:{port}"))
    try:
        yield sockets
    finally:
        for xpub, _ in sockets:
            xpub.close(linger=0)
        context.term()


def subscribed(xpub: zmq.Socket, count: int = 1) -> None:
    """Wait for `count` readers' subscriptions (a PUB drops what it sends before that; a
    spool has two readers: the primary and its standby), past the unsubscriptions of readers
    that are gone."""
    while count:
        assert xpub.poll(10_000), "the reader never subscribed"
        if xpub.recv() == b"\x01":
            count -= 1


async def take_all(queue: Spool, count: int) -> list[list[bytes]]:
    taken: list[list[bytes]] = []
    while len(taken) < count:
        more = queue.take()
        if not more:
            await asyncio.wait_for(queue.more(), 10)
        taken.extend(more)
    return taken


def messages(count: int, tag: bytes) -> list[list[bytes]]:
    return [[tag, b"%d" % i, b"y" * (i * 37 % 3000)] for i in range(count)]


async def test_a_flood_arrives_whole_and_in_order(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two kernels at once through one reader; messages larger than a read, too."""
    monkeypatch.setattr(spool, "READ_CHUNK", 4096)
    reader = SpoolReader(tmp_path)
    queues = [reader.spool(f"kernel-{i}", address) for i, (_, address) in enumerate(publishers)]
    try:
        for queue, (xpub, _) in zip(queues, publishers, strict=True):
            queue.open()
            subscribed(xpub, 2)
        sent = [messages(20_000, b"a"), [*messages(5_000, b"b"), [b"big", b"z" * 100_000]]]
        for (xpub, _), kernel_sent in zip(publishers, sent, strict=True):
            for frames in kernel_sent:
                xpub.send_multipart(frames)
        taken = await asyncio.gather(
            *(take_all(q, len(m)) for q, m in zip(queues, sent, strict=True))
        )
        assert taken == sent
        assert queues[0].peak > 0, "everything was read at once: the test proves nothing"
        # Caught up, the reader empties the file and starts over: it never grows for good.
        more = messages(10, b"c")
        waiting = asyncio.ensure_future(take_all(queues[0], len(more)))
        await asyncio.sleep(0.2)
        for frames in more:
            publishers[0][0].send_multipart(frames)
        assert await waiting == more
        assert os.fstat(queues[0]._file).st_size == sum(len(encode(m)) for m in more)
    finally:
        for queue in queues:
            queue.close()
        await reader.close()
    assert list(tmp_path.iterdir()) == [], "a spool file is left"


async def test_killing_the_reader_mid_flood_loses_nothing(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    """kill -9 of the reader twice during a flood: each time its standby, which kept the last
    of the output, takes over (what only it has first), a new standby starts, and the proxy
    takes every message once, in order."""
    (xpub, address), _ = publishers
    reader = SpoolReader(tmp_path)
    queue = reader.spool("kernel", address)
    queue.open()
    sent = messages(30_000, b"f")
    killed: list[int] = []

    def flood() -> None:
        for number, frames in enumerate(sent):
            if number in (10_000, 20_000):
                while reader.pid in killed:  # (the proxy's loop swaps them)
                    threading.Event().wait(0.01)
                killed.append(reader.pid)  # type: ignore[arg-type]
                os.kill(killed[-1], signal.SIGKILL)
                subscribed(xpub)  # the new standby, before the next kill
            xpub.send_multipart(frames)

    try:
        subscribed(xpub, 2)
        flooding = asyncio.ensure_future(asyncio.to_thread(flood))
        taken = await asyncio.wait_for(take_all(queue, len(sent)), 60)
        await flooding
        assert len(killed) == 2 and reader.promotions == 2
        assert [int(f[1]) for f in taken] == list(range(len(sent))), "lost, repeated or reordered"
        assert taken == sent
    finally:
        queue.close()
        await reader.close()
    assert list(tmp_path.iterdir()) == [], "a spool file is left"


async def test_a_killed_standby_is_started_again(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    (xpub, address), _ = publishers
    reader = SpoolReader(tmp_path)
    queue = reader.spool("kernel", address)
    queue.open()
    try:
        subscribed(xpub, 2)
        first = reader.standby_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(subscribed, xpub)  # the new one follows the kernel
        assert reader.standby_pid not in (None, first) and reader.promotions == 0
        sent = messages(100, b"g")
        for frames in sent:
            xpub.send_multipart(frames)
        assert await take_all(queue, len(sent)) == sent
    finally:
        queue.close()
        await reader.close()


async def test_the_reader_exits_when_the_proxy_closes(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    (xpub, address), _ = publishers
    reader = SpoolReader(tmp_path)
    reader.spool("kernel", address).open()
    subscribed(xpub, 2)
    processes = [reader._primary, reader._standby]
    await reader.close()
    assert [p.process.returncode for p in processes if p is not None] == [0, 0]


def _notice(control: socket.socket) -> tuple[tuple[int, int, int, int, int], int | None]:
    """The reader's next notice to the proxy, and the descriptor sent with it."""
    assert select.select([control], [], [], 10)[0], "no notice from the reader"
    packet, fds, _, _ = socket.recv_fds(control, NOTICE.size, 1)
    return NOTICE.unpack(packet), (fds[0] if fds else None)


def _moved(control: socket.socket, kind: int) -> tuple[tuple[int, int, int, int, int], int]:
    """Past MORE notices, the reader's move to memory or back to disk."""
    while True:
        notice, file = _notice(control)
        if notice[0] != MORE:
            assert notice[0] == kind and file is not None
            return notice, file


@contextlib.contextmanager
def reader_on_a_full_disk(address: str) -> Iterator[tuple[socket.socket, int]]:
    """A reader (on a thread) following `address` into /dev/full, which stands in for a full
    disk; yields the proxy's end of its socket pair and the reader's descriptor of the file."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = threading.Thread(target=serve, args=(theirs,))
    reader.start()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        opening = REQUEST.pack(OPEN, 1, 0, 0) + f"{address}\0/dev/full".encode()
        socket.send_fds(ours, [opening], [full])
        ours.send(REQUEST.pack(WAIT, 1, 0, 0))  # the proxy waits for more
        for _ in range(100):  # until the reader has the descriptor sent with OPEN
            received = [
                int(fd) for fd in os.listdir("/proc/self/fd")
                if int(fd) != full and os.path.realpath(f"/proc/self/fd/{fd}") == "/dev/full"
            ]  # fmt: skip
            if received:
                break
            threading.Event().wait(0.05)
        yield ours, received[0]
    finally:
        ours.send(REQUEST.pack(STOP, 0, 0, 0))  # the proxy stops: the reader exits
        reader.join(10)
        ours.close()
        theirs.close()
        os.close(full)
    assert not reader.is_alive()


def _file_holds(file: int, count: int, start: int = 0) -> list[list[bytes]]:
    """The first `count` messages of `file` from `start`, once the reader wrote them."""
    for _ in range(100):
        held, _ = decode(os.pread(file, os.fstat(file).st_size, start))
        if len(held) >= count:
            return held
        threading.Event().wait(0.1)
    return held


def test_a_promoted_standby_writes_at_once_what_came_after_the_primary(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    """Promoted, the standby writes what it kept after the dead primary's last message at once,
    without first reading its socket to the end: in a flood that end never comes, and a
    standby killed meanwhile took what only it had with it."""
    (xpub, address), _ = publishers
    context = zmq.Context()
    standby = spool_writer._Stream(context, [address, ""], None)
    try:
        subscribed(xpub)
        sent = messages(5000, b"s")
        for frames in sent:
            xpub.send_multipart(frames)
        while standby.kept is not None and len(standby.kept) < spool_writer.BATCH:
            standby.pump()  # it keeps a batch; the rest still waits in its socket
        path = tmp_path / "promoted.spool"
        file = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        standby.promote(str(path), file, spool_writer.digest(encode(sent[500])))
        assert decode(path.read_bytes())[0] == sent[501 : spool_writer.BATCH]
        while len(decode(path.read_bytes())[0]) < len(sent) - 501:
            standby.pump()  # then on, as a primary
        assert decode(path.read_bytes())[0] == sent[501:]
    finally:
        standby.close()
        context.term()


def test_an_emptied_file_is_announced_before_it_is_written_again(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    """Once the proxy has logged all of a file, the reader empties it and says so at once: a
    reader killed after writing anew, before its next MORE, would otherwise leave the proxy
    reading new records at the old offset."""
    (xpub, address), _ = publishers
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = threading.Thread(target=serve, args=(theirs,))
    reader.start()
    file = os.open(tmp_path / "kernel.spool", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        opening = REQUEST.pack(OPEN, 1, 0, 0) + f"{address}\0{tmp_path}/kernel.spool".encode()
        socket.send_fds(ours, [opening], [file])
        ours.send(REQUEST.pack(WAIT, 1, 0, 0))
        subscribed(xpub)
        first = messages(10, b"a")
        for frames in first:
            xpub.send_multipart(frames)
        assert _notice(ours)[0][:3] == (MORE, 1, 0)
        written = sum(len(encode(frames)) for frames in _file_holds(file, len(first)))
        ours.send(REQUEST.pack(READ_ALL, 1, 0, written))
        assert _notice(ours)[0][:3] == (EMPTIED, 1, 1)
        xpub.send_multipart([b"b", b"0"])
        assert _notice(ours)[0][:3] == (MORE, 1, 1)
        assert _file_holds(file, 1) == [[b"b", b"0"]]
    finally:
        ours.send(REQUEST.pack(STOP, 0, 0, 0))
        reader.join(10)
        ours.close()
        theirs.close()
        os.close(file)
    assert not reader.is_alive()


def test_a_full_disk_moves_the_output_to_memory_and_back(
    publishers: list[tuple[zmq.Socket, str]],
) -> None:
    """Disk full: the reader goes on in a memory file, handed to the proxy with a notice of
    where the spool file ended; once the disk takes writes again it goes back to the spool
    file, after what that holds. Nothing is lost or reordered on the way."""
    (xpub, address), _ = publishers
    with reader_on_a_full_disk(address) as (control, received):
        subscribed(xpub)
        sent = messages(3000, b"d")
        for frames in sent:
            xpub.send_multipart(frames)
        (_, _, epoch, end, start), memory = _moved(control, MOVED_TO_MEMORY)
        assert (epoch, end, start) == (1, 0, 0)
        assert _file_holds(memory, len(sent)) == sent
        with tempfile.TemporaryFile() as real:
            os.dup2(real.fileno(), received)  # space again
            later, moved = [], None
            while moved is None:  # the reader tries the disk again within DISK_RETRY
                later.append([b"later", b"%d" % len(later)])
                xpub.send_multipart(later[-1])
                if select.select([control], [], [], 0.1)[0]:
                    (kind, _, epoch, end, start), file = _notice(control)
                    moved = (kind, epoch, end, start) if kind != MORE else None
            assert moved == (MOVED_TO_DISK, 2, os.fstat(memory).st_size, 0)
            assert file is not None
            in_memory, _ = decode(os.pread(memory, end, 0))
            on_disk = _file_holds(file, 1)
            assert in_memory + on_disk == sent + later[: len(in_memory) + len(on_disk) - 3000]
            assert len(in_memory) + len(on_disk) == 3000 + len(later)
            os.close(file)
        os.close(memory)


def test_past_the_memory_limit_messages_are_dropped_and_counted(
    publishers: list[tuple[zmq.Socket, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full and `MEMORY_LIMIT` bytes in memory: a batch that does not fit is dropped, and
    a record in its place says how many messages it held, for the proxy to count; what is
    kept stays in order."""
    monkeypatch.setattr(spool_writer, "MEMORY_LIMIT", 200_000)
    (xpub, address), _ = publishers
    with reader_on_a_full_disk(address) as (control, _):
        subscribed(xpub)
        sent = messages(3000, b"d")
        for frames in sent:
            xpub.send_multipart(frames)
        _, memory = _moved(control, MOVED_TO_MEMORY)
        kept = dropped = 0
        for _ in range(100):
            held, _ = decode(os.pread(memory, os.fstat(memory).st_size, 0))
            kept = sum(1 for frames in held if frames[0] != DROPPED)
            dropped = sum(int(frames[1]) for frames in held if frames[0] == DROPPED)
            if kept + dropped == len(sent):
                break
            threading.Event().wait(0.1)
        assert kept + dropped == len(sent) and dropped > 0
        kept_messages = [frames for frames in held if frames[0] != DROPPED]
        numbers = [int(frames[1]) for frames in kept_messages]
        assert numbers == sorted(numbers) and kept_messages == [sent[n] for n in numbers]
        assert os.fstat(memory).st_size <= 200_000 + 1000
        os.close(memory)


async def test_the_reader_of_a_killed_proxy_hands_the_output_to_the_next(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    """kill -9 of the proxy: its reader goes on writing the kernel's output; the next proxy's
    reader subscribes, then takes the kernel over, and the first one's files hold everything
    it wrote until then, also what came after the second subscribed (the overlap)."""
    (xpub, address), _ = publishers
    first = SpoolReader(tmp_path)
    first.spool("kernel", address).open()
    subscribed(xpub, 2)
    before = messages(100, b"before")
    for frames in before:
        xpub.send_multipart(frames)
    primary, standby = first._primary, first._standby
    assert primary is not None and standby is not None
    for reader_process in (primary, standby):
        reader_process._detach()
        reader_process.close()  # the proxy dies without a word
    process = primary.process
    assert await asyncio.to_thread(standby.process.wait, 10) == 0  # it ends with the proxy
    during = messages(100, b"during")
    for frames in during:
        xpub.send_multipart(frames)

    second = SpoolReader(tmp_path)
    successor = second.spool("kernel", address)
    successor.open()
    try:
        await asyncio.to_thread(subscribed, xpub, 2)
        after = messages(50, b"after")
        for frames in after:
            xpub.send_multipart(frames)
        await asyncio.sleep(0.3)  # both readers write it
        left = await asyncio.to_thread(second.leftovers, "kernel")
        assert left == before + during + after
        assert await asyncio.to_thread(process.wait, 10) == 0  # no kernel left to follow
        assert await take_all(successor, len(after)) == after
        assert [p.name for p in tmp_path.iterdir()] == [successor.path.name]  # type: ignore[union-attr]
    finally:
        successor.close()
        await second.close()


def test_a_reader_whose_proxy_died_gives_up_in_time(
    publishers: list[tuple[zmq.Socket, str]], tmp_path: Path
) -> None:
    """Without a successor, it exits after the orphan time, leaving its file for a later one."""
    (xpub, address), _ = publishers
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = tmp_path / "kernel.1.1.spool"
    file = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    reader = threading.Thread(target=serve, args=(theirs, 1.0))
    reader.start()
    try:
        socket.send_fds(ours, [REQUEST.pack(OPEN, 1, 0, 0) + f"{address}\0{path}".encode()], [file])
        subscribed(xpub)
        ours.close()  # died
        sent = messages(10, b"e")
        for frames in sent:
            xpub.send_multipart(frames)
        reader.join(10)
        assert not reader.is_alive()
        assert decode(path.read_bytes())[0] == sent
    finally:
        theirs.close()
        os.close(file)
