"""The iopub spool, as pure properties: no kernel. Whatever the memory bound and however puts
and takes interleave, messages come out once each, in the order they went in."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import spool
from proxy.spool import Spool, decode, encode

frames_strategy = st.lists(st.binary(max_size=300), min_size=1, max_size=7)


@given(st.lists(frames_strategy, max_size=20), st.integers(min_value=0, max_value=50))
def test_decode_gives_back_whole_messages_only(messages: list[list[bytes]], cut: int) -> None:
    data = b"".join(encode(frames) for frames in messages)
    assert decode(data) == (messages, len(data))
    truncated = data[: max(0, len(data) - cut)]
    decoded, used = decode(truncated)
    assert decoded == messages[: len(decoded)]
    assert used == len(b"".join(encode(frames) for frames in decoded))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(frames_strategy, max_size=12), max_size=25),
    st.lists(st.integers(min_value=0, max_value=3), max_size=40),
    st.integers(min_value=0, max_value=2000),
)
def test_order_across_memory_and_disk(
    batches: list[list[list[bytes]]], takes: list[int], memory_limit: int
) -> None:
    queue = Spool(memory_limit=memory_limit)
    taken: list[list[bytes]] = []
    woken: list[int] = []
    pending_takes = iter(takes)
    try:
        for batch in batches:
            queue.put(batch)
            for _ in range(next(pending_takes, 0)):
                taken.extend(queue.take(lambda: woken.append(1), limit=3))
        while True:
            more = queue.take(lambda: woken.append(1))
            if not more:
                break
            taken.extend(more)
        assert taken == [frames for batch in batches for frames in batch]
        queue.put([[b"after"]])  # a take that found nothing is woken by the next put
        assert woken
        assert queue.take(lambda: None) == [[b"after"]]
    finally:
        queue.close()


def test_a_message_larger_than_a_disk_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "READ_CHUNK", 16)
    queue = Spool(memory_limit=0)
    big = [b"h" * 10, b"x" * 100]
    try:
        queue.put([[b"small"], big, [b"tail"]])
        assert queue.spilled == 3
        taken = []
        while more := queue.take(lambda: None):
            taken.extend(more)
        assert taken == [[b"small"], big, [b"tail"]]
    finally:
        queue.close()


def test_a_writing_thread_and_a_taker() -> None:
    """As the iopub thread uses it: puts from another thread, the bound far below the flow."""
    queue = Spool(memory_limit=5_000)
    sent = [[b"%d" % i, b"y" * (i % 200)] for i in range(20_000)]
    more_came = threading.Event()

    def write() -> None:
        for start in range(0, len(sent), 100):
            queue.put(sent[start : start + 100])

    writer = threading.Thread(target=write)
    writer.start()
    taken: list[list[bytes]] = []
    try:
        while len(taken) < len(sent):
            more = queue.take(more_came.set)
            if not more:
                more_came.wait(5)
                more_came.clear()
            taken.extend(more)
        writer.join()
        assert taken == sent
        assert queue.spilled > 0
    finally:
        queue.close()


def test_a_failing_disk_takes_nothing_and_loses_nothing(tmp_path: Path) -> None:
    """Disk full, or no room for the file: the thread keeps the rest and offers it again."""
    directory = tmp_path / "not-yet"
    queue = Spool(directory, memory_limit=10)
    try:
        assert queue.put([[b"fits"], [b"x" * 20], [b"after"]]) == 1
        directory.mkdir()
        assert queue.put([[b"x" * 20], [b"after"]]) == 2
        taken = []
        while more := queue.take(lambda: None):
            taken.extend(more)
        assert taken == [[b"fits"], [b"x" * 20], [b"after"]]
    finally:
        queue.close()
