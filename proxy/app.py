"""Command line and configuration, in the style of every Jupyter application.

``jupyter-replay-proxy lab`` spawns JupyterLab behind the proxy; ``serve`` fronts a running
jupyter-server; ``migrate`` brings a log database up to date. Each is configurable from
``jupyter_replay_proxy_config.py``, flags, and (for the upstream token) ``JUPYTER_TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import sys
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web
from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default

from . import __version__
from .audit import parse_duration
from .database import (
    NewerSchemaError,
    SchemaError,
    available_migrations,
    connect,
    migrate,
    open_database,
)
from .logs import route_to
from .retention import Policy, parse_size
from .server import AccessLogger, ProxySettings, ReplayProxy
from .taps.log import LogWriter, Redactor
from .upstream import Upstream, redact

_common_aliases = {
    "ip": "ProxyApp.ip",
    "port": "ProxyApp.port",
    "db": "DatabaseApp.db",
    "link": "ProxyApp.link",
    "log-level": "Application.log_level",
    "config": "JupyterApp.config_file",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_state(conn, key: str, make: str) -> str:  # type: ignore[no-untyped-def]
    """A durable fact of the proxy, created on first use (e.g. its websocket session_id)."""
    row = conn.execute("SELECT value FROM proxy_state WHERE key = ?", (key,)).fetchone()
    if row:
        return row[0]
    conn.execute("INSERT INTO proxy_state (key, value) VALUES (?, ?)", (key, make))
    return make


class DatabaseApp(JupyterApp):
    """What every command shares: the log database."""

    version = __version__
    aliases = {"db": "DatabaseApp.db", "log-level": "Application.log_level"}

    db = Unicode(
        "",
        config=True,
        help="SQLite file of the message log "
        "(default: <Jupyter data dir>/replay-proxy/log.sqlite).",
    )

    @default("db")
    def _default_db(self) -> str:
        return str(Path(self.data_dir) / "replay-proxy" / "log.sqlite")


class ProxyApp(DatabaseApp):
    """What `serve` and `lab` share: where the proxy listens and how it keeps its log."""

    aliases = _common_aliases

    ip = Unicode("127.0.0.1", config=True, help="Interface the proxy listens on.")
    port = Integer(8888, config=True, help="Port the proxy listens on.")
    log_flush_interval = Float(
        0.05,
        config=True,
        help="Longest the log writer sleeps when idle; rows are committed as soon as they come "
        "(whatever came during the previous commit in one transaction).",
    )
    max_frame_size = Integer(
        64 * 1024 * 1024,
        config=True,
        help="Largest websocket frame (bytes) a client may send; larger ones close its socket.",
    )
    max_client_queue = Integer(
        10_000,
        config=True,
        help="Messages queued for one client before it counts as behind and reads from the log "
        "instead, until it has caught up.",
    )
    max_client_queue_bytes = Integer(
        8 * 1024 * 1024, config=True, help="The same bound, in bytes of queued messages."
    )
    replay_window = Float(
        24 * 3600.0,
        config=True,
        help="Seconds a session's position is kept for: a client reconnecting with the same "
        "session_id within it receives everything it missed.",
    )
    link = Enum(
        ["auto", "zmq", "websocket"],
        "auto",
        config=True,
        help="How to reach kernels: 'zmq' straight to the kernel (lossless; needs its "
        "connection file), 'websocket' through jupyter-server (its rate limit applies), "
        "'auto' zmq where the connection file is readable.",
    )
    kernel_runtime_dir = Unicode(
        "",
        config=True,
        help="Where jupyter-server writes kernel connection files (default: the Jupyter "
        "runtime dir).",
    )
    kernel_poll_interval = Float(
        1.0, config=True, help="Seconds between looks at jupyter-server's list of kernels."
    )
    allowed_message_types = List(
        Unicode(),
        config=True,
        help="Message types clients may send (empty: all). Set it to jupyter-server's "
        "MappingKernelManager.allowed_message_types: with the zmq link the proxy enforces it "
        "itself; `lab` passes it on to the server it spawns.",
    )
    write_outputs = Bool(
        True,
        config=True,
        help="Write the outputs of executions whose client left (closed tab) into the "
        "notebook's collaborative document (needs jupyter-collaboration upstream).",
    )
    server_side_execution = Bool(
        True,
        config=True,
        help="Serve POST /api/kernels/{id}/execute (JupyterLab's server-side cell executor, "
        "jupyter-server-nbmodel's API) and turn JupyterLab's serverSideExecution on in the "
        "pages it serves: the proxy runs cells and writes their outputs.",
    )
    handoff_grace = Float(
        5.0,
        config=True,
        help="Seconds the client that ran a cell may be gone (e.g. reconnecting) before the "
        "proxy writes that execution's outputs in its place.",
    )
    redact_patterns = List(
        Unicode(),
        config=True,
        help="Regular expressions whose matches in message content and metadata (code, "
        "outputs) are replaced by [redacted] before they are logged, e.g. "
        r"'(?i)password\s*=\s*\S+'. Replays from the log carry the redacted text.",
    )
    log_max_buffer_size = Integer(
        0,
        config=True,
        help="Binary buffers larger than this many bytes are not logged (their size is); "
        "0 logs every buffer.",
    )
    retention_older_than = Unicode(
        "",
        config=True,
        help="Delete logged messages older than this (e.g. 30d, 12h); empty keeps them.",
    )
    retention_max_size = Unicode(
        "",
        config=True,
        help="Delete the oldest logged messages while the log is larger than this (e.g. 2GB); "
        "empty sets no bound.",
    )
    retention_interval = Float(
        3600.0, config=True, help="Seconds between applications of the retention options."
    )

    @default("kernel_runtime_dir")
    def _default_kernel_runtime_dir(self) -> str:
        return jupyter_runtime_dir()

    def settings(self, session_id: str) -> ProxySettings:
        return ProxySettings(
            runtime_dir=Path(self.kernel_runtime_dir),
            link=self.link,
            max_frame_size=self.max_frame_size,
            max_client_queue=self.max_client_queue,
            max_client_queue_bytes=self.max_client_queue_bytes,
            replay_window=self.replay_window,
            kernel_poll_interval=self.kernel_poll_interval,
            websocket_link_session_id=session_id,
            allowed_message_types=frozenset(self.allowed_message_types),
            link_namespace=str(Path(self.db).resolve()),
            spool_dir=Path(self.db).resolve().parent,
            write_outputs=self.write_outputs,
            server_side_execution=self.server_side_execution,
            handoff_grace=self.handoff_grace,
        )

    async def run_proxy(self, upstream: Upstream, stop: asyncio.Event, lab_url: str = "") -> None:
        """Serve until `stop` is set; the log is flushed before returning."""
        route_to(self.log.handlers, self.log_level)
        session_id = uuid.uuid4().hex
        try:
            conn = open_database(self.db)
        except NewerSchemaError as error:
            self.log.critical("%s", error)
            sys.exit(2)
        except SchemaError as error:  # corrupt or unreadable: relay anyway, report, retry
            self.log.error("%s; relaying without a log until it is writable", error)
        else:
            session_id = proxy_state(conn, "websocket_link_session_id", session_id)
            conn.close()
        try:
            redactor = Redactor(self.redact_patterns)
            retention = Policy(
                parse_duration(self.retention_older_than) if self.retention_older_than else None,
                parse_size(self.retention_max_size) if self.retention_max_size else None,
                self.retention_interval,
            )
        except (re.error, ValueError) as error:
            self.log.critical("Bad configuration: %s", error)
            sys.exit(2)
        writer = LogWriter(
            lambda: open_database(self.db),
            flush_interval=self.log_flush_interval,
            redactor=redactor,
            max_buffer_size=self.log_max_buffer_size or None,
        )
        proxy = ReplayProxy(upstream, writer, self.settings(session_id), lambda: connect(self.db))
        runner = web.AppRunner(
            proxy.make_app(),
            access_log_class=AccessLogger,
            access_log=self.log,
            handle_signals=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.ip, self.port)
        await site.start()
        self.log.info("Message log: %s", self.db)
        self.log.info(
            "Proxying %s at http://%s:%d%s", upstream, self.ip, self.port, upstream.base_url
        )
        if lab_url:
            print(f"\n    JupyterLab, through jupyter-replay-proxy:\n    {lab_url}\n", flush=True)
        retaining = None
        if retention.active:
            retaining = asyncio.ensure_future(
                retention.apply_periodically(lambda: connect(self.db))
            )
        try:
            await stop.wait()
        finally:
            self.log.info("Shutting down the proxy")
            if retaining is not None:
                retaining.cancel()
            await runner.cleanup()
            writer.close()

    def _stop_event(self) -> asyncio.Event:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return stop


class ServeApp(ProxyApp):
    name = "jupyter-replay-proxy-serve"
    description = "Put the proxy in front of a running jupyter-server."
    aliases = {
        **_common_aliases,
        "upstream": "ServeApp.upstream",
        "upstream-token": "ServeApp.upstream_token",
    }

    upstream = Unicode(
        "http://127.0.0.1:8888/", config=True, help="URL (with base URL) of the jupyter-server."
    )
    upstream_token = Unicode(
        "",
        config=True,
        help="The proxy's own token for jupyter-server (default: $JUPYTER_TOKEN, else the "
        "token in the server's jpserver-*.json when it runs on this machine).",
    )

    @default("port")
    def _default_port(self) -> int:
        return 8889

    def discover_token(self) -> str:
        if self.upstream_token:
            return self.upstream_token
        if os.environ.get("JUPYTER_TOKEN"):
            return os.environ["JUPYTER_TOKEN"]
        wanted = Upstream(self.upstream, None)
        for path in Path(self.kernel_runtime_dir).glob("jpserver-*.json"):
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(path.read_text())
                if Upstream(info["url"], None).origin.port == wanted.origin.port:
                    return info.get("token", "")
        self.log.warning("No token for %s: the proxy will follow kernels anonymously", wanted)
        return ""

    def start(self) -> None:
        try:
            upstream = Upstream(self.upstream, self.discover_token())
        except ValueError as error:
            self.log.critical("%s", error)
            sys.exit(2)

        async def main() -> None:
            await self.run_proxy(upstream, self._stop_event())

        asyncio.run(main())


class LabApp(ProxyApp):
    name = "jupyter-replay-proxy-lab"
    description = "Start JupyterLab (with jupyter-collaboration) behind the proxy."
    aliases = {**_common_aliases, "root-dir": "LabApp.root_dir"}

    root_dir = Unicode("", config=True, help="Directory JupyterLab serves (default: here).")
    lab_args = List(
        Unicode(), config=True, help="Extra command-line arguments for the spawned jupyter lab."
    )
    open_browser = Bool(False, config=True, help="Open a browser on the proxied URL.")

    async def _spawn_lab(self, port: int, token: str) -> asyncio.subprocess.Process:
        args = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ZMQChannelsWebsocketConnection.limit_rate=False",
            *([f"--ServerApp.root_dir={self.root_dir}"] if self.root_dir else []),
            *(["--allow-root"] if os.geteuid() == 0 else []),  # the user chose to run as root
            *(
                [f"--MappingKernelManager.allowed_message_types={self.allowed_message_types!r}"]
                if self.allowed_message_types
                else []
            ),
            *self.lab_args,
        ]  # fmt: skip
        env = {**os.environ, "JUPYTER_TOKEN": token}  # not on the command line, where ps shows it
        return await asyncio.create_subprocess_exec(
            *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    async def _echo(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            sys.stderr.write("[lab] " + redact(line.decode(errors="replace")))

    async def _wait_ready(self, process: asyncio.subprocess.Process, url: str, token: str) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                if process.returncode is not None:
                    raise RuntimeError(f"jupyter lab exited with {process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    headers = {"Authorization": f"token {token}"}
                    async with http.get(url + "api/status", headers=headers) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError("jupyter lab did not start within 60 s")

    async def _stop_lab(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        process.terminate()  # jupyter-server shuts its kernels down on SIGTERM
        try:
            await asyncio.wait_for(process.wait(), 20)
        except asyncio.TimeoutError:
            self.log.warning("jupyter lab did not stop in 20 s; killing it")
            process.kill()
            await process.wait()

    def start(self) -> None:
        async def main() -> None:
            stop = self._stop_event()
            port, token = _free_port(), secrets.token_hex(24)
            upstream_url = f"http://127.0.0.1:{port}/"
            process = await self._spawn_lab(port, token)
            echo = asyncio.ensure_future(self._echo(process))
            try:
                await self._wait_ready(process, upstream_url, token)
                exited = asyncio.ensure_future(process.wait())
                exited.add_done_callback(lambda _: stop.set())
                lab_url = f"http://{self.ip}:{self.port}/lab?token={token}"
                if self.open_browser:
                    import webbrowser

                    webbrowser.open(lab_url)
                await self.run_proxy(Upstream(upstream_url, token), stop, lab_url)
            finally:
                await self._stop_lab(process)
                echo.cancel()

        try:
            asyncio.run(main())
        except RuntimeError as error:
            self.log.critical("%s", error)
            sys.exit(1)


class MigrateApp(ProxyApp):
    name = "jupyter-replay-proxy-migrate"
    description = "Apply the log database's pending schema migrations."

    def start(self) -> None:
        try:
            conn = connect(self.db)
            applied = migrate(conn)
        except (SchemaError, sqlite3.DatabaseError) as error:
            self.log.critical("%s", error)
            sys.exit(2)
        latest = max((m.version for m in available_migrations()), default=0)
        if applied:
            print(f"{self.db}: applied migrations {', '.join(map(str, applied))}")
        else:
            print(f"{self.db}: up to date at schema version {latest}")


class ReplayProxyApp(JupyterApp):
    name = "jupyter-replay-proxy"
    version = __version__
    description = (
        "A reverse proxy for jupyter-server that logs every kernel message to SQLite and "
        "replays what clients missed."
    )
    subcommands = {
        "lab": (LabApp, LabApp.description),
        "serve": (ServeApp, ServeApp.description),
        "migrate": (MigrateApp, MigrateApp.description),
        "log": ("proxy.audit_app.LogApp", "Show logged kernel messages; --follow tails them."),
        "transcript": (
            "proxy.audit_app.TranscriptApp",
            "Who ran what code, when, and what came out: one entry per execution.",
        ),
        "export": ("proxy.audit_app.ExportApp", "Rebuild a notebook (.ipynb) from the log."),
        "stats": ("proxy.audit_app.StatsApp", "Figures about the log."),
        "prune": ("proxy.audit_app.PruneApp", "Delete the oldest part of the log."),
    }

    def start(self) -> None:
        super().start()
        self.print_help()
        sys.exit(1)


def main() -> None:
    ReplayProxyApp.launch_instance()
