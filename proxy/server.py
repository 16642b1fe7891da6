"""The proxy's HTTP face: kernel channels it understands, everything else forwarded untouched.

Request and response bodies stream through in chunks (a 1 GB upload or download is never held
in memory); websockets it does not understand (Y rooms, terminals, events) are piped frame by
frame with their subprotocol and close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import zmq.asyncio
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .api import AuditApi
from .codecs import LEGACY, V1_SUBPROTOCOL, FrameError, Message, decode_client_frame, with_seq
from .execution import ServerExecutor
from .links import LinkContext, WebsocketLink, ZmqLink, connection_file
from .metrics import RelayCounts, exposition, registry_for
from .relay import Client, KernelRelay, Relay, RequestRefused, Tap, in_background
from .spool import Spool, SpoolReader
from .taps.log import LogWriter
from .taps.replay import Replayer, channel_options
from .taps.yfold import OutputFolder
from .upstream import (
    HOP_BY_HOP,
    Upstream,
    forwarded_headers,
    is_kernel_id,
    is_placeholder_path,
    redact,
)
from .yroom import NotebookRoom, collaboration_problem

log = logging.getLogger("jupyter_replay_proxy")

#: Path of the proxy's own endpoints, below the base URL.
OWN_PREFIX = "replay-proxy/"
_APP_PAGES = ("lab", "doc", "notebooks", "tree", "edit", "consoles")  # pages with page config
#: The proxy's frontend plugin (input() of server-side executions), as a federated extension.
LABEXTENSION = "jupyter-replay-proxy"
_LABEXTENSION = (Path(__file__).parent / "labextension" / "remoteEntry.js").read_bytes()

CLOSE_MALFORMED = 1007  # RFC 6455: data inconsistent with the message type
CLOSE_POLICY = 1008  # RFC 6455: a message that violates policy
CLOSE_TOO_BIG = 1009
_SEQ = struct.Struct("<Q")
_RESTART = re.compile(r"api/kernels/([^/]+)/restart")
CLOSE_KERNEL_GONE = 1001
#: Close codes of a frontend that closed on purpose (aiohttp reads a close frame without a
#: code as 0): normal, going away (a tab closed), no status.
_GOODBYE = (0, 1000, 1001, 1005)


@dataclass
class ProxySettings:
    """What the proxy application needs to run; filled from traitlets config by proxy.app."""

    runtime_dir: Path
    link: str = "auto"  # "auto", "zmq" or "websocket"
    max_frame_size: int = 64 * 1024 * 1024
    max_client_queue: int = 10_000
    max_client_queue_bytes: int = 8 * 1024 * 1024
    replay_window: float = 24 * 3600
    kernel_poll_interval: float = 1.0
    websocket_link_session_id: str = ""
    allowed_message_types: frozenset[str] = frozenset()  # empty: all, as in jupyter-server
    link_namespace: str = "replay-proxy"  # the log's path: stable ids per (log, kernel)
    write_outputs: bool = True  # take over outputs of executions whose client left
    server_side_execution: bool = True  # serve POST /api/kernels/{id}/execute; pages use it
    handoff_grace: float = 5.0  # seconds a client may be gone before the proxy writes for it
    spool_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spool-")))
    """where the kernels' iopub waits until it is in the log (beside the log: it outlives a
    proxy that is killed, for the next one)"""


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close a client's websocket, not waiting long: one that stopped reading never answers,
    and its connection, with unsent data, would never finish closing: abort it."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 2)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        transport = ws._req.transport if ws._req is not None else None
        if transport is not None:
            transport.abort()


class AccessLogger(AbstractAccessLogger):
    """Jupyter-style access lines, with tokens hidden."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.DEBUG if response.status < 400 else logging.WARNING
        self.logger.log(
            level, "%d %s %s (%s) %.2fms", response.status, request.method,
            redact(request.path_qs), request.remote, time * 1000,
        )  # fmt: skip


