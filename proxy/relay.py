"""The relay core: moves kernel messages between frontends and one link per kernel.

It knows nothing of HTTP, SQLite or zmq. A :class:`KernelRelay` routes what a kernel sends
(iopub to every client; shell, control and stdin replies to the client that sent the parent
request) and emits every message to the taps (the log, and later replay, Y fold, audit) before
delivering it, so anything a client has received is already on its way to the log.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .codecs import Message

log = logging.getLogger("jupyter_replay_proxy.relay")

_background: set[asyncio.Future[object]] = set()


def in_background(awaitable: Awaitable[object]) -> None:
    """Run without waiting for it, keeping a reference so it is not collected midway."""
    task = asyncio.ensure_future(awaitable)
    _background.add(task)
    task.add_done_callback(_background.discard)


TO_KERNEL = "to_kernel"
FROM_KERNEL = "from_kernel"


class Tap:
    """Something that follows relay events. Called on the event loop: must not block."""

    def client_joined(self, client: Client) -> None:
        """A frontend was admitted to a kernel's channels."""

    def client_left(self, client: Client) -> None:
        """A frontend's websocket closed."""

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Client | None,
        received_at: float,
    ) -> None:
        """A message passed, to the kernel from `client` or from the kernel to `client`
        (None for iopub, which goes to every client, and for replies nobody is waiting for)."""


class KernelLink(Protocol):
    """The proxy's one connection to a kernel, shared by all of that kernel's clients."""

    kind: str

    async def start(self) -> None: ...

    def send(self, message: Message) -> None: ...

    def set_clients_attached(self, count: int) -> None: ...

    async def close(self) -> None: ...


class ClientOverflow(Exception):
    """A client stopped reading while its kernel kept talking."""


@dataclass(eq=False)
class Client:
    """One frontend websocket on a kernel's channels, and its outgoing queue."""

    client_id: str
    kernel_id: str
    session_id: str | None
    protocol: str
    username: str | None = None
    identity_json: str | None = None
    remote: str | None = None
    connected_at: float = field(default_factory=time.time)
    max_queued: int = 100_000
    _queue: collections.deque[Message] = field(default_factory=collections.deque)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    overflowed: bool = False

    def deliver(self, message: Message) -> None:
        """Queue a message for this client; never blocks the relay."""
        if self.closed or self.overflowed:
            return
        if len(self._queue) >= self.max_queued:
            self.overflowed = True
            self._queue.clear()
        else:
            self._queue.append(message)
        self._wakeup.set()

    async def pump(self, send: Callable[[bytes | str], Awaitable[None]]) -> None:
        """Send queued messages in order until the client closes; raise if it overflowed."""
        while not self.closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.overflowed:
                raise ClientOverflow(f"client fell {self.max_queued} messages behind")
            queue = self._queue
            while queue:
                await send(queue.popleft().encoded(self.protocol))


