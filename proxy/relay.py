"""The relay core: moves kernel messages between frontends and one link per kernel.

It knows nothing of HTTP, SQLite or zmq. A :class:`KernelRelay` routes what a kernel sends
(iopub to every client; shell, control and stdin replies to the client that sent the parent
request) and emits every message to the taps (the log, replay, the Y fold, the executor) before
delivering it, so anything a client has received is already on its way to the log. It also
tells the taps the kernel's lifecycle, decided here once (:mod:`proxy.lifecycle`): executions
requested and finished, the kernel restarted or dead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .codecs import Message, coalesce_streams
from .lifecycle import Executions, kernel_event

log = logging.getLogger("jupyter_replay_proxy.relay")


class Background:
    """Work one proxy runs without waiting for it: kept, so that it is not collected midway,
    and cancelled when that proxy stops (another proxy in the same process keeps its own)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[object]] = set()

    def run(self, awaitable: Awaitable[object]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        """Cancel what still runs, and wait for it to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


TO_KERNEL = "to_kernel"
FROM_KERNEL = "from_kernel"


class RequestRefused(Exception):
    """A client's message the relay does not pass on; the text says why."""


class Tap:
    """Something that follows relay events. Called on the event loop: must not block."""

    def client_joined(self, client: Client) -> None:
        """A frontend was admitted to a kernel's channels."""

    def client_left(self, client: Client) -> None:
        """A frontend's websocket closed."""

    def delivery_confirmed(self, client: Client, seq: int) -> None:
        """The client acknowledged everything meant for it up to `seq`."""

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Requester | None,
        received_at: float,
    ) -> None:
        """A message passed, to the kernel from `client` or from the kernel to `client`
        (None for iopub, which goes to every client, and for replies nobody is waiting for)."""

    async def restore(self, kernel_id: str) -> None:
        """The proxy is linking to a kernel: read back from the log what this tap must
        remember of it (after a restart of the proxy); before any live message of it."""

    def execution_requested(
        self, kernel_id: str, request: Message, client: Requester | None
    ) -> None:
        """An execute_request went to the kernel (after its message_relayed)."""

    def execution_finished(self, kernel_id: str, msg_id: str, reply: Message | None) -> None:
        """An execution ended: its reply and its idle status have passed, or the kernel
        restarted or died (`reply`: what came, if anything). After the message that ends it."""

    def kernel_restarted(self, kernel_id: str) -> None:
        """The kernel was restarted: no earlier request will be answered (its unfinished
        executions have ended)."""

    def kernel_dead(self, kernel_id: str) -> None:
        """The kernel died or was shut down (its unfinished executions have ended)."""


class KernelLink(Protocol):
    """The proxy's one connection to a kernel, shared by all of that kernel's clients."""

    kind: str

    async def start(self) -> None: ...

    def send(self, message: Message) -> None: ...

    def set_in_use(self, in_use: bool) -> None: ...

    def resync(self) -> None: ...

    async def close(self) -> None: ...


class Ledger(Protocol):
    """What the relay needs of the log: numbers for messages, and word that they are kept."""

    def next_seq(self) -> int:
        """The sequence number of the next message."""
        ...

    async def until_durable(self, seq: int) -> None:
        """Return once the message `seq` is committed (at once while the log fails)."""
        ...


class Backlog(Protocol):
    """Where a client that is behind reads what it missed: the log."""

    async def history(
        self, client: Client, after: int, upto: int | None, limit: int | None, parent: str | None
    ) -> list[Message]:
        """The client's messages with `after` < seq <= `upto` (None: all committed), in order."""
        ...

    async def settle(self) -> None:
        """Return once everything relayed so far is committed."""
        ...

    async def durable(self, seq: int) -> None:
        """Return once the message `seq` is committed: a client is sent nothing the log lacks."""
        ...


#: A catch-up reads the log this many messages at a time, so a stalled client costs no more.
CATCH_UP_CHUNK = 1000
#: Requests remembered per kernel while they wait for a reply (the oldest forgotten first):
#: a kernel leaves requests of types it does not know unanswered, and a frontend's queue of
#: cells (Run All) is hundreds deep, not thousands.
MAX_PENDING_REQUESTS = 10_000
#: Seconds between two stream frames to one client (a browser renders ~1,000 frames a second).
STREAM_FRAME_INTERVAL = 0.005


