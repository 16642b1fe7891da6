"""Kernel channels websockets: a frontend admitted by jupyter-server (with its own credentials)
becomes a client of the relay, fed from its queue (and the log, when behind) until it closes.
What it sends is checked at the edge (:mod:`proxy.codecs`); what fails closes its websocket
with a reason, and harms no one else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .codecs import LEGACY, V1_SUBPROTOCOL, FrameError, Message, decode_client_frame, with_seq
from .relay import Client, KernelRelay, Relay, RequestRefused
from .settings import ProxySettings
from .taps.log import LogWriter
from .taps.replay import Replayer, channel_options
from .upstream import Upstream, is_kernel_id

log = logging.getLogger("jupyter_replay_proxy")

CLOSE_MALFORMED = 1007  # RFC 6455: data inconsistent with the message type
CLOSE_POLICY = 1008  # RFC 6455: a message that violates policy
CLOSE_TOO_BIG = 1009
_SEQ = struct.Struct("<Q")
CLOSE_KERNEL_GONE = 1001
#: Close codes of a frontend that closed on purpose (aiohttp reads a close frame without a
#: code as 0): normal, going away (a tab closed), no status.
_GOODBYE = (0, 1000, 1001, 1005)


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close a client's websocket, not waiting long: one that stopped reading never answers,
    and its connection, with unsent data, would never finish closing: abort it."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 2)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        transport = ws._req.transport if ws._req is not None else None
        if transport is not None:
            transport.abort()


class ChannelsHandler:
    """The channels websockets of every kernel, and the sockets of the clients they carry."""

    def __init__(
        self,
        upstream: Upstream,
        relay: Relay,
        writer: LogWriter,
        replayer: Replayer,
        settings: ProxySettings,
        hides_from: Callable[[Client], Callable[[Message], bool]] | None,
        forward: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        self.upstream = upstream
        self.relay = relay
        self.writer = writer
        self.replayer = replayer
        self.settings = settings
        self.hides_from = hides_from
        self.forward = forward
        self._sockets: dict[Client, web.WebSocketResponse] = {}

    async def close_all(self) -> None:
        """The proxy stops: every client is told it is going away."""
        await asyncio.gather(
            *(
                _close(ws, aiohttp.WSCloseCode.GOING_AWAY, "proxy shutting down")
                for ws in list(self._sockets.values())
            )
        )

    async def close_clients(self, relay: KernelRelay) -> None:
        sockets = [self._sockets.get(client) for client in list(relay.clients.values())]
        await asyncio.gather(
            *(_close(ws, CLOSE_KERNEL_GONE, "kernel shut down") for ws in sockets if ws is not None)
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await self.forward(request)
        kernel_id = request.match_info["kernel_id"]
        if not is_kernel_id(kernel_id):  # (aiohttp decodes %2F: "a/../b" is no kernel's)
            return web.Response(status=404, text="not a kernel id")
        # The caller's own credentials first: nobody jupyter-server does not know makes the
        # proxy ask anything with its own token.
        known, identity = await self.upstream.identity(request)
        if known != 200:
            return web.Response(status=known, text=f"jupyter-server refused: {known}")
        try:
            if kernel_id not in self.relay.kernels and await self.upstream.has_kernel(kernel_id):
                # Link before the admission probe: jupyter-server drops the buffer it kept for
                # the link's session (the downtime of a restarted proxy) as soon as any other
                # session connects, and the probe is one.
                await self.relay.kernel(kernel_id)
        except Exception as error:
            log.error("Kernel %s: cannot link to it: %s", kernel_id, error)
            return web.Response(status=502, text=f"cannot link to kernel {kernel_id}")
        admitted = await self.upstream.admit(request, kernel_id)
        if admitted != 101:
            return web.Response(status=admitted, text=f"jupyter-server refused: {admitted}")
        try:
            session_id, replay = channel_options(request.query)
        except ValueError as error:
            return web.Response(status=400, text=str(error))
        relay = self.relay.kernels.get(kernel_id)
        if relay is None:
            return web.Response(status=502, text=f"cannot link to kernel {kernel_id}")

        ws = web.WebSocketResponse(
            protocols=(V1_SUBPROTOCOL,), max_msg_size=self.settings.max_frame_size, autoping=False
        )
        await ws.prepare(request)
        client = Client(
            client_id=uuid.uuid4().hex,
            kernel_id=kernel_id,
            session_id=session_id,
            protocol=ws.ws_protocol or LEGACY,
            username=(identity or {}).get("username"),
            identity_json=json.dumps(identity) if identity is not None else None,
            remote=request.remote,
            max_queued=self.settings.max_client_queue,
            max_queued_bytes=self.settings.max_client_queue_bytes,
            expose_seq=replay is not None,
        )
        resumed = await self.replayer.starting_point(client, replay)
        if not resumed:  # live from here on, told the kernel's current state first
            client.sent_seq = self.writer.last_seq
            client.preface = relay.current_state(client)
        self._sockets[client] = ws
        relay.attach(client)
        relay.confirm_delivery(client, client.sent_seq)
        log.info(
            "Client %s (%s) joined kernel %s [%s]%s",
            client.client_id[:8], client.username, kernel_id, client.protocol,
            f", resuming after {client.sent_seq}" if resumed else "",
        )  # fmt: skip
        pump = asyncio.ensure_future(self._pump(client, ws))
        try:
            await self._receive(client, relay, ws)
        finally:
            client.said_goodbye = ws.close_code in _GOODBYE
            relay.detach(client)
            del self._sockets[client]
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            log.info("Client %s left kernel %s", client.client_id[:8], kernel_id)
        return ws

    async def _receive(self, client: Client, relay: KernelRelay, ws: web.WebSocketResponse) -> None:
        async for frame in ws:
            if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                try:
                    message = decode_client_frame(
                        client.protocol, frame.data, max_size=self.settings.max_frame_size
                    )
                except FrameError as error:
                    code = CLOSE_TOO_BIG if error.too_big else CLOSE_MALFORMED
                    await self._refuse(client, ws, code, f"bad frame: {error}")
                    return
                allowed = self.settings.allowed_message_types
                if allowed and message.msg_type not in allowed:
                    log.warning('Received message of type "%s", which is not allowed. Ignoring.',
                                message.msg_type[:64])  # fmt: skip
                    continue
                try:
                    relay.from_client(client, message)
                except RequestRefused as error:
                    await self._refuse(client, ws, CLOSE_POLICY, str(error))
                    return
            elif frame.type == aiohttp.WSMsgType.PING:
                await ws.pong(frame.data)
            elif frame.type == aiohttp.WSMsgType.PONG and len(frame.data) == 8:
                relay.confirm_delivery(client, _SEQ.unpack(frame.data)[0])
            elif frame.type == aiohttp.WSMsgType.ERROR:
                log.warning("Client %s: %s", client.client_id[:8], ws.exception())

    async def _refuse(
        self, client: Client, ws: web.WebSocketResponse, code: int, reason: str
    ) -> None:
        """Close a client's websocket for what it sent, saying why (in at most 123 bytes,
        the most a close frame carries)."""
        log.warning("Client %s (%s): %s", client.client_id[:8], client.username, reason)
        await ws.close(code=code, message=reason.encode()[:123].decode(errors="ignore").encode())

    async def _pump(self, client: Client, ws: web.WebSocketResponse) -> None:
        hidden = self.hides_from(client) if self.hides_from is not None else None

        async def send(message: Message) -> None:
            if hidden is not None and hidden(message):
                return
            frame = (with_seq(message) if client.expose_seq else message).encoded(client.protocol)
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)

        async def confirm(seq: int) -> None:
            await ws.ping(_SEQ.pack(seq))  # its pong acknowledges everything sent before

        with contextlib.suppress(ConnectionError, RuntimeError):  # closed under us: _receive ends
            await client.pump(send, confirm, self.replayer, lambda: self.writer.last_seq)
