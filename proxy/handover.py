"""Which iopub messages a zmq link relays while it takes a kernel over (sans-io).

Three sources reach a new link, oldest first: what an earlier proxy's reader wrote and that
proxy did not log (the *leftovers*), what jupyter-server kept for the link's presence while no
proxy held it, and zmq. Until the link has *joined*, zmq's messages wait; the presence's are
relayed unless they were relayed or logged already. Once the presence brings a message zmq has
too, all before it has been relayed and zmq goes on (the link also gives up waiting after a
while: :meth:`Handover.join`). Each source keeps the kernel's order, but any may be ahead of
zmq: what the log has, or was relayed from the others, before zmq brought it is not relayed
again when it does.

Tested by feeding it messages (``tests/test_handover.py``); :class:`proxy.links.ZmqLink`
drives it and delivers what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from .codecs import Message


class Handover:
    """One link's takeover: each call says what to relay now, in the kernel's order."""

    def __init__(self) -> None:
        self.recovered = False  # the leftovers are relayed: the presence's may follow
        self.joined = False  # zmq goes on by itself
        self._join_due = False
        self._early: list[Message] = []  # zmq's, waiting for the join
        self._early_ids: set[str] = set()
        self._presence_early: list[Message] = []  # the presence's, waiting for the leftovers
        self._logged: set[str] = set()  # what the log has of the kernel lately
        self._relayed: set[str] = set()  # from the leftovers or the presence
        self._ahead: set[str] = set()  # logged or relayed before zmq brought it

    @property
    def waiting(self) -> int:
        """How many of zmq's messages wait for the join."""
        return len(self._early)

    def recover(self, logged: set[str], leftovers: Iterable[Message]) -> list[Message]:
        """The leftovers not in the log (`logged`: the msg_ids it has of this kernel lately),
        then what the presence brought meanwhile."""
        self._logged = logged
        relay = [message for message in leftovers if self._first_time(message)]
        self.recovered = True
        early, self._presence_early = self._presence_early, []
        for message in early:
            relay += self.from_presence(message)
        if self._join_due:
            relay += self.join()
        return relay

    def from_zmq(self, message: Message) -> bool:
        """Whether to relay it now (else it waits for the join, or was relayed before)."""
        if not self.joined:
            self._early.append(message)
            self._early_ids.add(message.msg_id)
            return False
        if self._ahead:
            if message.msg_id in self._ahead:
                self._ahead.discard(message.msg_id)
                return False
            self._ahead.clear()  # zmq is past all that was relayed before it
        return True

    def from_presence(self, message: Message) -> list[Message]:
        if self.joined:
            return []  # (zmq goes on from here: what jupyter-server sends on is all there)
        if not self.recovered:
            self._presence_early.append(message)
            return []
        if message.msg_id in self._early_ids:
            return self.join()  # the presence caught up with zmq: all before it is relayed
        return [message] if self._first_time(message) else []

    def join(self) -> list[Message]:
        """From here zmq goes on: its waiting messages not relayed yet."""
        if self.joined:
            return []
        if not self.recovered:
            self._join_due = True
            return []
        self.joined = True
        relay = [message for message in self._early if self._first_time(message)]
        self._ahead = (self._relayed | self._logged) - self._early_ids
        self._early, self._early_ids = [], set()
        self._logged, self._relayed = set(), set()
        return relay

    def _first_time(self, message: Message) -> bool:
        if message.msg_id in self._relayed or message.msg_id in self._logged:
            return False
        self._relayed.add(message.msg_id)
        return True