@dataclass(eq=False)
class Client:
    """One frontend websocket on a kernel's channels, and what it has been sent.

    Everything this client should get with seq <= `sent_seq` has been handed to its socket, in
    order. Live messages wait in a bounded queue; past the bound the client is *behind*: the
    queue is dropped and the pump reads the log from `sent_seq` on, then rejoins live with
    neither gap nor duplicate (see :meth:`_catch_up`).
    """

    client_id: str
    kernel_id: str
    session_id: str | None
    protocol: str
    username: str | None = None
    identity_json: str | None = None
    remote: str | None = None
    connected_at: float = field(default_factory=time.time)
    max_queued: int = 10_000
    max_queued_bytes: int = 8 * 1024 * 1024
    sent_seq: int = 0
    confirmed_seq: int = 0
    behind: bool = False
    replay_parent: str | None = None  # the first catch-up only sends children of this request
    expose_seq: bool = False  # a tool that asked for history also learns each message's seq
    preface: list[Message] = field(default_factory=list)  # current state, sent before anything
    closed: bool = False
    #: it closed with a close frame of its own (a tab or document closed): no reconnect follows
    said_goodbye: bool = False
    #: a server-side execution of the proxy's own: the notebook it writes into
    notebook_path: str | None = None
    times_behind: int = 0
    resent: int = 0  # messages sent again at its resume: it had them, unacknowledged
    pending: set[str] = field(default_factory=set)  # its requests still waiting for a reply
    _queue: collections.deque[Message] = field(default_factory=collections.deque)
    _queued_bytes: int = 0
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, message: Message) -> None:
        """Queue a live message for this client; never blocks the relay."""
        if self.closed or self.behind:
            return  # a client that is behind reads it from the log
        if len(self._queue) >= self.max_queued or self._queued_bytes >= self.max_queued_bytes:
            self.fall_behind()
            return
        self._queue.append(message)
        self._queued_bytes += message.size
        self._wakeup.set()

    def fall_behind(self) -> None:
        self.behind = True
        self.times_behind += 1
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()

    def close(self) -> None:
        """Its websocket is gone: what was queued for it is dropped (its session reads what
        it missed from the log on its return; the relay may keep this object a while, as the
        sender of requests still waiting for their replies)."""
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self.preface = []
        self._wakeup.set()

    async def pump(
        self,
        send: Callable[[Message], Awaitable[None]],
        confirm: Callable[[int], Awaitable[None]],
        backlog: Backlog,
        last_seq: Callable[[], int],
    ) -> None:
        """Send this client its messages in order until it closes.

        After each batch, `confirm(seq)` asks the client to acknowledge (a websocket ping
        carrying seq): what it acknowledged is what a reconnect resumes after.
        """
        for message in self.preface:
            await send(message)
        self.preface = []
        loop = asyncio.get_running_loop()
        last_stream = 0.0
        while not self.closed:
            if self.behind:
                await self._catch_up(send, confirm, backlog, last_seq)
                continue
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queue[0].msg_type == "stream":
                # A cell printing as fast as it can would send a frame per line: at most one
                # stream frame per interval, the lines of the interval merged into it.
                wait = last_stream + STREAM_FRAME_INTERVAL - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                last_stream = loop.time()
            batch = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            if not batch:
                continue  # it fell behind meanwhile: the log has it all
            await backlog.durable(max(message.seq for message in batch))
            if len(batch) > 1:
                batch = coalesce_streams(batch)
            for message in batch:
                await send(message)
                self.sent_seq = message.seq
            await confirm(self.sent_seq)

    async def _catch_up(
        self,
        send: Callable[[Message], Awaitable[None]],
        confirm: Callable[[int], Awaitable[None]],
        backlog: Backlog,
        last_seq: Callable[[], int],
    ) -> None:
        parent, self.replay_parent = self.replay_parent, None
        upto: int | None = None  # first what is committed, then up to the switch
        while not self.closed:
            chunk = await backlog.history(self, self.sent_seq, upto, CATCH_UP_CHUNK, parent)
            await self._send_history(chunk, send, confirm)
            if len(chunk) == CATCH_UP_CHUNK:
                continue
            if upto is not None:
                self.sent_seq = max(self.sent_seq, upto)
                return
            # Rejoin live: queue again from now on, so everything after `upto` arrives live;
            # once all up to `upto` is committed, send that last stretch from the log.
            self.behind = False
            upto = last_seq()
            await backlog.settle()

    async def _send_history(
        self,
        messages: list[Message],
        send: Callable[[Message], Awaitable[None]],
        confirm: Callable[[int], Awaitable[None]],
    ) -> None:
        for message in coalesce_streams(messages):
            await send(message)
            self.sent_seq = message.seq
        if messages:
            await confirm(self.sent_seq)


