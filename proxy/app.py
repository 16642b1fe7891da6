"""Command line and configuration, in the style of every Jupyter application.

``jupyter-replay-proxy lab`` spawns JupyterLab behind the proxy; ``serve`` fronts a running
jupyter-server; ``migrate`` brings a log database up to date. Each is configurable from
``jupyter_replay_proxy_config.py``, flags, and (for the upstream token) ``JUPYTER_TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import aiohttp
from aiohttp import web
from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default
from traitlets.config.loader import KVArgParseConfigLoader, _KVArgParser
from yarl import URL

from . import __version__
from .allocator import return_free_memory
from .audit import parse_duration
from .database import (
    DatabasePathError,
    NewerSchemaError,
    SchemaError,
    available_migrations,
    connect,
    migrate,
    open_database,
)
from .logs import route_to
from .retention import Policy, parse_size
from .server import AccessLogger, ReplayProxy
from .settings import ProxySettings
from .taps.log import LogWriter, Redactor
from .upstream import Upstream, redact


class Prepared(NamedTuple):
    """What a proxy command sets up before it starts anything (see ProxyApp.prepare)."""

    listener: socket.socket
    session_id: str  # of the websocket link, kept in the log
    redactor: Redactor
    retention: Policy


class CommandError(Exception):
    """What was asked cannot be done. The text says what is wrong and what to do; the command
    prints it as one line (no traceback) and exits with `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _ArgumentParser(_KVArgParser):
    known: frozenset[str] = frozenset()  # the command's aliases and flags

    def error(self, message: str) -> NoReturn:
        # traitlets takes any --name for an option with a value: one without is unknown
        option = re.match(r"argument -+(?:\w+\.)?([\w-]+): expected one argument", message)
        if option and option[1] not in self.known and "." not in option[0]:
            raise CommandError(f"unknown option --{option[1]} (see --help)")
        if option:
            raise CommandError(f"option --{option[1]} needs a value (see --help)")
        raise CommandError(f"{message} (see --help)")


class _StrictArguments(KVArgParseConfigLoader):
    parser_class = _ArgumentParser

    def _create_parser(self) -> None:
        super()._create_parser()
        self.parser.known = frozenset([*self.aliases, *self.flags])

    def _handle_unrecognized_alias(self, arg: str) -> None:
        raise CommandError(f"unknown option --{arg} (see --help)")


class StrictApp(JupyterApp):
    """A Jupyter application whose unknown options and arguments are errors, not warnings: a
    mistyped --port must not start a server on the default port and database."""

    def _create_loader(
        self, argv: Any, aliases: Any, flags: Any, classes: Any
    ) -> KVArgParseConfigLoader:
        return _StrictArguments(
            argv, aliases, flags, classes=classes, log=self.log, subcommands=self.subcommands
        )

    def parse_command_line(self, argv: Any = None) -> None:
        super().parse_command_line(argv)
        if self.extra_args and self.subapp is None:
            self.unexpected(self.extra_args[0])

    def unexpected(self, argument: str) -> None:
        raise CommandError(f"unexpected argument {argument!r} (see --help)")


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


def runtime_info_path(pid: int) -> Path:
    return Path(jupyter_runtime_dir()) / f"replay-proxy-{pid}.json"


def proxy_state(conn, key: str, make: str) -> str:  # type: ignore[no-untyped-def]
    """A durable fact of the proxy, created on first use (e.g. its websocket session_id)."""
    row = conn.execute("SELECT value FROM proxy_state WHERE key = ?", (key,)).fetchone()
    if row:
        return row[0]
    conn.execute("INSERT INTO proxy_state (key, value) VALUES (?, ?)", (key, make))
    return make


class DatabaseApp(StrictApp):
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
        help="Seconds the client that ran a cell may be gone after its connection dropped "
        "(it may reconnect) before the proxy writes that execution's outputs in its place; "
        "a client that closed its websocket on purpose (a tab closed) is taken over at once.",
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
            spool_dir=Path(f"{Path(self.db).resolve()}.spool"),
            write_outputs=self.write_outputs,
            server_side_execution=self.server_side_execution,
            handoff_grace=self.handoff_grace,
        )

    def prepare(self) -> Prepared:
        """What can go wrong before anything is started, checked first: the port (bound now:
        a port in use is one clear line, not a traceback after JupyterLab came up), the log
        database, the redaction and retention options."""
        route_to(self.log.handlers, self.log_level)
        try:
            redactor = Redactor(self.redact_patterns)
            retention = Policy(
                parse_duration(self.retention_older_than) if self.retention_older_than else None,
                parse_size(self.retention_max_size) if self.retention_max_size else None,
                self.retention_interval,
            )
        except ValueError as error:
            raise CommandError(f"bad configuration: {error}") from None
        session_id = uuid.uuid4().hex
        try:
            conn = open_database(self.db)
        except (NewerSchemaError, DatabasePathError) as error:
            raise CommandError(f"{error}; choose another --db") from None
        except SchemaError as error:  # corrupt or unreadable: relay anyway, report, retry
            self.log.error("%s; relaying without a log until it is writable", error)
        else:
            session_id = proxy_state(conn, "websocket_link_session_id", session_id)
            conn.close()
        return Prepared(self._listen(), session_id, redactor, retention)

    def _listen(self) -> socket.socket:
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(
                self.ip or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            listener = socket.socket(family, kind, protocol)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError as error:
            raise CommandError(
                f"cannot listen on {self.ip}:{self.port}: {error.strerror or error}; "
                "choose another --port (or --ip)"
            ) from None
        listener.setblocking(False)
        return listener

    async def run_proxy(
        self,
        upstream: Upstream,
        stop: asyncio.Event,
        prepared: Prepared,
        lab_url: str = "",
        before_stopping: Callable[[ReplayProxy], Awaitable[None]] | None = None,
    ) -> None:
        """Serve until `stop` is set, then run `before_stopping` (while the proxy still logs);
        the log is flushed before returning."""
        writer = LogWriter(
            lambda: open_database(self.db),
            flush_interval=self.log_flush_interval,
            redactor=prepared.redactor,
            max_buffer_size=self.log_max_buffer_size or None,
        )
        settings = self.settings(prepared.session_id)
        proxy = ReplayProxy(upstream, writer, settings, lambda: connect(self.db))
        runner = web.AppRunner(
            proxy.make_app(),
            access_log_class=AccessLogger,
            access_log=self.log,
            handle_signals=False,
        )
        await runner.setup()
        await web.SockSite(runner, prepared.listener).start()
        info = self._write_runtime_info(upstream)
        self.log.info("Message log: %s", self.db)
        self.log.info(
            "Proxying %s at http://%s:%d%s", upstream, self.ip, self.port, upstream.base_url
        )
        if lab_url:
            print(f"\n    JupyterLab, through jupyter-replay-proxy:\n    {lab_url}\n", flush=True)
        periodic = [asyncio.ensure_future(return_free_memory())]
        if prepared.retention.active:
            periodic.append(
                asyncio.ensure_future(
                    prepared.retention.apply_periodically(lambda: connect(self.db))
                )
            )
        try:
            await stop.wait()
        finally:
            if before_stopping is not None:
                await before_stopping(proxy)
            self.log.info("Shutting down the proxy")
            info.unlink(missing_ok=True)
            for task in periodic:
                task.cancel()
            await runner.cleanup()
            writer.close()

    def _write_runtime_info(self, upstream: Upstream) -> Path:
        """Where `jupyter-replay-proxy status` finds this proxy: a file in the Jupyter runtime
        dir, private to its user (it holds the token, as jupyter-server's jpserver-*.json)."""
        host = self.ip if self.ip not in ("", "0.0.0.0", "::") else "127.0.0.1"
        info = {
            "url": f"http://{host}:{self.port}{upstream.base_url}",
            "token": upstream.token or "",
            "db": str(Path(self.db).resolve()),
            "pid": os.getpid(),
        }
        path = runtime_info_path(os.getpid())
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "w") as file:
            json.dump(info, file)
        return path

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
        "port": "ServeApp.port",
        "upstream": "ServeApp.upstream",
        "upstream-token": "ServeApp.upstream_token",
    }

    port = Integer(8889, config=True, help="Port the proxy listens on.")
    upstream = Unicode(
        "http://127.0.0.1:8888/", config=True, help="URL (with base URL) of the jupyter-server."
    )
    upstream_token = Unicode(
        "",
        config=True,
        help="The proxy's own token for jupyter-server (default: $JUPYTER_TOKEN, else the "
        "token in the server's jpserver-*.json when it runs on this machine).",
    )
    upstream_wait = Float(
        60.0,
        config=True,
        help="Seconds to wait at start for a jupyter-server that does not answer yet.",
    )

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
        prepared = self.prepare()
        try:
            upstream = Upstream(self.upstream, self.discover_token())
        except ValueError as error:
            raise CommandError(str(error)) from None

        async def main() -> None:
            stop = self._stop_event()
            if await self._upstream_ready(upstream, stop):
                await self.run_proxy(upstream, stop, prepared)

        asyncio.run(main())

    async def _upstream_ready(self, upstream: Upstream, stop: asyncio.Event) -> bool:
        """Whether jupyter-server answers the proxy's token (False: stopped while waiting).
        A server not up yet is waited for (`upstream_wait` seconds), saying so; a token it
        refuses is an error: the proxy would follow no kernel and log nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upstream_wait
        said = False
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                try:
                    url, headers = upstream.polled("api/kernels"), upstream.own_headers()
                    async with http.get(url, headers=headers) as resp:
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    if loop.time() > deadline:
                        raise CommandError(
                            f"jupyter-server at {upstream} did not answer within "
                            f"{self.upstream_wait:.0f} s ({error or type(error).__name__}): "
                            "is it running? (--upstream)",
                            status=1,
                        ) from None
                    if not said:
                        self.log.warning("Waiting for jupyter-server at %s to answer", upstream)
                        said = True
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
                    continue
                if status == 200:
                    return True
                if status in (401, 403):
                    raise CommandError(
                        f"jupyter-server at {upstream} refused the proxy's token ({status}): "
                        "give the server's token with --upstream-token or $JUPYTER_TOKEN"
                    )
                raise CommandError(
                    f"{upstream} answered {status} for api/kernels: is it a jupyter-server? "
                    "(--upstream, with the server's base URL)"
                )
        return False


#: jupyter_server_ydoc stops its Y websocket server at shutdown even when it never started, and
#: asyncio reports the RuntimeError of that task as never retrieved (jupyter-collaboration#546).
_UNRETRIEVED = "Task exception was never retrieved"
_YDOC_STOP = "RuntimeError: WebsocketServer not running"


def _dies_with_its_parent() -> None:
    """Run in the spawned server before it starts: SIGTERM when the proxy dies, even by
    kill -9 (Linux's parent-death signal, kept across exec), so that neither the server nor
    its kernels outlive it unseen."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class _SpawningApp(ProxyApp):
    """What `lab` and `singleuser` share: a jupyter-server spawned on a private loopback port,
    its output echoed (tokens masked), the proxy in front of it, and one shutdown for both."""

    #: how the spawned server is named in the proxy's messages and before its output lines
    server_name = "jupyter lab"
    echo_prefix = "[lab] "

    def server_command(self, port: int) -> list[str]:
        raise NotImplementedError

    def server_env(self, port: int, token: str) -> dict[str, str]:
        raise NotImplementedError

    def upstream_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/"

    def server_token(self) -> str:
        return secrets.token_hex(24)

    def welcome(self, token: str) -> str:
        """What is printed once the server is up behind the proxy."""
        return ""

    def _allowed_message_types_args(self) -> list[str]:
        if not self.allowed_message_types:
            return []
        return [f"--MappingKernelManager.allowed_message_types={self.allowed_message_types!r}"]

    async def _spawn(self, port: int, token: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.server_command(port), env=self.server_env(port, token),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_dies_with_its_parent if sys.platform == "linux" else None,
        )  # fmt: skip

    async def _echo(self, process: asyncio.subprocess.Process) -> None:
        """The server's output, tokens masked, without one known traceback (below)."""
        assert process.stdout is not None
        held: list[str] = []
        async for raw in process.stdout:
            line = redact(raw.decode(errors="replace"))
            if held and line.startswith(_YDOC_STOP):
                held.clear()  # a server whose Y websocket server never ran, stopping
                continue
            if line.startswith(_UNRETRIEVED) or (held and line.startswith(("future:", " ", "Tr"))):
                held.append(line)
                continue
            for waiting in [*held, line]:
                sys.stderr.write(self.echo_prefix + waiting)
            held.clear()
        for waiting in held:
            sys.stderr.write(self.echo_prefix + waiting)

    async def _stop_kernels(self, proxy: ReplayProxy, url: str, token: str) -> None:
        """Interrupt running cells and shut the kernels down through jupyter-server while
        the proxy still logs: their last outputs are in the log, and no kernel is stopped in
        the middle of a reply (a traceback from ipykernel). Whether a cell still runs is the
        relay's to say: jupyter-server's own execution_state also follows its nudges."""
        timeout = aiohttp.ClientTimeout(total=15)
        headers = {"Authorization": f"token {token}"}
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
                async with http.get(url + "api/kernels") as resp:
                    kernels = [kernel["id"] for kernel in await resp.json()]
                for kernel_id in kernels:
                    # once: a second SIGINT would cut short the traceback the first one prints
                    if proxy.kernel_running(kernel_id):
                        self.log.info("Interrupting the cell running on kernel %s", kernel_id)
                        async with http.post(url + f"api/kernels/{kernel_id}/interrupt"):
                            pass
                for _ in range(50):  # at most 5 s for interrupted cells to end
                    if not any(proxy.kernel_running(kernel_id) for kernel_id in kernels):
                        break
                    await asyncio.sleep(0.1)
                if kernels:
                    self.log.info("Shutting down %d kernel(s)", len(kernels))
                for kernel_id in kernels:
                    async with http.delete(url + f"api/kernels/{kernel_id}"):
                        pass

    async def _wait_ready(
        self, process: asyncio.subprocess.Process, url: str, token: str, stop: asyncio.Event
    ) -> bool:
        """Whether the server came up (False: stopped meanwhile)."""
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                if stop.is_set():
                    return False
                if process.returncode is not None:
                    raise CommandError(
                        f"{self.server_name} exited with {process.returncode} (see its output "
                        "above)",
                        1,
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    headers = {"Authorization": f"token {token}"}
                    async with http.get(url + "api/status", headers=headers) as resp:
                        if resp.status == 200:
                            return True
                await asyncio.sleep(0.1)
        raise CommandError(
            f"{self.server_name} did not start within 60 s (see its output above)", 1
        )

    async def _stop_server(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        process.terminate()  # jupyter-server shuts its kernels down on SIGTERM
        try:
            await asyncio.wait_for(process.wait(), 20)
        except asyncio.TimeoutError:
            self.log.warning("%s did not stop in 20 s; killing it", self.server_name)
            process.kill()
            await process.wait()

    def start(self) -> None:
        prepared = self.prepare()  # before the server is spawned: a port in use stops here

        async def main() -> None:
            stop = self._stop_event()
            port, token = _free_port(), self.server_token()
            upstream_url = self.upstream_url(port)
            process = await self._spawn(port, token)
            echo = asyncio.ensure_future(self._echo(process))
            try:
                if not await self._wait_ready(process, upstream_url, token, stop):
                    return
                exited = asyncio.ensure_future(process.wait())
                exited.add_done_callback(lambda _: stop.set())
                await self.run_proxy(
                    Upstream(upstream_url, token), stop, prepared, self.welcome(token),
                    before_stopping=lambda proxy: self._stop_kernels(proxy, upstream_url, token),
                )  # fmt: skip
            finally:
                await self._stop_server(process)
                echo.cancel()

        asyncio.run(main())


class LabApp(_SpawningApp):
    name = "jupyter-replay-proxy-lab"
    description = "Start JupyterLab (with jupyter-collaboration) behind the proxy."
    aliases = {**_common_aliases, "root-dir": "LabApp.root_dir"}

    root_dir = Unicode("", config=True, help="Directory JupyterLab serves (default: here).")
    lab_args = List(
        Unicode(), config=True, help="Extra command-line arguments for the spawned jupyter lab."
    )
    open_browser = Bool(False, config=True, help="Open a browser on the proxied URL.")

    def server_command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ZMQChannelsWebsocketConnection.limit_rate=False",
            *([f"--ServerApp.root_dir={self.root_dir}"] if self.root_dir else []),
            *(["--allow-root"] if os.geteuid() == 0 else []),  # the user chose to run as root
            *self._allowed_message_types_args(),
            *self.lab_args,
        ]  # fmt: skip

    def server_env(self, port: int, token: str) -> dict[str, str]:
        return {**os.environ, "JUPYTER_TOKEN": token}  # not on the command line, where ps shows it

    def welcome(self, token: str) -> str:
        lab_url = f"http://{self.ip}:{self.port}/lab?token={token}"
        if self.open_browser:
            import webbrowser

            webbrowser.open(lab_url)
        return lab_url

    def start(self) -> None:
        if self.root_dir and not Path(self.root_dir).is_dir():
            raise CommandError(f"--root-dir {self.root_dir} is not a directory")
        super().start()


#: What a JupyterHub spawner tells the single-user server in its environment (JupyterHub >= 2).
_HUB_URL, _HUB_PREFIX, _HUB_TOKEN = (
    "JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_API_TOKEN"
)  # fmt: skip
#: Our own options on a spawner's command line; every other argument goes to the server.
_OURS = re.compile(r"--(ip|port|db|link|config|(SingleUserApp|ProxyApp|DatabaseApp)\.[\w.]+)(=|$)")


class SingleUserApp(_SpawningApp):
    """`jupyterhub-singleuser` behind the proxy, for `c.Spawner.cmd`: it listens where the hub
    expects the user's server (``$JUPYTERHUB_SERVICE_URL``, or ``--ip``/``--port``) and starts
    ``jupyterhub-singleuser`` on a private loopback port under the same base URL, with the
    spawner's environment and every argument that is not its own. The hub's OAuth, cookies,
    activity reports and health checks pass through; the proxy's own token for the server is
    the server's ``$JUPYTERHUB_API_TOKEN``."""

    name = "jupyter-replay-proxy-singleuser"
    description = "Run jupyterhub-singleuser behind the proxy (as JupyterHub's Spawner.cmd)."
    server_name = "jupyterhub-singleuser"
    echo_prefix = "[singleuser] "

    server_args = List(
        Unicode(),
        config=True,
        help="Extra command-line arguments for jupyterhub-singleuser (the spawner's own "
        "arguments that are not the proxy's are passed on too).",
    )

    def parse_command_line(self, argv: Any = None) -> None:
        """The proxy's options are taken; the rest (Spawner.args: --allow-root,
        --ServerApp.root_dir=...) is the server's."""
        argv = list(sys.argv[1:] if argv is None else argv)
        ours: list[str] = []
        passed_on: list[str] = []
        while argv:
            argument = argv.pop(0)
            matched = _OURS.match(argument)
            if argument in ("-h", "--help", "--help-all"):
                ours.append(argument)
                continue
            if matched is None:
                passed_on.append(argument)
                continue
            ours.append(argument)
            if not matched.group(3) and argv:  # `--port 8888`: the value is the next argument
                ours.append(argv.pop(0))
        super().parse_command_line(ours)
        self.passed_on = passed_on

    def _hub(self, name: str) -> str:
        value = os.environ.get(name, "")
        if not value:
            raise CommandError(
                f"${name} is not set: `singleuser` is started by a JupyterHub spawner "
                '(c.Spawner.cmd = ["jupyter-replay-proxy", "singleuser"])'
            )
        return value

    def initialize(self, argv: Any = None) -> None:
        self.passed_on: list[str] = []
        super().initialize(argv)
        if self.subapp is not None:
            return
        if os.environ.get("JUPYTERHUB_SSL_KEYFILE"):
            raise CommandError(
                "JupyterHub's internal_ssl is not supported yet: the proxy would have to serve "
                "the hub's certificate"
            )
        service = URL(self._hub(_HUB_URL))
        if service.scheme != "http":
            raise CommandError(f"${_HUB_URL} is {service}: the proxy serves http only")
        self.prefix = self._hub(_HUB_PREFIX)
        if not self.prefix.endswith("/"):
            self.prefix += "/"
        self.hub_token = self._hub(_HUB_TOKEN)
        if "ip" not in self.config.ProxyApp and "ip" not in self.config.SingleUserApp:
            self.ip = "" if service.host == "*" else service.host or ""  # "*": every interface
        if "port" not in self.config.ProxyApp and "port" not in self.config.SingleUserApp:
            self.port = service.port or 8888

    def server_command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "jupyterhub.singleuser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ZMQChannelsWebsocketConnection.limit_rate=False",
            *self._allowed_message_types_args(), *self.passed_on, *self.server_args,
        ]  # fmt: skip

    def server_env(self, port: int, token: str) -> dict[str, str]:
        return {**os.environ, _HUB_URL: f"http://127.0.0.1:{port}{self.prefix}"}

    def upstream_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}{self.prefix}"

    def server_token(self) -> str:
        return self.hub_token


class MigrateApp(ProxyApp):
    name = "jupyter-replay-proxy-migrate"
    description = "Apply the log database's pending schema migrations."

    def start(self) -> None:
        try:
            conn = connect(self.db)
            applied = migrate(conn)
        except (SchemaError, sqlite3.DatabaseError) as error:
            raise CommandError(str(error)) from None
        latest = max((m.version for m in available_migrations()), default=0)
        if applied:
            print(f"{self.db}: applied migrations {', '.join(map(str, applied))}")
        else:
            print(f"{self.db}: up to date at schema version {latest}")


class ReplayProxyApp(StrictApp):
    name = "jupyter-replay-proxy"
    version = __version__
    description = (
        "A reverse proxy for jupyter-server that logs every kernel message to SQLite and "
        "replays what clients missed."
    )
    subcommands = {
        "lab": (LabApp, LabApp.description),
        "serve": (ServeApp, ServeApp.description),
        "singleuser": (SingleUserApp, SingleUserApp.description),
        "migrate": (MigrateApp, MigrateApp.description),
        "log": ("proxy.audit_app.LogApp", "Show logged kernel messages; --follow tails them."),
        "transcript": (
            "proxy.audit_app.TranscriptApp",
            "Who ran what code, when, and what came out: one entry per execution.",
        ),
        "export": ("proxy.audit_app.ExportApp", "Rebuild a notebook (.ipynb) from the log."),
        "stats": ("proxy.audit_app.StatsApp", "Figures about the log."),
        "prune": ("proxy.audit_app.PruneApp", "Delete the oldest part of the log."),
        "status": ("proxy.status_app.StatusApp", "The health of a running proxy."),
        "hub-transcript": (
            "proxy.hub_app.HubTranscriptApp",
            "Who ran what on every running user server of a JupyterHub (for its admins).",
        ),
    }

    def unexpected(self, argument: str) -> None:
        commands = ", ".join(self.subcommands)
        raise CommandError(f"unknown command {argument!r}; the commands are {commands}")

    def start(self) -> None:
        super().start()
        self.print_help()
        raise CommandError("which command? (see above)")


def main() -> None:
    """The command line: a user's mistake is one line on stderr and a non-zero exit."""
    try:
        ReplayProxyApp.launch_instance()
    except CommandError as error:
        print(f"jupyter-replay-proxy: {error}", file=sys.stderr)
        sys.exit(error.status)
    except KeyboardInterrupt:
        sys.exit(130)
