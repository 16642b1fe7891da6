"""The relay core fed with messages: no sockets, no kernel, a log whose commits the test makes."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.codecs import KERNEL_CHANNELS, Message, message_from_parts
from proxy.relay import Client, Departed, KernelRelay, RequestRefused


class Ledger:
    """A log that commits only when the test says so."""

    def __init__(self) -> None:
        self.last = 0
        self.durable = 0
        self._changed = asyncio.Event()

    def next_seq(self) -> int:
        self.last += 1
        return self.last

    async def until_durable(self, seq: int) -> None:
        while seq > self.durable:
            self._changed.clear()
            await self._changed.wait()

    def commit(self) -> None:
        self.durable = self.last
        self._changed.set()


class Link:
    kind = "test"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def start(self) -> None: ...
    def send(self, message: Message) -> None:
        self.sent.append(message.msg_id)

    def set_in_use(self, in_use: bool) -> None: ...
    def resync(self) -> None: ...
    async def close(self) -> None: ...


def message(msg_id: str, msg_type: str = "execute_request", parent: str = "") -> Message:
    channel = "iopub" if msg_type == "status" else "shell"
    parts = [
        json.dumps({"msg_id": msg_id, "msg_type": msg_type}).encode(),
        json.dumps({"msg_id": parent} if parent else {}).encode(), b"{}", b"{}",
    ]  # fmt: skip
    return message_from_parts(channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True)


def client(name: str, session: str | None = None) -> Client:
    return Client(name, "k", session, "v1.kernel.websocket.jupyter.org")


async def test_a_request_reaches_the_kernel_only_once_the_log_holds_it() -> None:
    ledger, link = Ledger(), Link()
    relay = KernelRelay("k", link, [], ledger)
    alice = client("alice", "s1")
    relay.attach(alice)
    relay.from_client(alice, message("r1"))
    relay.from_client(alice, message("r2"))
    await asyncio.sleep(0.01)
    assert link.sent == []  # not committed yet
    ledger.commit()
    await asyncio.sleep(0)
    relay.from_client(alice, message("r3"))  # came during the first commit: the next one
    await asyncio.sleep(0.01)
    assert link.sent == ["r1", "r2"]
    ledger.commit()
    await asyncio.sleep(0.01)
    assert link.sent == ["r1", "r2", "r3"]
    relay.close()


async def test_another_sessions_pending_msg_id_is_refused() -> None:
    """Replies are routed by msg_id: reusing one still waiting would take its reply."""
    ledger, link = Ledger(), Link()
    relay = KernelRelay("k", link, [], ledger)
    alice, mallory, alice_again = client("a", "s1"), client("m", "s2"), client("a2", "s1")
    for each in (alice, mallory, alice_again):
        relay.attach(each)
    relay.from_client(alice, message("r1"))
    with pytest.raises(RequestRefused, match="another client's"):
        relay.from_client(mallory, message("r1"))
    relay.from_client(alice_again, message("r1"))  # the same session may (a resend)
    relay.from_kernel(message("x", "execute_reply", parent="r1"))
    relay.from_client(mallory, message("r1"))  # answered: free again
    relay.close()


async def test_a_client_that_left_is_kept_only_as_whose_its_replies_are() -> None:
    ledger, link = Ledger(), Link()
    relay = KernelRelay("k", link, [], ledger)
    alice = client("alice", "s1")
    relay.attach(alice)
    relay.from_client(alice, message("r1"))
    relay.detach(alice)
    kept = relay._requesters["r1"]
    assert kept == Departed("alice", "k", "s1") and not alice.pending
    back = client("alice-2", "s1")  # the same session returns: the late reply is its
    relay.attach(back)
    relay.from_kernel(message("x", "execute_reply", parent="r1"))
    assert [m.msg_id for m in back._queue] == ["x"]
    relay.close()
