"""The replay/live switch and stream coalescing, as pure properties: no sockets, no kernel.

A client resumes from some position, falls behind when its queue overflows, reads the log
while it is only partly committed, and rejoins live: whatever the interleaving, it receives
every message after its starting point exactly once, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codecs import KERNEL_CHANNELS, Message, coalesce_streams, message_from_parts
from proxy.relay import Client


def stream(seq: int, parent: str, name: str = "stdout", text: str | None = None) -> Message:
    parts = [
        json.dumps({"msg_id": f"m{seq}", "msg_type": "stream"}).encode(),
        json.dumps({"msg_id": parent, "msg_type": "execute_request"}).encode(),
        b"{}",
        json.dumps({"name": name, "text": f"{seq}\n" if text is None else text}).encode(),
    ]
    message = message_from_parts(
        "iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False
    )
    message.seq = seq
    return message


class MemoryLog:
    """A log whose commits lag behind what was relayed, like the real writer's."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.committed = 0

    async def history(
        self, client: Client, after: int, upto: int | None, limit: int | None, parent: str | None
    ) -> list[Message]:
        await asyncio.sleep(0)
        rows = [
            m for m in self.messages[: self.committed]
            if m.seq > after and (upto is None or m.seq <= upto)
        ]  # fmt: skip
        return rows[:limit] if limit is not None else rows

    async def settle(self) -> None:
        await asyncio.sleep(0)
        self.committed = len(self.messages)

    async def durable(self, seq: int) -> None:
        while self.committed < seq:  # seq n is the log's n-th message
            await asyncio.sleep(0)


async def run_scenario(
    start: int, steps: list[tuple[int, int, int]], max_queued: int, resume: bool
) -> tuple[str, str]:
    log = MemoryLog()
    for seq in range(1, start + 1):
        log.messages.append(stream(seq, f"p{seq // 7}"))
    log.committed = start
    received: list[Message] = []
    client = Client("c", "k", "s", "v1.kernel.websocket.jupyter.org", max_queued=max_queued)
    if resume:  # reconnect: resume after an acknowledged position inside the history
        client.sent_seq, client.behind = start // 2, True
    else:  # fresh: live from the current end of the log
        client.sent_seq = start
    first = client.sent_seq

    async def send(message: Message) -> None:
        received.append(message)
        if len(received) % 3 == 0:
            await asyncio.sleep(0)  # a client that is sometimes slow

    async def confirm(seq: int) -> None:
        await asyncio.sleep(0)

    pump = asyncio.ensure_future(client.pump(send, confirm, log, lambda: len(log.messages)))
    seq = start
    for emit, commit, pause in steps:
        for _ in range(emit):
            seq += 1
            message = stream(seq, f"p{seq // 7}", "stderr" if seq % 5 == 0 else "stdout")
            log.messages.append(message)
            client.deliver(message)
        log.committed = min(len(log.messages), log.committed + commit)
        for _ in range(pause):
            await asyncio.sleep(0)
    log.committed = len(log.messages)
    for _ in range(10_000):
        if client.sent_seq >= seq and not client.behind and not client._queue:
            break
        client._wakeup.set()
        await asyncio.sleep(0)
    client.close()
    pump.cancel()
    got = "".join(m.content()["text"] for m in received)
    want = "".join(f"{s}\n" for s in range(first + 1, seq + 1))
    return got, want


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(0, 40),
    steps=st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 40), st.integers(0, 3)), max_size=25
    ),
    max_queued=st.integers(1, 20),
    resume=st.booleans(),
)
def test_every_message_once_in_order(
    start: int, steps: list[tuple[int, int, int]], max_queued: int, resume: bool
) -> None:
    got, want = asyncio.run(run_scenario(start, steps, max_queued, resume))
    assert got == want


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["stdout", "stderr"]), st.text()),
        max_size=30,
    )
)
def test_coalescing_keeps_what_each_output_shows(runs: list[tuple[str, str, str]]) -> None:
    messages = [stream(i + 1, parent, name, text) for i, (parent, name, text) in enumerate(runs)]
    merged = coalesce_streams(messages)

    def rendered(ms: list[Message]) -> dict[tuple[str | None, str], str]:
        shown: dict[tuple[str | None, str], str] = {}
        for m in ms:
            content = m.content()
            key = (m.parent_msg_id, content["name"])
            shown[key] = shown.get(key, "") + content["text"]
        return shown

    assert rendered(merged) == rendered(messages)
    assert len(merged) <= len(messages)
    assert [m.seq for m in merged] == sorted(m.seq for m in merged)
    if messages:
        assert merged[-1].seq == messages[-1].seq  # the position it stands for
    for a, b in itertools.pairwise(merged):  # no two neighbours left unmerged
        assert (a.parent_msg_id, a.content()["name"]) != (b.parent_msg_id, b.content()["name"])
