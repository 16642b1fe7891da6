"""The composition root: wires upstream, relay, links and taps into one aiohttp application,
follows jupyter-server's kernels, and serves the proxy's own status and metrics.

The kernel channels are :mod:`proxy.channels`'; everything else is forwarded untouched by
:mod:`proxy.passthrough` (app pages rewritten by :mod:`proxy.pages`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import aiohttp
import zmq.asyncio
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .api import AuditApi
from .channels import ChannelsHandler
from .execution import ServerExecutor
from .links import LinkContext, WebsocketLink, ZmqLink, connection_file
from .metrics import RelayCounts, exposition, registry_for
from .pages import AppPages
from .passthrough import PassThrough
from .relay import Background, Relay, Tap
from .rooms import RoomPool
from .settings import ProxySettings
from .spool import Spool, SpoolReader
from .taps.log import LogWriter
from .taps.replay import Replayer
from .taps.yfold import OutputFolder
from .upstream import Upstream, is_placeholder_path, redact
from .yroom import NotebookRoom, collaboration_problem

log = logging.getLogger("jupyter_replay_proxy")

#: Path of the proxy's own endpoints, below the base URL.
OWN_PREFIX = "replay-proxy/"
_RESTART = re.compile(r"api/kernels/([^/]+)/restart")


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
        self.background = Background()
        self.rooms = RoomPool(lambda path: NotebookRoom(upstream, path), self.background)
        self.folder: OutputFolder | None = None
        if settings.write_outputs:
            self.folder = OutputFolder(
                self.rooms, self._notebooks.get, self.replayer.read, grace=settings.handoff_grace
            )
            self.taps.append(self.folder)
        self.collaboration_error: str | None = None
        self.relay = Relay(
            self._make_link, self.taps, writer, self.background, self.replayer.remember
        )
        self.executor: ServerExecutor | None = None
        if self.folder is not None and settings.server_side_execution:
            self.executor = ServerExecutor(
                self.relay, upstream, self.rooms, self.notebook_of, self.replayer,
                lambda: writer.last_seq,
            )  # fmt: skip
            self.taps.append(self.executor)
        self.zmq_context = zmq.asyncio.Context()
        self.spools = SpoolReader(settings.spool_dir)
        self.link_context = LinkContext(
            upstream, self.zmq_context, self.spools, writer, self.replayer.recently_logged,
            self.background,
        )  # fmt: skip
        pages = AppPages(upstream.base_url, self._serves_server_side_execution)
        self.passthrough = PassThrough(upstream, pages, self._answered)
        self.channels = ChannelsHandler(
            upstream, self.relay, writer, self.replayer, settings,
            self.folder.hides_from if self.folder is not None else None,
            self.passthrough.forward,
        )  # fmt: skip
        self.relay.on_kernel_gone.append(self.channels.close_clients)
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self.upstream_error: str | None = None
        self.registry = registry_for(self)

    # --- application -----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_frame_size)
        base = self.upstream.base_url
        app.router.add_get(base + "api/kernels/{kernel_id}/channels", self.channels.handle)
        app.router.add_get(base + OWN_PREFIX + "api/status", self.status)
        app.router.add_get(base + OWN_PREFIX + "metrics", self.metrics)
        if self.executor is not None:
            self.executor.add_routes(app, base)
            self.passthrough.pages.add_routes(app)
        self.audit.add_routes(app, base + OWN_PREFIX + "api/")
        app.router.add_route("*", "/{tail:.*}", self.passthrough.forward)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        await self.upstream.start()
        self._poller = asyncio.ensure_future(self._follow_kernels())
        if self.folder is not None:
            self.background.run(self._check_collaboration())

    async def _check_collaboration(self) -> None:
        self.collaboration_error = await collaboration_problem(self.upstream)
        if self.collaboration_error:
            log.warning("%s", self.collaboration_error)

    async def _shutdown(self, app: web.Application) -> None:
        await self.channels.close_all()

    def _serves_server_side_execution(self) -> bool:
        """Whether app pages get server-side execution turned on: the option is
        jupyter-collaboration's, and the proxy serves the endpoint."""
        return self.executor is not None and self.collaboration_error is None

    def _answered(self, request: web.Request, status: int) -> None:
        """jupyter-server answered a POST to its kernels or sessions API or a session's PATCH:
        a kernel may have started (linked at once, not at the next poll) or restarted, or a
        notebook got its kernel."""
        restarted = _RESTART.fullmatch(request.path[len(self.upstream.base_url) :])
        relay = self.relay.kernels.get(restarted[1]) if restarted else None
        if relay is not None and status == 200:
            relay.restarted()  # (jupyter-server tells its websockets of none it was asked)
        self.background.run(self.refresh_kernels())

    async def _cleanup(self, app: web.Application) -> None:
        self._closing = True
        if self._poller is not None:  # stopped before the upstream session it polls with closes
            self._poller.cancel()
            await asyncio.wait([self._poller], timeout=5)
        if self.executor is not None:
            await self.executor.close()
        if self.folder is not None:
            self.folder.close()
        await self.rooms.close()
        await self.relay.close()
        await self.background.cancel()
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

    async def notebook_of(self, kernel_id: str) -> str | None:
        """The notebook a kernel serves: as last noted, else as jupyter-server's sessions say
        now (JupyterLab names it in a PATCH just after creating the session, and may run a
        cell at once)."""
        if kernel_id not in self._notebooks:
            await self._note_notebooks()
        return self._notebooks.get(kernel_id)

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
            kernel_id, self.settings.websocket_link_session_id, self.upstream, deliver, gone,
            self.background,
        )  # fmt: skip

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
                "rooms": sorted(self.rooms.rooms),
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
