"""The two kinds of kernel link behind :class:`proxy.relay.KernelLink`.

- :class:`ZmqLink` talks to the kernel itself over zmq, signed with the key of its connection
  file. Nothing stands between it and the kernel, so nothing is dropped: jupyter-server's
  websocket rate limit never applies. While the kernel is in use through the proxy it also
  holds one channels websocket to jupyter-server (the *presence*), so the server counts the
  kernel as connected (its culler) and so the status messages only the server makes
  (restarting, dead) reach the relay, which decides what they mean (:mod:`proxy.lifecycle`).
- :class:`WebsocketLink` is one channels websocket to jupyter-server, for kernels whose
  connection file the proxy cannot read (remote, gateway). It keeps one session_id for good and
  reconnects under it, so jupyter-server's own buffer covers a gap; the rate limit applies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.session import DELIM, Session
from zmq.utils.monitor import parse_monitor_message

from .codecs import (
    KERNEL_CHANNELS,
    V1_SUBPROTOCOL,
    FrameError,
    Message,
    decode_v1,
    message_from_parts,
)
from .handover import Handover
from .lifecycle import SERVER_STATES, execution_state
from .relay import Background
from .spool import SpoolReader
from .spool_writer import REPLY
from .upstream import Backoff, Upstream

log = logging.getLogger("jupyter_replay_proxy.links")

_SERVER_STATES = tuple(json.dumps(state).encode() for state in SERVER_STATES)
_STDIN_WAIT = 2.0  # seconds requests wait for the stdin socket once the kernel's iopub flows
_JOIN_WAIT = 2.0  # seconds zmq output waits for the presence to hand over jupyter-server's buffer
_RELEASE_QUIET = 1.0  # seconds the presence is let go after: unused, and jupyter-server quiet on it


async def _ask_until_flowing(
    flowing: asyncio.Event, ask: Callable[[], None], timeout: float
) -> None:
    """Ask (a kernel_info_request) every 0.25 s until `flowing` is set, or `timeout` passed:
    a new iopub subscription misses what the kernel publishes before it lands."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not flowing.is_set() and loop.time() < deadline:
        ask()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(flowing.wait(), 0.25)


class LogProgress(Protocol):
    """What a link asks the log: whether it keeps up, and whether a message is committed."""

    async def until_caught_up(self) -> None: ...

    async def until_durable(self, seq: int) -> None: ...


@dataclass
class LinkContext:
    """What the kernel links of a proxy share."""

    upstream: Upstream
    zmq_context: zmq.asyncio.Context
    spools: SpoolReader
    log: LogProgress
    #: msg_ids of a kernel's last iopub messages in the log (at most so many)
    recently_logged: Callable[[str, int], Awaitable[set[str]]]
    background: Background


def connection_file(runtime_dir: Path, kernel_id: str) -> Path:
    """Where jupyter-server writes a local kernel's connection info."""
    return runtime_dir / f"kernel-{kernel_id}.json"


def _address(info: dict[str, Any], port_name: str) -> str:
    """A kernel socket's address, as jupyter_client makes it from a connection file."""
    ip, port = info["ip"], info[port_name]
    return f"tcp://{ip}:{port}" if info.get("transport", "tcp") == "tcp" else f"ipc://{ip}-{port}"


class RecentIds:
    """A bounded set of recent msg_ids, e.g. what a link delivered lately, so a message arriving
    twice is relayed once."""

    def __init__(self, size: int = 100_000) -> None:
        self._order: collections.deque[str] = collections.deque()
        self._ids: set[str] = set()
        self.size = size

    def first_time(self, msg_id: str) -> bool:
        if msg_id in self._ids:
            return False
        self._ids.add(msg_id)
        self._order.append(msg_id)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())
        return True

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids


class _Presence:
    """The zmq link's channels websocket on jupyter-server, held while the kernel is in use
    through the proxy (a client attached, or an execution unfinished), as a frontend's would be.

    It makes jupyter-server count the kernel as connected (its culler spares it) and pass on
    the statuses only it makes (restarting, dead). Released when nobody uses the kernel, so the
    culler treats it as stock jupyter-server treats a kernel with no tab open. Its session_id
    is the same on every start of the proxy, so when the proxy was killed, jupyter-server
    buffered what the kernel said meanwhile and hands it over on reconnect: for a while after
    the link's start (the *gap fill*) every iopub message the zmq link has not relayed is
    relayed from here.
    """

    def __init__(self, upstream: Upstream, link: ZmqLink, session_id: str) -> None:
        self.upstream = upstream
        self.link = link
        self.session_id = session_id
        self.task: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()  # let go, closing their websocket
        self._letting_go: asyncio.TimerHandle | None = None
        self._last_frame = 0.0  # loop time of the last frame jupyter-server sent it
        self.tried = asyncio.Event()  # set after the first connection attempt

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def hold(self, held: bool) -> None:
        """Hold the websocket, or let it go once jupyter-server has been quiet on it for
        `_RELEASE_QUIET` (closed while it writes, jupyter-server logs tornado's traceback of
        a write to a closed websocket; a tab reloaded meanwhile keeps it)."""
        if held:
            self._keep()
            if self.task is None:
                self.start()
        elif self.task is not None and self._letting_go is None:
            self._letting_go = asyncio.get_running_loop().call_later(
                _RELEASE_QUIET, self._let_go_when_quiet
            )

    def _keep(self) -> None:
        """Call off a let-go under way."""
        if self._letting_go is not None:
            self._letting_go.cancel()
            self._letting_go = None

    def _let_go_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_for = loop.time() - self._last_frame
        if quiet_for < _RELEASE_QUIET:
            self._letting_go = loop.call_later(_RELEASE_QUIET - quiet_for, self._let_go_when_quiet)
            return
        self._letting_go = None
        self._let_go()

    def _let_go(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _run(self) -> None:
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        while True:
            try:
                ws = await self.upstream.channels_websocket(self.link.kernel_id, self.session_id)
            except aiohttp.WSServerHandshakeError as error:
                if error.status == 404:
                    self.tried.set()
                    return
            except aiohttp.ClientError:
                pass
            else:
                self.tried.set()
                backoff.succeeded()
                async with ws:
                    async for frame in ws:
                        self._last_frame = loop.time()
                        if frame.type != aiohttp.WSMsgType.BINARY:
                            continue
                        if not self.link.joined.is_set():
                            self._fill_gap(frame.data)
                        elif b'"status"' in frame.data and any(
                            state in frame.data for state in _SERVER_STATES
                        ):  # everything else reaches the proxy over zmq: skip it cheaply
                            self._server_status(frame.data)
            await backoff.wait()

    def _fill_gap(self, frame: bytes) -> None:
        with contextlib.suppress(FrameError):
            message = decode_v1(frame, allowed_channels=KERNEL_CHANNELS, validate_body=False)
            if message.channel == "iopub":
                self.link.from_presence(message)

    def _server_status(self, frame: bytes) -> None:
        with contextlib.suppress(FrameError):
            message = decode_v1(frame, allowed_channels=KERNEL_CHANNELS, validate_body=False)
            if execution_state(message) in SERVER_STATES:  # the relay follows what it means
                self.link.deliver(message)

    async def close(self) -> None:
        self._keep()
        self._let_go()
        await asyncio.gather(*self._ending, return_exceptions=True)


class ZmqLink:
    """Direct zmq connection to a local kernel: lossless.

    Its iopub is read by the proxy's reader processes into a file (:mod:`proxy.spool`). The log's
    room is awaited before more of it is relayed, so while the log falls behind the backlog
    waits on disk; the file is emptied only once all taken from it is committed to the log.
    On linking, what an earlier proxy's reader wrote and that proxy did not log is relayed
    first (:meth:`_recover`), then what jupyter-server kept for the presence, then zmq
    (:mod:`proxy.handover` decides which).
    """

    kind = "zmq"

    def __init__(
        self,
        kernel_id: str,
        info: dict[str, Any],
        stable_id: str,
        deliver: Callable[[Message], None],
        gone: Callable[[str], None],
        context: LinkContext,
    ) -> None:
        self.kernel_id = kernel_id
        self.context = context
        self.deliver = deliver
        self.gone = gone
        client = AsyncKernelClient(context=context.zmq_context)
        client.load_connection_info(info)
        self.session: Session = client.session
        # The same identity on every start of the proxy: replies to requests sent before a
        # restart reach the new sockets. Shell and stdin share it, as input_request needs.
        self.session.session = stable_id
        identity = self.session.bsession
        self.sockets: dict[str, zmq.asyncio.Socket] = {
            "shell": client.connect_shell(identity=identity),
            "control": client.connect_control(identity=identity),
            "stdin": self._watched_stdin(context.zmq_context, info, identity),
        }
        self.iopub = context.spools.spool(
            kernel_id, _address(info, "iopub_port"), f"Kernel {kernel_id}", identity,
            tuple(_address(info, f"{channel}_port") for channel in ("shell", "control", "stdin")),
        )  # fmt: skip
        self._readers: list[asyncio.Task[None]] = []
        self._iopub_flowing = asyncio.Event()
        self._held: list[Message] = []  # client messages sent before iopub and stdin were ready
        self._ready = False
        self._nudges: set[str] = set()
        self._last_relayed = 0  # seq of the last message relayed through the handover (iopub)
        # Taking the kernel over from an earlier proxy and jupyter-server's buffer
        # (:mod:`proxy.handover`); `joined` once zmq goes on by itself.
        self.handover = Handover()
        self.joined = asyncio.Event()
        self.presence = _Presence(context.upstream, self, f"replay-proxy-{stable_id}")
        self._in_use = False  # held from the start for the gap fill; then only while in use

    def _watched_stdin(
        self, context: zmq.asyncio.Context, info: dict[str, Any], identity: bytes
    ) -> zmq.asyncio.Socket:
        """The kernel sends input_request to the stdin socket with the shell request's identity
        and drops it while that socket is not connected: a connect refused by a kernel still
        starting is retried every 100 ms, so shell can be up before stdin. Watched from before
        its connect, so no handshake goes unseen (see :meth:`_follow_stdin`)."""
        socket = context.socket(zmq.DEALER)
        self._stdin_connected = asyncio.Event()
        self._stdin_events = socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        socket.identity = identity
        socket.linger = 0
        socket.connect(_address(info, "stdin_port"))
        return socket

    @classmethod
    def from_file(
        cls,
        path: Path,
        kernel_id: str,
        stable_id: str,
        deliver: Callable[[Message], None],
        gone: Callable[[str], None],
        context: LinkContext,
    ) -> ZmqLink:
        return cls(kernel_id, json.loads(path.read_text()), stable_id, deliver, gone, context)

    async def start(self) -> None:
        self.iopub.open()
        self.presence.start()
        with contextlib.suppress(asyncio.TimeoutError):  # before anyone else's connection
            await asyncio.wait_for(self.presence.tried.wait(), 5)
        for channel, socket in self.sockets.items():
            self._readers.append(asyncio.ensure_future(self._read(channel, socket)))
        self._readers.append(asyncio.ensure_future(self._follow_stdin()))
        self._readers.append(asyncio.ensure_future(self._relay_iopub()))
        await self._nudge()
        await self._recover()

    async def _recover(self) -> None:
        """Relay what an earlier proxy's reader wrote for this kernel and that proxy did not
        log (it was killed), before anything newer. Once this link's own subscription is live:
        the earlier reader hands the kernel over then, so nothing falls in between."""
        left = await asyncio.to_thread(self.context.spools.leftovers, self.kernel_id)
        # What the log has of it is its first part (as many, at most); what jupyter-server
        # kept for the presence may reach back to its last release, logged since.
        logged = await self.context.recently_logged(self.kernel_id, len(left) + 10_000)
        leftovers = []
        for frames in left:
            channel = "iopub"
            if frames and frames[0].startswith(REPLY):  # caught by the reader for us
                channel, frames = frames[0][len(REPLY) :].decode(), frames[1:]
            message = self._parse(channel, frames)
            if message is not None:
                leftovers.append(message)
        relayed = self._relay(self.handover.recover(logged, leftovers))
        if relayed:
            log.info("Kernel %s: %d messages relayed that the proxy before this one had not "
                     "logged (or jupyter-server kept)", self.kernel_id, relayed)  # fmt: skip

    async def _follow_stdin(self) -> None:
        """Keep `_stdin_connected` true exactly while the kernel can route to our stdin."""
        while True:
            try:
                frames = await self._stdin_events.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            if parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._stdin_connected.set()
            else:
                self._stdin_connected.clear()

    async def _nudge(self, timeout: float = 30.0) -> None:
        """Ask for kernel_info until iopub flows (a SUB socket misses what precedes its join),
        and hold client messages until stdin is connected too (at most `_STDIN_WAIT` more)."""

        def ask() -> None:
            request = self.session.msg("kernel_info_request")
            self._nudges.add(request["header"]["msg_id"])
            self._send("shell", self.session.serialize(request))

        await _ask_until_flowing(self._iopub_flowing, ask, timeout)
        if not self._iopub_flowing.is_set():
            log.warning("Kernel %s: no iopub message after %.0f s", self.kernel_id, timeout)
            self._iopub_flowing.set()
        try:  # once iopub flows the kernel is up: stdin follows within a retry (100 ms)
            await asyncio.wait_for(self._stdin_connected.wait(), _STDIN_WAIT)
        except asyncio.TimeoutError:
            log.warning("Kernel %s: stdin not seen connected after iopub; going on", self.kernel_id)
        self._ready = True
        held, self._held = self._held, []
        for message in held:
            self.send(message)

    async def _read(self, channel: str, socket: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await socket.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                self._receive(channel, frames)
            except Exception:  # a bug must not stop this kernel's replies for good
                log.exception("Kernel %s: cannot relay a %s message", self.kernel_id, channel)

    async def _relay_iopub(self) -> None:
        """Relay what the iopub reader wrote, a slice at a time so other work runs between;
        when all of it is taken, let the reader empty the file once the log has it all."""
        while True:
            await self.context.log.until_caught_up()
            batch = self.iopub.take()
            if not batch:
                joined = self.joined.is_set()  # (before, what was taken waits in the handover)
                if joined:
                    await self.context.log.until_durable(self._last_relayed)
                await self.iopub.more(logged=joined)
                continue
            for count, frames in enumerate(batch, 1):
                self._receive("iopub", frames)
                if count % 500 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _parse(self, channel: str, frames: list[bytes]) -> Message | None:
        """A message the kernel sent, checked and signed; None (logged) if it is not one."""
        session = self.session
        try:
            _, parts = session.feed_identities(frames)
            signature, parts = parts[0], parts[1:]
            if session.auth is not None and signature != session.sign(parts[:4]):
                raise FrameError("bad message signature")
            return message_from_parts(
                channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=False
            )
        except (ValueError, IndexError) as error:
            log.warning("Kernel %s sent an invalid %s message: %s", self.kernel_id, channel, error)
            return None

    def _receive(self, channel: str, frames: list[bytes]) -> None:
        message = self._parse(channel, frames)
        if message is None:
            return
        if channel == "iopub":
            self._iopub_flowing.set()
            if self.handover.from_zmq(message):
                self.deliver(message)
                self._last_relayed = message.seq
            elif self.handover.waiting == 1:  # the first to wait: it waits for so long at most
                asyncio.get_running_loop().call_later(_JOIN_WAIT, self._join)
            return
        if message.parent_msg_id in self._nudges:
            self._nudges.discard(message.parent_msg_id)
            return
        self.deliver(message)

    def from_presence(self, message: Message) -> None:
        """Gap fill: what jupyter-server kept for the presence while no proxy held it."""
        self._relay(self.handover.from_presence(message))

    def _join(self) -> None:
        self._relay(self.handover.join())

    def _relay(self, messages: list[Message]) -> int:
        """Deliver what the handover lets through; follow its join."""
        for message in messages:
            self.deliver(message)
            self._last_relayed = message.seq
        if self.handover.joined and not self.joined.is_set():
            self.joined.set()
            self.presence.hold(self._in_use)
        return len(messages)

    def resync(self) -> None:
        """After a restart: hold client messages until the new kernel's iopub reaches us.

        The SUB socket reconnects by itself but misses what the kernel publishes before its
        subscription lands; a request sent in that window would lose its output.
        """
        if self._ready:
            self._ready = False
            self._iopub_flowing.clear()
            self.context.background.run(self._nudge())

    def send(self, message: Message) -> None:
        if not self._ready:
            self._held.append(message)
            return
        parts = message.parts
        self._send(message.channel, [DELIM, self.session.sign(parts[:4]), *parts])

    def _send(self, channel: str, frames: list[bytes]) -> None:
        """Send through the asyncio socket itself. (jupyter_client's Session.send sends on a
        blocking shadow of it, which can take the readable edge of the socket's descriptor from
        under the pending receive: the kernel's replies then wait unread for good.)"""
        sent = self.sockets[channel].send_multipart(frames)
        if not sent.done():  # (only while libzmq's queue to the kernel is full)
            sent.add_done_callback(self._sent)

    def _sent(self, sent: asyncio.Future[Any]) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            log.warning("Kernel %s: cannot send: %s", self.kernel_id, sent.exception())

    def set_in_use(self, in_use: bool) -> None:
        """Hold the presence while the kernel is in use through the proxy (from the join on:
        until then it fills the gap)."""
        self._in_use = in_use
        if self.joined.is_set():
            self.presence.hold(in_use)

    async def close(self) -> None:
        """Stop following the kernel. The presence goes first (from then on jupyter-server
        keeps the kernel's output for the next proxy); what the reader wrote until then is
        relayed, so the spool file can go once the log has it."""
        await self.presence.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        drained = self.joined.is_set() and self._drain()
        self.sockets["stdin"].disable_monitor()
        self._stdin_events.close(linger=0)
        for socket in self.sockets.values():
            socket.close(linger=0)
        if drained:
            await self.context.log.until_durable(self._last_relayed)
        self.iopub.close(done=drained)

    def _drain(self) -> bool:
        """Relay everything the reader wrote so far; False if that cannot be done."""
        try:
            while batch := self.iopub.take():
                for frames in batch:
                    self._receive("iopub", frames)
        except (OSError, AssertionError):  # its file is gone: the next proxy has nothing
            return False
        return True


class WebsocketLink:
    """One channels websocket to jupyter-server, reconnecting under the same session_id."""

    kind = "websocket"

    def __init__(
        self,
        kernel_id: str,
        session_id: str,
        upstream: Upstream,
        deliver: Callable[[Message], None],
        gone: Callable[[str], None],
        background: Background,
        max_held: int = 10_000,
    ) -> None:
        self.kernel_id = kernel_id
        self.session_id = session_id
        self.upstream = upstream
        self.deliver = deliver
        self.gone = gone
        self.background = background
        self.max_held = max_held
        self._held: list[Message] | None = None  # after a restart, until iopub flows again
        self._nudges: set[str] = set()
        self._iopub_flowing = asyncio.Event()
        self._outgoing: collections.deque[Message] = collections.deque()
        self._wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        log.warning(
            "Kernel %s: no readable connection file, so relaying through jupyter-server's "
            "websocket: its IOPub rate limit applies and it drops output over the limit",
            self.kernel_id,
        )
        self._task = asyncio.ensure_future(self._run())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), 10)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                ws = await self.upstream.channels_websocket(self.kernel_id, self.session_id)
            except aiohttp.WSServerHandshakeError as error:
                if error.status in (403, 404):
                    log.warning(
                        "Kernel %s: jupyter-server answered %s", self.kernel_id, error.status
                    )
                    self.gone(self.kernel_id)
                    return
            except aiohttp.ClientError as error:
                log.warning("Kernel %s: cannot reach jupyter-server: %s", self.kernel_id, error)
            else:
                backoff.succeeded()
                async with ws:
                    await self._serve(ws)
                log.warning("Kernel %s: websocket link dropped; reconnecting", self.kernel_id)
            await backoff.wait()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        sender = asyncio.ensure_future(self._send_outgoing(ws))
        self._connected.set()
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    message = decode_v1(
                        frame.data, allowed_channels=KERNEL_CHANNELS, validate_body=False
                    )
                except FrameError as error:
                    log.warning(
                        "Kernel %s: invalid frame from jupyter-server: %s", self.kernel_id, error
                    )
                    continue
                if message.parent_msg_id in self._nudges:
                    if message.channel == "iopub":
                        self._iopub_flowing.set()  # (its statuses reach clients, as any)
                    else:
                        self._nudges.discard(message.parent_msg_id)
                        continue  # the reply to the link's own kernel_info_request
                self.deliver(message)
        finally:
            self._connected.clear()
            sender.cancel()

    async def _send_outgoing(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send client messages in order; what is unsent when the link drops waits for the next."""
        outgoing = self._outgoing
        while True:
            while outgoing:
                await ws.send_bytes(outgoing[0].encoded(V1_SUBPROTOCOL))
                outgoing.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()

    def send(self, message: Message) -> None:
        if self._held is not None and len(self._held) < self.max_held:
            self._held.append(message)
            return
        if len(self._outgoing) >= self.max_held:
            log.error(
                "Kernel %s: link down too long, dropping a %s", self.kernel_id, message.msg_type
            )
            return
        self._outgoing.append(message)
        self._wakeup.set()

    def set_in_use(self, in_use: bool) -> None:
        """This link is itself a connection jupyter-server counts, held for as long as the
        link: released, jupyter-server would keep what the kernel says for it until it is back."""

    def resync(self) -> None:
        """After a restart: hold client messages until the new kernel's iopub reaches
        jupyter-server's websocket again. Its subscription reconnects by itself but misses
        what the kernel publishes before it lands: a request sent in that window would lose
        output (seen: a cell's reply and idle status came, its printed line did not)."""
        if self._held is None:
            self._held = []
            self._iopub_flowing.clear()
            self.background.run(self._nudge())

    async def _nudge(self, timeout: float = 30.0) -> None:
        """Ask for kernel_info until iopub of one of the requests comes, then send what was
        held (after `timeout` anyway)."""
        session = Session(key=b"unused: jupyter-server signs", username="replay-proxy")

        def ask() -> None:
            msg = session.msg("kernel_info_request")
            parts = [
                session.pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")
            ]
            self._nudges.add(msg["header"]["msg_id"])
            self._outgoing.append(
                message_from_parts(
                    "shell", parts, allowed_channels=KERNEL_CHANNELS, validate_body=True
                )
            )
            self._wakeup.set()

        await _ask_until_flowing(self._iopub_flowing, ask, timeout)
        held, self._held = self._held or [], None
        for message in held:
            self.send(message)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
