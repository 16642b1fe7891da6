"""The iopub spool: its record format as pure properties, and the reader process against a real
zmq PUB socket (an XPUB here, which tells when the reader's subscription has landed)."""

from __future__ import annotations

import asyncio
import os
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

from proxy import spool
from proxy.spool import Spool, SpoolReader
from proxy.spool_writer import OPEN, REQUEST, decode, encode, serve

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
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        sockets.append((xpub, f"tcp://127.0.0.1:{port}"))
    try:
        yield sockets
    finally:
        for xpub, _ in sockets:
            xpub.close(linger=0)
        context.term()


def subscribed(xpub: zmq.Socket) -> None:
    """Wait for a reader's subscription (a PUB drops what it sends before that), past the
    unsubscriptions of readers that are gone."""
    while True:
        assert xpub.poll(10_000), "the reader never subscribed"
        if xpub.recv() == b"\x01":
            return


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
    queues = [reader.spool(address) for _, address in publishers]
    try:
        for queue, (xpub, _) in zip(queues, publishers, strict=True):
            queue.open()
            subscribed(xpub)
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
        assert list(tmp_path.iterdir()) == [], "a file is not unlinked"
    finally:
        for queue in queues:
            queue.close()
        await reader.close()


async def test_a_killed_reader_is_started_again(publishers: list[tuple[zmq.Socket, str]]) -> None:
    (xpub, address), _ = publishers
    reader = SpoolReader()
    queue = reader.spool(address)
    queue.open()
    try:
        subscribed(xpub)
        before = messages(100, b"before")
        for frames in before:
            xpub.send_multipart(frames)
        assert await take_all(queue, len(before)) == before
        first = reader.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(queue.more(), 10)  # sees the reader gone
        assert queue.take() == []
        waiting = asyncio.ensure_future(queue.more())  # starts it again
        await asyncio.to_thread(subscribed, xpub)
        after = messages(100, b"after")
        for frames in after:
            xpub.send_multipart(frames)
        await asyncio.wait_for(waiting, 10)
        assert reader.pid not in (None, first)
        assert await take_all(queue, len(after)) == after
    finally:
        queue.close()
        await reader.close()


async def test_the_reader_exits_when_the_proxy_closes(
    publishers: list[tuple[zmq.Socket, str]],
) -> None:
    (xpub, address), _ = publishers
    reader = SpoolReader()
    reader.spool(address).open()
    subscribed(xpub)
    process = reader._process
    assert process is not None
    await reader.close()
    assert process.returncode == 0


def test_a_failing_disk_loses_nothing(publishers: list[tuple[zmq.Socket, str]]) -> None:
    """Disk full: the reader keeps its batch, the rest waits in libzmq, and once writes succeed
    again everything is in the file, in order. /dev/full stands in for the full disk; the
    reader's descriptor of it is then pointed at a real file."""
    (xpub, address), _ = publishers
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = threading.Thread(target=serve, args=(theirs,))
    reader.start()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        socket.send_fds(ours, [REQUEST.pack(OPEN, 1, 0, 0) + address.encode()], [full])
        subscribed(xpub)
        (received,) = [
            int(fd) for fd in os.listdir("/proc/self/fd")
            if int(fd) != full and os.path.realpath(f"/proc/self/fd/{fd}") == "/dev/full"
        ]  # fmt: skip
        sent = messages(3000, b"d")
        for frames in sent:
            xpub.send_multipart(frames)
        threading.Event().wait(1.5)  # at least one failed write and one retry
        with tempfile.TemporaryFile() as real:
            os.dup2(real.fileno(), received)
            expected = b"".join(encode(frames) for frames in sent)
            for _ in range(100):
                if os.fstat(real.fileno()).st_size >= len(expected):
                    break
                threading.Event().wait(0.1)
            assert os.pread(real.fileno(), len(expected) + 1, 0) == expected
    finally:
        ours.close()  # the proxy is gone: the reader exits
        reader.join(10)
        theirs.close()
        os.close(full)
    assert not reader.is_alive()
