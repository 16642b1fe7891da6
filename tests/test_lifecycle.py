"""The kernel lifecycle, decided in one place (proxy.lifecycle, told by the relay core to its
taps): fed messages, no sockets, no kernel."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.codecs import KERNEL_CHANNELS, Message, message_from_parts
from proxy.lifecycle import Executions, kernel_event
from proxy.relay import Client, KernelMemory, KernelRelay, Requester, Tap


def made(
    channel: str, msg_type: str, content: dict[str, Any], parent: str = "", msg_id: str = "",
    metadata: dict[str, Any] | None = None,
) -> Message:  # fmt: skip
    """A message as a kernel (or a frontend, for requests) would send it."""
    msg_id = msg_id or f"{msg_type}-{parent}"
    parts = [
        json.dumps({"msg_id": msg_id, "msg_type": msg_type}).encode(),
        json.dumps({"msg_id": parent, "msg_type": "execute_request"} if parent else {}).encode(),
        json.dumps(metadata or {}).encode(),
        json.dumps(content).encode(),
    ]
    return message_from_parts(channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True)


def reply(parent: str, count: int = 1) -> Message:
    return made("shell", "execute_reply", {"status": "ok", "execution_count": count}, parent)


def status(state: str, parent: str = "") -> Message:
    return made("iopub", "status", {"execution_state": state}, parent)


def output(parent: str, text: str = "x\n") -> Message:
    return made("iopub", "stream", {"name": "stdout", "text": text}, parent)


@given(st.permutations(["reply", "idle", "output", "output"]))
def test_an_execution_finishes_once_at_both_its_reply_and_its_idle(order: list[str]) -> None:
    executions = Executions()
    executions.requested("a")
    finished = []
    for kind in order:
        message = {"reply": reply("a"), "idle": status("idle", "a"), "output": output("a")}[kind]
        result = executions.passed(message)
        if result is not None:
            finished.append((kind, result))
    last = max(order.index("reply"), order.index("idle"))
    assert len(finished) == 1
    (kind, (msg_id, its_reply)) = finished[0]
    assert kind == order[last] and msg_id == "a"
    assert its_reply is not None and its_reply.msg_type == "execute_reply"
    assert "a" not in executions


def test_one_followed_again_after_a_restart_of_the_proxy_ends_at_its_idle() -> None:
    executions = Executions(restored=["a"])
    assert executions.passed(output("a")) is None
    assert executions.passed(status("idle", "a")) == ("a", None)


def test_a_restart_ends_every_unfinished_execution_with_what_came() -> None:
    executions = Executions()
    for msg_id in ("a", "b"):
        executions.requested(msg_id)
    executions.passed(reply("a"))
    ended = executions.end_all()
    assert [(msg_id, r is not None) for msg_id, r in ended] == [("a", True), ("b", False)]
    assert executions.end_all() == []


def test_the_statuses_only_jupyter_server_makes_are_kernel_events() -> None:
    assert kernel_event(status("restarting")) == "restarted"
    assert kernel_event(status("autorestarting")) == "restarted"
    assert kernel_event(status("dead")) == "dead"
    assert kernel_event(status("idle")) is None
    assert kernel_event(reply("a")) is None


class NoKernel:
    """A kernel link with no kernel behind it: what is sent goes nowhere."""

    kind = "none"

    def __init__(self) -> None:
        self.resyncs = 0
        self.in_use: list[bool] = []  # what the relay said, in order

    def send(self, message: Message) -> None:
        pass

    def set_in_use(self, in_use: bool) -> None:
        self.in_use.append(in_use)

    def resync(self) -> None:
        self.resyncs += 1

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Numbered:
    """A ledger that numbers messages and has them committed at once."""

    def __init__(self) -> None:
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def until_durable(self, seq: int) -> None:
        pass


class Recorder(Tap):
    """What a tap is told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def message_relayed(
        self, seq: int, kernel_id: str, direction: str, message: Message,
        client: Requester | None, received_at: float,
    ) -> None:  # fmt: skip
        self.events.append(("relayed", message.msg_type))

    def execution_requested(self, kernel_id: str, request: Message, client: Any) -> None:
        self.events.append(("requested", request.msg_id))

    def execution_finished(self, kernel_id: str, msg_id: str, reply: Message | None) -> None:
        self.events.append(("finished", msg_id, "reply" if reply is not None else "none"))

    def kernel_restarted(self, kernel_id: str) -> None:
        self.events.append(("restarted",))

    def kernel_dead(self, kernel_id: str) -> None:
        self.events.append(("dead",))


async def test_the_relay_tells_the_taps_the_lifecycle_after_the_messages() -> None:
    tap, link = Recorder(), NoKernel()
    relay = KernelRelay("k", link, [tap], Numbered())
    client = Client("c", "k", "s", "v1")
    relay.attach(client)
    relay.from_client(client, made("shell", "execute_request", {"code": "1"}, msg_id="request"))
    relay.from_kernel(status("idle", "request"))
    relay.from_kernel(reply("request"))
    assert tap.events == [
        ("relayed", "execute_request"), ("requested", "request"), ("relayed", "status"),
        ("relayed", "execute_reply"), ("finished", "request", "reply"),
    ]  # fmt: skip
    tap.events.clear()
    relay.from_client(client, made("shell", "execute_request", {"code": "2"}, msg_id="second"))
    relay.from_kernel(status("restarting"))  # (jupyter-server's, for an automatic restart)
    assert tap.events == [
        ("relayed", "execute_request"), ("requested", "second"), ("relayed", "status"),
        ("finished", "second", "none"), ("restarted",),
    ]  # fmt: skip
    assert link.resyncs == 1  # requests wait for the new kernel's iopub
    tap.events.clear()
    relay.died()
    relay.died()
    assert tap.events == [("dead",)]
    relay.close()


async def test_a_kernel_is_in_use_while_a_client_is_attached_or_an_execution_unfinished() -> None:
    """What the zmq link holds its presence on jupyter-server for (its culler's `connections`):
    told on each change only."""
    link = NoKernel()
    relay = KernelRelay("k", link, [], Numbered())
    tab, other = Client("c", "k", "s", "v1"), Client("d", "k", "t", "v1")
    relay.attach(tab)
    relay.attach(other)
    relay.detach(other)
    assert link.in_use == [True]
    relay.from_client(tab, made("shell", "execute_request", {"code": "1"}, msg_id="request"))
    relay.detach(tab)  # the tab closed; its cell runs on
    assert link.in_use == [True]
    relay.from_kernel(reply("request"))
    relay.from_kernel(status("idle", "request"))
    assert link.in_use == [True, False]

    relay.attach(tab)
    relay.from_client(tab, made("shell", "execute_request", {"code": "2"}, msg_id="second"))
    relay.detach(tab)
    relay.from_kernel(status("restarting"))  # a restart ends what was running
    assert link.in_use == [True, False, True, False]
    relay.close()

    link = NoKernel()
    restored = KernelRelay("k", link, [], Numbered(), KernelMemory(executions=["x"]))
    assert link.in_use == [True]  # followed again after a restart of the proxy
    restored.close()
