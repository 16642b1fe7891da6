"""A zmq link taking a kernel over, as pure properties: no sockets, no kernel.

Three sources bring the kernel's iopub in its order, each from some point on: what an earlier
proxy's reader wrote (the leftovers), what jupyter-server kept for the presence, and zmq.
Whatever the interleaving, and whenever the link stops waiting, nothing is relayed twice or
out of order, nothing the log has is relayed again, and all that zmq brought is relayed.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codecs import KERNEL_CHANNELS, Message, message_from_parts
from proxy.handover import Handover


def iopub(index: int) -> Message:
    parts = [
        json.dumps({"msg_id": f"k{index}", "msg_type": "stream"}).encode(),
        b"{}",
        b"{}",
        json.dumps({"name": "stdout", "text": f"{index}\n"}).encode(),
    ]
    return message_from_parts("iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False)


def zmq_brings(handover: Handover, index: int) -> list[Message]:
    """What the link relays of it at once."""
    message = iopub(index)
    return [message] if handover.from_zmq(message) else []


def indices(messages: list[Message]) -> list[int]:
    return [int(message.msg_id[1:]) for message in messages]


def test_the_presence_catching_up_with_zmq_joins() -> None:
    handover = Handover()
    assert handover.recover(set(), []) == []
    assert zmq_brings(handover, 3) == [] and handover.waiting == 1
    relayed = [m for i in range(4) for m in handover.from_presence(iopub(i))]
    assert handover.joined
    assert indices(relayed) == [0, 1, 2, 3]  # the buffer, then zmq's first
    assert indices(zmq_brings(handover, 4)) == [4]
    assert handover.from_presence(iopub(4)) == []


def test_the_presence_ahead_of_zmq_when_the_wait_ends() -> None:
    """zmq's reader behind (a loaded machine), the wait ran out: the output the presence
    relayed first is not relayed again when zmq brings it."""
    handover = Handover()
    handover.recover(set(), [])
    relayed = [m for i in (0, 1, 2) for m in handover.from_presence(iopub(i))]
    assert zmq_brings(handover, 0) == []
    relayed += handover.join()
    assert handover.joined
    relayed += [m for i in (1, 2, 3, 4) for m in zmq_brings(handover, i)]
    assert indices(relayed) == [0, 1, 2, 3, 4]


def test_what_the_log_has_is_not_relayed_again() -> None:
    handover = Handover()
    handover.from_presence(iopub(1))  # before the leftovers: waits for them
    relayed = handover.recover({"k0", "k1"}, [iopub(0), iopub(1), iopub(2)])
    assert indices(relayed) == [2]


@st.composite
def takeovers(draw: st.DrawFn) -> tuple[int, int, int, int, int, list[str]]:
    """The log has the kernel's first `logged`; the leftovers run from `left_from` (in what was
    logged: the reader's file is emptied only once all of it is) to `left_to`; the presence
    from `presence_from` (it connects before zmq subscribes, so no later than zmq's first);
    zmq from `zmq_from`. Then the order events happen in."""
    total = 30
    logged = draw(st.integers(0, total))
    left_from = draw(st.integers(0, logged))
    left_to = draw(st.integers(left_from, total))
    zmq_from = draw(st.integers(0, total))
    presence_from = draw(st.integers(0, zmq_from))
    events = draw(st.lists(st.sampled_from(["presence", "zmq", "recover", "wait ends"])))
    return logged, left_from, left_to, presence_from, zmq_from, events


@settings(max_examples=500)
@given(takeovers())
def test_any_takeover_relays_each_message_once_in_order(
    takeover: tuple[int, int, int, int, int, list[str]],
) -> None:
    logged, left_from, left_to, presence_from, zmq_from, events = takeover
    handover = Handover()
    relayed: list[Message] = []
    presence = iter(range(presence_from, 30))
    zmq = iter(range(zmq_from, 30))
    from_zmq: list[int] = []
    presence_before_join: list[int] = []
    recovered = False

    def recover() -> None:
        leftovers = [iopub(i) for i in range(left_from, left_to)]
        relayed.extend(handover.recover({f"k{i}" for i in range(logged)}, leftovers))

    for event in events:
        if event == "presence" and (index := next(presence, None)) is not None:
            if not handover.joined:
                presence_before_join.append(index)
            relayed.extend(handover.from_presence(iopub(index)))
        elif event == "zmq" and (index := next(zmq, None)) is not None:
            from_zmq.append(index)
            relayed.extend(zmq_brings(handover, index))
        elif event == "recover" and not recovered:
            recovered = True
            recover()
        elif event == "wait ends" and handover.waiting:
            relayed.extend(handover.join())
    if not recovered:
        recover()
    if handover.waiting:  # the wait ends at last
        relayed.extend(handover.join())

    got = indices(relayed)
    assert got == sorted(set(got))  # once each, in the kernel's order
    assert all(index >= logged for index in got)
    # (what the presence brought from zmq's first on, zmq brings as well)
    before_zmq = [index for index in presence_before_join if index < zmq_from]
    expected = {*from_zmq, *before_zmq, *range(left_from, left_to)}
    assert {index for index in expected if index >= logged} <= set(got)