class ReplayProxy:
    """Wires upstream, relay, links and taps into one aiohttp application."""

    def __init__(
        self,
        upstream: Upstream,
        writer: LogWriter,
        settings: ProxySettings,
        connect: Callable[[], sqlite3.Connection],
    ) -> None:
        self.upstream = upstream
        self.writer = writer
        self.settings = settings
        self.replayer = Replayer(writer, connect, window=settings.replay_window)
        self._notebooks: dict[str, str] = {}  # kernel id → its notebook's path, as last seen
        self.audit = AuditApi(upstream, connect, lambda: set(self.relay.kernels))
        self.counts = RelayCounts()
        self.taps: list[Tap] = [writer, self.replayer, self.counts]
        self.folder: OutputFolder | None = None
        if settings.write_outputs:
            self.folder = OutputFolder(
                lambda path: NotebookRoom(upstream, path),
                self._notebooks.get,
                grace=settings.handoff_grace,
            )
            self.taps.append(self.folder)
        self.collaboration_error: str | None = None
        self.relay = Relay(self._make_link, self.taps, writer, self.replayer.remember)
        self.relay.on_kernel_gone.append(self._close_clients)
        self.executor: ServerExecutor | None = None
        if self.folder is not None and settings.server_side_execution:
            self.executor = ServerExecutor(
                self.relay, upstream, self.folder, self._notebooks.get, self.replayer,
                lambda: writer.last_seq,
            )  # fmt: skip
            self.taps.append(self.executor)
        self.zmq_context = zmq.asyncio.Context()
        self.spools = SpoolReader(settings.spool_dir)
        self.link_context = LinkContext(
            upstream, self.zmq_context, self.spools, writer, self.replayer.recently_logged
        )
        self._sockets: dict[Client, web.WebSocketResponse] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self.upstream_error: str | None = None
        self.registry = registry_for(self)

    # --- application -----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_frame_size)
        base = self.upstream.base_url
        app.router.add_get(base + "api/kernels/{kernel_id}/channels", self.channels)
        app.router.add_get(base + OWN_PREFIX + "api/status", self.status)
        app.router.add_get(base + OWN_PREFIX + "metrics", self.metrics)
        if self.executor is not None:
            self.executor.add_routes(app, base)
            app.router.add_get(
                base + f"lab/extensions/{LABEXTENSION}/remoteEntry.js", self.labextension
            )
        self.audit.add_routes(app, base + OWN_PREFIX + "api/")
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        await self.upstream.start()
        self._poller = asyncio.ensure_future(self._follow_kernels())
        if self.folder is not None:
            in_background(self._check_collaboration())

    async def _check_collaboration(self) -> None:
        self.collaboration_error = await collaboration_problem(self.upstream)
        if self.collaboration_error:
            log.warning("%s", self.collaboration_error)

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.gather(
            *(
                _close(ws, aiohttp.WSCloseCode.GOING_AWAY, "proxy shutting down")
                for ws in list(self._sockets.values())
            )
        )

    async def _cleanup(self, app: web.Application) -> None:
        self._closing = True
        if self._poller is not None:  # stopped before the upstream session it polls with closes
            self._poller.cancel()
            await asyncio.wait([self._poller], timeout=5)
        if self.executor is not None:
            await self.executor.close()
        if self.folder is not None:
            await self.folder.close()
        await self.relay.close()
        await self.spools.close()
        await self.upstream.close()
        self.zmq_context.destroy(linger=0)  # every link closed its sockets; never hang on one
        self.replayer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.flush)

    async def refresh_kernels(self) -> None:
        """Follow the kernels jupyter-server has now."""
        listed_at = time.monotonic()
        try:
            running = await self.upstream.running_kernels()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            message = f"cannot list kernels at {self.upstream}: {error}"
            if message != self.upstream_error:
                log.warning("%s", redact(message))
            self.upstream_error = message
            return
        self.upstream_error = None
        await self._note_notebooks()  # first: a takeover after a restart looks its notebook up
        await self.relay.sync(running, listed_at)

    async def _note_notebooks(self) -> None:
        """Log which notebook each kernel serves, when that is new: the audit trail's paths."""
        try:
            sessions = await self.upstream.sessions()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return  # a server without sessions (or a moment's failure): kernels only
        for session in sessions:
            kernel_id = (session.get("kernel") or {}).get("id")
            path = session.get("path")
            known = self._notebooks.get(kernel_id)
            if (
                isinstance(kernel_id, str) and isinstance(path, str) and known != path
                and not is_placeholder_path(path)
            ):  # fmt: skip
                self._notebooks[kernel_id] = path
                self.writer.notebook_seen(kernel_id, path, session.get("type"))

    async def _follow_kernels(self) -> None:
        while not self._closing:
            await self.refresh_kernels()
            await asyncio.sleep(self.settings.kernel_poll_interval)

    def _make_link(self, kernel_id: str, deliver: Any, gone: Any) -> Any:
        path = connection_file(self.settings.runtime_dir, kernel_id)
        if self.settings.link != "websocket":
            try:
                stable_id = uuid.uuid5(
                    uuid.NAMESPACE_URL, f"{self.settings.link_namespace}/{kernel_id}"
                )
                return ZmqLink.from_file(
                    path, kernel_id, str(stable_id), deliver, gone, self.link_context
                )
            except (OSError, ValueError, KeyError) as error:
                if self.settings.link == "zmq":
                    raise
                log.debug("Kernel %s: no zmq link (%s)", kernel_id, error)
        return WebsocketLink(
            kernel_id, self.settings.websocket_link_session_id, self.upstream, deliver, gone
        )

    async def _close_clients(self, relay: KernelRelay) -> None:
        sockets = [self._sockets.get(client) for client in list(relay.clients.values())]
        await asyncio.gather(
            *(_close(ws, CLOSE_KERNEL_GONE, "kernel shut down") for ws in sockets if ws is not None)
        )

    # --- kernel channels -------------------------------------------------------------------

    async def channels(self, request: web.Request) -> web.StreamResponse:
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
        hidden = self.folder.hides_from(client) if self.folder is not None else None

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

    # --- the proxy's own endpoints ---------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        """The proxy's health, showing a caller only the kernels jupyter-server lets them
        read; the figures that cover every kernel only to a caller who may read them all."""
        visible = await self.audit.authorize(request)
        relays = [
            relay for kernel_id, relay in self.relay.kernels.items()
            if visible is None or kernel_id in visible
        ]  # fmt: skip
        kernels = [
            {
                "id": relay.kernel_id,
                "link": relay.link.kind,
                "clients": len(relay.clients),
                **(
                    {
                        # the most iopub bytes that waited because the relay or the log fell behind
                        "spool_peak": relay.link.iopub.peak,
                        # the disk refused the kernel's output: it waits in memory
                        "spool_in_memory": relay.link.iopub.in_memory,
                        # dropped with the disk full and too much waiting in memory
                        "spool_dropped": relay.link.iopub.dropped,
                    }
                    if isinstance(relay.link, ZmqLink)
                    else {}
                ),
            }
            for relay in relays
        ]
        clients = [
            {
                "kernel": client.kernel_id, "user": client.username, "protocol": client.protocol,
                "sent_seq": client.sent_seq, "confirmed_seq": client.confirmed_seq,
                "behind": client.behind, "times_behind": client.times_behind,
                "resent": client.resent,
            }
            for relay in relays for client in relay.clients.values()
        ]  # fmt: skip
        status: dict[str, Any] = {"version": __version__, "kernels": kernels, "clients": clients}
        if visible is None:
            status["upstream"] = {"url": str(self.upstream), "error": self.upstream_error}
            status["log"] = asdict(self.writer.health())
            status["spool"] = {
                "reader_pid": self.spools.pid, "standby_pid": self.spools.standby_pid,
                "failovers": self.spools.promotions, "dropped": self.spools.dropped,
            }  # fmt: skip
            status["outputs"] = {
                "enabled": self.folder is not None,
                "collaboration_error": self.collaboration_error,
                "rooms": sorted(self.folder.rooms) if self.folder else [],
            }
        return web.json_response(status)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics, to whom jupyter-server shows its own /metrics."""
        allowed = await self.upstream.metrics_allowed(request)
        if allowed != 200:
            return web.json_response(
                {"message": "jupyter-server does not show its metrics to the caller"},
                status=401 if allowed == 401 else 403,
            )
        return web.Response(
            body=exposition(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def kernel_running(self, kernel_id: str) -> bool:
        """Whether the kernel runs a cell, or has a request to answer still."""
        relay = self.relay.kernels.get(kernel_id)
        if relay is None:
            return False
        status = relay.last_status
        return relay.awaits_replies() or (status is not None and b'"idle"' not in status.parts[3])

    def kernel_spools(self) -> list[Spool]:
        """The iopub spools of the zmq-linked kernels."""
        return [
            relay.link.iopub
            for relay in self.relay.kernels.values()
            if isinstance(relay.link, ZmqLink)
        ]

    # --- everything else -------------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request)
        response = await self._forward_http(request)
        if request.method == "POST" and request.path.startswith(
            (self.upstream.base_url + "api/kernels", self.upstream.base_url + "api/sessions")
        ):
            restarted = _RESTART.fullmatch(request.path[len(self.upstream.base_url) :])
            relay = self.relay.kernels.get(restarted[1]) if restarted else None
            if relay is not None and response.status == 200:
                relay.link.resync()  # before any request of the client can reach the kernel
                if self.executor is not None:
                    self.executor.kernel_restarted(relay.kernel_id)
                if self.folder is not None:
                    self.folder.kernel_restarted(relay.kernel_id)
            in_background(self.refresh_kernels())  # link to a new kernel at once
        return response

    async def _forward_http(self, request: web.Request) -> web.StreamResponse:
        url = self.upstream.url(request.path_qs)
        body = request.content if request.body_exists else None
        headers = forwarded_headers(request.headers)
        if self._may_be_app_page(request):
            headers.popall("Accept-Encoding", None)  # its page config is rewritten: plain text
        try:
            upstream = await self.upstream.http.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientError as error:
            log.warning(
                "Upstream request failed: %s %s: %s", request.method, redact(request.path), error
            )
            return web.Response(status=502, text="jupyter-server is not reachable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if self._is_app_page(request, upstream):
                return await self._serve_page(request, upstream, response)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
        return response

    async def labextension(self, request: web.Request) -> web.Response:
        """The plugin the app pages load: shows a cell's input() prompt of a server-side
        execution (stock JupyterLab only shows prompts of requests it sent itself)."""
        return web.Response(
            body=_LABEXTENSION,
            content_type="application/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    def _may_be_app_page(self, request: web.Request) -> bool:
        """A request for a JupyterLab or Notebook 7 page, whose page config turns server-side
        execution on."""
        return (
            self.executor is not None
            and self.collaboration_error is None  # the option is jupyter-collaboration's
            and request.method == "GET"
            and request.path.startswith(tuple(self.upstream.base_url + p for p in _APP_PAGES))
        )

    def _is_app_page(self, request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
        return (
            self._may_be_app_page(request)
            and upstream.status == 200
            and upstream.content_type == "text/html"
            and "Content-Encoding" not in upstream.headers
        )

    async def _serve_page(
        self, request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> web.StreamResponse:
        page = await upstream.read()
        marker = b'<script id="jupyter-config-data" type="application/json">'
        start = page.find(marker) + len(marker)
        end = page.find(b"</script>", start)
        if start >= len(marker) and end >= 0:
            try:
                config = json.loads(page[start:end])
            except ValueError:
                log.warning("Cannot read the page config of %s", request.path)
            else:  # jupyter-collaboration writes it too, as false; the lab reads "true" only
                config["serverSideExecution"] = "true"
                if config.get("fullLabextensionsUrl") == self.upstream.base_url + "lab/extensions":
                    extensions = config.setdefault("federated_extensions", [])
                    extensions.append(
                        {"name": LABEXTENSION, "load": "remoteEntry.js", "extension": "./extension"}
                    )
                rewritten = json.dumps(config).replace("</", "<\\/").encode()
                page = page[:start] + rewritten + page[end:]
        response.headers.popall("Content-Length", None)
        response.content_length = len(page)
        await response.prepare(request)
        await response.write(page)
        await response.write_eof()
        return response

    async def _forward_websocket(self, request: web.Request) -> web.StreamResponse:
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            upstream = await self.upstream.http.ws_connect(
                self.upstream.url(request.path_qs), headers=forwarded_headers(request.headers),
                protocols=protocols, max_msg_size=0, autoping=False, autoclose=False,
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as error:
            return web.Response(status=error.status, text=error.message)
        except aiohttp.ClientError as error:
            log.warning("Upstream websocket failed: %s: %s", redact(request.path), error)
            return web.Response(status=502, text="jupyter-server is not reachable")
        downstream = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=0, autoping=False, autoclose=False,
        )  # fmt: skip
        await downstream.prepare(request)

        async def pipe(
            source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        ) -> None:
            async for frame in source:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    await target.send_str(frame.data)
                elif frame.type == aiohttp.WSMsgType.BINARY:
                    await target.send_bytes(frame.data)
                elif frame.type == aiohttp.WSMsgType.PING:
                    await target.ping(frame.data)
                elif frame.type == aiohttp.WSMsgType.PONG:
                    await target.pong(frame.data)
                elif frame.type == aiohttp.WSMsgType.CLOSE:
                    await target.close(
                        code=frame.data or 1000, message=(frame.extra or "").encode()
                    )
                    break
            if not target.closed:
                await target.close(code=source.close_code or 1000)

        tasks = [
            asyncio.ensure_future(pipe(downstream, upstream)),
            asyncio.ensure_future(pipe(upstream, downstream)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()
            await downstream.close()
        return downstream