@dataclass(frozen=True, slots=True)
class Departed:
    """A client that left with requests still unanswered, as the relay keeps it: whose their
    replies are (the log files them under it; its session gets them on replay)."""

    client_id: str
    kernel_id: str
    session_id: str | None
    closed: bool = True


#: Whose a request is: a connected client, or one that left.
Requester = Client | Departed


def is_execution_state(status: Message) -> bool:
    """Whether a status message tells if code runs: jupyter-server's nudges and other control
    requests make the kernel busy/idle while a cell still runs, so they do not count."""
    return status.parent_header.get("msg_type", "execute_request") == "execute_request"


@dataclass
class KernelMemory:
    """What a kernel's relay must remember across a proxy restart, restored from the log."""

    requesters: dict[str, Requester] = field(default_factory=dict)  # unanswered request: sender
    last_status: Message | None = None
    pending_input: Message | None = None
    executions: list[str] = field(default_factory=list)  # msg_ids of unfinished executions


class KernelRelay:
    """Routing for one kernel: its link, its clients, and who is waiting for which reply."""

    def __init__(
        self,
        kernel_id: str,
        link: KernelLink,
        taps: list[Tap],
        ledger: Ledger,
        memory: KernelMemory | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.link = link
        self.taps = taps
        self.ledger = ledger
        self.clients: dict[str, Client] = {}
        self._outbox: collections.deque[Message] = collections.deque()  # sent once logged
        self._forwarding: asyncio.Task[None] | None = None
        self.linked_at = time.monotonic()
        memory = memory or KernelMemory()
        self._requesters = memory.requesters
        self.last_status = memory.last_status  # what a late joiner is told first
        self.pending_input = memory.pending_input  # an input_request nobody has answered yet
        self.executions = Executions(memory.executions)
        self.dead = False
        self._in_use = False
        self._tell_link_in_use()

    def attach(self, client: Client) -> None:
        self.clients[client.client_id] = client
        for tap in self.taps:
            tap.client_joined(client)
        self._tell_link_in_use()

    def detach(self, client: Client) -> None:
        client.close()
        if client.pending:  # keep only whose their replies are, not the whole client
            departed = Departed(client.client_id, client.kernel_id, client.session_id)
            for msg_id in client.pending:
                if self._requesters.get(msg_id) is client:
                    self._requesters[msg_id] = departed
            client.pending.clear()
        if self.clients.pop(client.client_id, None) is None:
            return
        for tap in self.taps:
            tap.client_left(client)
        self._tell_link_in_use()

    def _tell_link_in_use(self) -> None:
        """Tell the link whether anyone uses the kernel through the proxy: a client attached,
        or an execution unfinished (jupyter-server then counts the kernel as connected)."""
        in_use = bool(self.clients) or bool(self.executions)
        if in_use != self._in_use:
            self._in_use = in_use
            self.link.set_in_use(in_use)

    def confirm_delivery(self, client: Client, seq: int) -> None:
        """The client acknowledged everything meant for it up to `seq` (or, on joining, that
        it starts there: then even 0 is recorded, so a session that saw nothing resumes)."""
        seq = min(seq, client.sent_seq)  # a pong can claim no more than was sent
        if seq > client.confirmed_seq or seq == client.sent_seq:
            client.confirmed_seq = max(client.confirmed_seq, seq)
            for tap in self.taps:
                tap.delivery_confirmed(client, client.confirmed_seq)

    def awaits_replies(self) -> bool:
        """Whether a request sent to the kernel has no reply yet."""
        return bool(self._requesters)

    def current_state(self, client: Client) -> list[Message]:
        """What a client that joins without history is told at once: the kernel's execution
        state, and an input() prompt whose requester is gone."""
        state = [self.last_status] if self.last_status is not None else []
        pending = self.pending_input
        if pending is not None:
            requester = self._requesters.get(pending.parent_msg_id or "")
            if requester is None or self._live_client_of(requester) is None:
                state.append(pending)
        return state

    def _emit(self, direction: str, message: Message, client: Requester | None) -> None:
        message.seq = seq = self.ledger.next_seq()
        now = time.time()
        for tap in self.taps:
            try:
                tap.message_relayed(seq, self.kernel_id, direction, message, client, now)
            except Exception:  # a tap's bug must not stop the relay (nor the other taps)
                log.exception("%s failed on %s %s", type(tap).__name__, direction, message.msg_id)

    def from_client(self, client: Client, message: Message) -> None:
        """A frontend's message: remember who asked, log it, send it to the kernel.

        Replies are routed by the request's msg_id, so a request reusing the msg_id of another
        session's request still waiting for its reply is refused (it would take that reply).
        """
        if message.channel != "stdin":  # stdin carries replies (input_reply), not requests
            holder = self._requesters.get(message.msg_id)
            if (
                holder is not None
                and holder is not client
                and (client.session_id is None or holder.session_id != client.session_id)
            ):
                raise RequestRefused(f"msg_id {message.msg_id[:64]!r} is another client's")
            if len(self._requesters) >= MAX_PENDING_REQUESTS:
                oldest = next(iter(self._requesters))
                forgotten = self._requesters.pop(oldest)
                if isinstance(forgotten, Client):
                    forgotten.pending.discard(oldest)
            self._requesters[message.msg_id] = client
            client.pending.add(message.msg_id)
        elif message.msg_type == "input_reply":
            self.pending_input = None
        self._emit(TO_KERNEL, message, client)
        if message.msg_type == "execute_request":
            self.executions.requested(message.msg_id)
            self._tell("execution_requested", self.kernel_id, message, client)
            self._tell_link_in_use()
        self._outbox.append(message)
        if self._forwarding is None:
            self._forwarding = asyncio.ensure_future(self._forward())

    async def _forward(self) -> None:
        """Send clients' messages to the kernel, in order, once the log holds them (group
        commit: a commit takes what came meanwhile). A crash in between loses a request that
        never ran, not one that ran and is missing from the log."""
        try:
            while self._outbox:
                upto = self._outbox[-1].seq
                await self.ledger.until_durable(upto)
                while self._outbox and self._outbox[0].seq <= upto:
                    self.link.send(self._outbox.popleft())
        finally:
            self._forwarding = None

    def close(self) -> None:
        """The kernel is no longer followed: what was not sent stays unsent."""
        if self._forwarding is not None:
            self._forwarding.cancel()

    def from_kernel(self, message: Message) -> None:
        """A kernel's message: iopub to everyone, a reply to the session that sent its parent.

        A reply whose requester left is logged as theirs, so their session gets it on replay.
        """
        if message.channel == "iopub":
            if message.msg_type == "status" and is_execution_state(message):
                self.last_status = message
            self._emit(FROM_KERNEL, message, None)
            self._follow_lifecycle(message)
            for client in self.clients.values():
                client.deliver(message)
            return
        parent_id = message.parent_msg_id or ""
        requester: Requester | None
        if message.msg_type.endswith("_reply"):
            requester = self._requesters.pop(parent_id, None)
            if isinstance(requester, Client):
                requester.pending.discard(parent_id)
            if self.pending_input is not None and self.pending_input.parent_msg_id == parent_id:
                self.pending_input = None
        else:  # e.g. input_request on stdin, while its execute_request is still running
            requester = self._requesters.get(parent_id)
            if message.msg_type == "input_request":
                self.pending_input = message
        self._emit(FROM_KERNEL, message, requester)
        self._follow_lifecycle(message)
        if requester is not None:
            target = requester if not requester.closed else self._live_client_of(requester)
            if target is not None:
                target.deliver(message)

    def _follow_lifecycle(self, message: Message) -> None:
        """What a kernel message means for the kernel's lifecycle, told to the taps."""
        event = kernel_event(message)
        if event == "restarted":
            self.restarted()
        elif event == "dead":
            self.died()
        else:
            finished = self.executions.passed(message)
            if finished is not None:
                self._tell("execution_finished", self.kernel_id, *finished)
                self._tell_link_in_use()

    def restarted(self) -> None:
        """The kernel was restarted (a status only jupyter-server makes, or a restart request
        through the proxy it accepted): requests wait for the new kernel, and what was running
        has ended."""
        self.link.resync()  # before any request of a client can reach the kernel
        self._end_executions()
        self._tell("kernel_restarted", self.kernel_id)

    def died(self) -> None:
        """The kernel died, or is gone from jupyter-server: what was running has ended."""
        if self.dead:
            return
        self.dead = True
        self._end_executions()
        self._tell("kernel_dead", self.kernel_id)

    def _end_executions(self) -> None:
        for msg_id, reply in self.executions.end_all():
            self._tell("execution_finished", self.kernel_id, msg_id, reply)
        self._tell_link_in_use()

    def _tell(self, event: str, *args: Any) -> None:
        for tap in self.taps:
            try:
                getattr(tap, event)(*args)
            except Exception:  # a tap's bug must not stop the relay (nor the other taps)
                log.exception("%s failed on %s of kernel %s", type(tap).__name__, event,
                              self.kernel_id)  # fmt: skip

    def _live_client_of(self, client: Requester) -> Client | None:
        """The connected client carrying on a client's session (itself if still here)."""
        if isinstance(client, Client) and not client.closed:
            return client
        if client.session_id is None:
            return None
        for other in reversed(self.clients.values()):
            if other.session_id == client.session_id:
                return other
        return None


async def _nothing_to_remember(kernel_id: str) -> KernelMemory:
    return KernelMemory()


LinkFactory = Callable[[str, Callable[[Message], None], Callable[[str], None]], KernelLink]


class Relay:
    """All kernels the proxy follows, created on first sight and dropped when they are gone."""

    def __init__(
        self,
        link_factory: LinkFactory,
        taps: list[Tap],
        ledger: Ledger,
        background: Background,
        remember: Callable[[str], Awaitable[KernelMemory]] | None = None,
    ) -> None:
        self.link_factory = link_factory
        self.taps = taps
        self.ledger = ledger
        self.background = background
        self.remember = remember or _nothing_to_remember
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

        memory = await self.remember(kernel_id)
        await asyncio.gather(*(tap.restore(kernel_id) for tap in self.taps))
        link = self.link_factory(kernel_id, deliver, self._gone)
        relay = KernelRelay(kernel_id, link, self.taps, self.ledger, memory)
        try:
            await link.start()
        except BaseException:  # (cancelled: the proxy stops while it links)
            await link.close()
            raise
        self.kernels[kernel_id] = relay
        log.info("Following kernel %s over a %s link", kernel_id, link.kind)
        return relay

    def _gone(self, kernel_id: str) -> None:
        self.background.run(self.drop(kernel_id))

    async def sync(self, running: Iterable[str], listed_at: float | None = None) -> None:
        """Follow every running kernel (so output nobody watches is logged); drop the rest.

        `listed_at` (monotonic) is when the list was asked for: a kernel linked since (e.g.
        on a client's demand) was not in it and must not be dropped for that.
        """
        running = set(running)
        new = sorted(running - self.kernels.keys() - self._starting.keys())
        # together: a kernel slow to answer (busy starting, or stuck) holds up no other
        results = await asyncio.gather(*map(self.kernel, new), return_exceptions=True)
        for kernel_id, result in zip(new, results, strict=True):
            if isinstance(result, Exception):
                log.warning("Cannot link to kernel %s: %s", kernel_id, result)
        for kernel_id in set(self.kernels) - running:
            relay = self.kernels.get(kernel_id)  # (another sync may have dropped it meanwhile)
            if relay is not None and (listed_at is None or relay.linked_at < listed_at):
                await self.drop(kernel_id)

    async def drop(self, kernel_id: str, dead: bool = True) -> None:
        """Stop following a kernel: it is gone (`dead`), or the proxy stops."""
        relay = self.kernels.pop(kernel_id, None)
        if relay is None:
            return
        if dead:
            log.info("Kernel %s is gone; closing its link", kernel_id)
            relay.died()
        for callback in self.on_kernel_gone:
            await callback(relay)
        relay.close()
        await relay.link.close()

    async def close(self) -> None:
        starting = list(self._starting.values())
        for task in starting:  # a link being made (it waits up to 30 s for a kernel whose
            task.cancel()  # iopub does not flow) is cancelled, and closed by its own start
        await asyncio.gather(*starting, return_exceptions=True)
        for kernel_id in list(self.kernels):
            await self.drop(kernel_id, dead=False)