class KernelRelay:
    """Routing for one kernel: its link, its clients, and who is waiting for which reply."""

    def __init__(
        self,
        kernel_id: str,
        link: KernelLink,
        taps: list[Tap],
        next_seq: Callable[[], int],
    ) -> None:
        self.kernel_id = kernel_id
        self.link = link
        self.taps = taps
        self.next_seq = next_seq
        self.clients: dict[str, Client] = {}
        self._requesters: dict[str, Client] = {}

    def attach(self, client: Client) -> None:
        self.clients[client.client_id] = client
        for tap in self.taps:
            tap.client_joined(client)
        self.link.set_clients_attached(len(self.clients))

    def detach(self, client: Client) -> None:
        client.closed = True
        if self.clients.pop(client.client_id, None) is None:
            return
        for tap in self.taps:
            tap.client_left(client)
        self.link.set_clients_attached(len(self.clients))

    def _emit(self, direction: str, message: Message, client: Client | None) -> None:
        seq = self.next_seq()
        now = time.time()
        for tap in self.taps:
            tap.message_relayed(seq, self.kernel_id, direction, message, client, now)

    def from_client(self, client: Client, message: Message) -> None:
        """A frontend's message: remember who asked, log it, send it to the kernel."""
        if message.channel != "stdin":  # stdin carries replies (input_reply), not requests
            self._requesters[message.msg_id] = client
        self._emit(TO_KERNEL, message, client)
        self.link.send(message)

    def from_kernel(self, message: Message) -> None:
        """A kernel's message: iopub to everyone, a reply to whoever sent its parent."""
        if message.channel == "iopub":
            self._emit(FROM_KERNEL, message, None)
            for client in self.clients.values():
                client.deliver(message)
            return
        parent_id = message.parent_msg_id
        if message.msg_type.endswith("_reply"):
            requester = self._requesters.pop(parent_id, None) if parent_id else None
        else:  # e.g. input_request on stdin, while its execute_request is still running
            requester = self._requesters.get(parent_id) if parent_id else None
        if requester is not None and requester.closed:
            requester = self._live_client_of(requester)
        self._emit(FROM_KERNEL, message, requester)
        if requester is not None:
            requester.deliver(message)

    def _live_client_of(self, gone: Client) -> Client | None:
        """The connected client carrying on the session of a client that left, if any."""
        if gone.session_id is None:
            return None
        for client in reversed(self.clients.values()):
            if client.session_id == gone.session_id:
                return client
        return None

    def forget_requests(self) -> None:
        """After a restart no pending request will be answered."""
        self._requesters.clear()


LinkFactory = Callable[[str, Callable[[Message], None], Callable[[str], None]], KernelLink]


class Relay:
    """All kernels the proxy follows, created on first sight and dropped when they are gone."""

    def __init__(self, link_factory: LinkFactory, taps: list[Tap], next_seq: Callable[[], int]):
        self.link_factory = link_factory
        self.taps = taps
        self.next_seq = next_seq
        self.kernels: dict[str, KernelRelay] = {}
        self._starting: dict[str, asyncio.Task[KernelRelay]] = {}
        self.on_kernel_gone: list[Callable[[KernelRelay], Awaitable[None]]] = []

    async def kernel(self, kernel_id: str) -> KernelRelay:
        """The relay of a kernel, linking to the kernel first if this is its first use."""
        existing = self.kernels.get(kernel_id)
        if existing is not None:
            return existing
        task = self._starting.get(kernel_id)
        if task is None:
            task = asyncio.ensure_future(self._start(kernel_id))
            self._starting[kernel_id] = task
            task.add_done_callback(lambda _: self._starting.pop(kernel_id, None))
        return await asyncio.shield(task)

    async def _start(self, kernel_id: str) -> KernelRelay:
        relay: KernelRelay | None = None

        def deliver(message: Message) -> None:
            assert relay is not None
            relay.from_kernel(message)

        link = self.link_factory(kernel_id, deliver, self._gone)
        relay = KernelRelay(kernel_id, link, self.taps, self.next_seq)
        await link.start()
        self.kernels[kernel_id] = relay
        log.info("Following kernel %s over a %s link", kernel_id, link.kind)
        return relay

    def _gone(self, kernel_id: str) -> None:
        in_background(self.drop(kernel_id))

    async def sync(self, running: Iterable[str]) -> None:
        """Follow every running kernel (so output nobody watches is logged); drop the rest."""
        running = set(running)
        for kernel_id in running - self.kernels.keys() - self._starting.keys():
            try:
                await self.kernel(kernel_id)
            except Exception as error:
                log.warning("Cannot link to kernel %s: %s", kernel_id, error)
        for kernel_id in set(self.kernels) - running:
            await self.drop(kernel_id)

    async def drop(self, kernel_id: str) -> None:
        relay = self.kernels.pop(kernel_id, None)
        if relay is None:
            return
        log.info("Kernel %s is gone; closing its link", kernel_id)
        for callback in self.on_kernel_gone:
            await callback(relay)
        await relay.link.close()

    async def close(self) -> None:
        for kernel_id in list(self.kernels):
            await self.drop(kernel_id)
