"""Fixtures: a real jupyter-server (with jupyter-collaboration) and ipykernel on loopback ports,
and the proxy in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jupyter_client.session import Session

from proxy.codecs import (
    KERNEL_CHANNELS,
    V1_SUBPROTOCOL,
    Message,
    decode_legacy_binary,
    decode_legacy_text,
    decode_v1,
    encode_legacy,
    encode_v1,
    message_from_parts,
)
from proxy.database import connect, open_database
from proxy.server import ReplayProxy
from proxy.settings import ProxySettings
from proxy.taps.log import LogWriter
from proxy.upstream import Upstream

_SESSION_MARK = "REPLAY_PROXY_TEST_SESSION"


@pytest.fixture(scope="session", autouse=True)
def no_reader_outlives_the_tests() -> Iterator[None]:
    """The iopub reader of a proxy killed -9 waits up to ten minutes for a successor (and keeps
    the test run's output open meanwhile): those of this run's proxies, marked by an
    environment variable they inherit, are killed when it ends."""
    os.environ[_SESSION_MARK] = secrets.token_hex(8)
    marker = f"{_SESSION_MARK}={os.environ[_SESSION_MARK]}".encode()
    yield
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if b"proxy.spool_writer" in (process / "cmdline").read_bytes() and marker in (
                process / "environ"
            ).read_bytes().split(b"\0"):
                os.kill(int(process.name), signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JupyterServer:
    url: str
    token: str
    root_dir: Path
    runtime_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def start_jupyter_server(
    tmp: Path, *extra_args: str, port: int | None = None, token: str | None = None
) -> JupyterServer:
    """A stock jupyter-server with jupyter-collaboration (and JupyterLab) on a loopback port
    (the given one and token: the same server started again)."""
    root, runtime = tmp / "root", tmp / "runtime"
    root.mkdir(parents=True, exist_ok=True)
    runtime.mkdir(parents=True, exist_ok=True)
    port, token = port or free_port(), token or secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_TOKEN": token,
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # ipykernel's debugger warns on stderr otherwise
        "PYTHONPATH": os.pathsep.join(  # for classes of the tests' own, e.g. tests.authorizers
            filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    log_path = tmp / "jupyter-server.log"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root}", *(["--allow-root"] if os.geteuid() == 0 else []),
            *extra_args,
        ],
        env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        cwd=tmp,  # jupyter-collaboration keeps its .jupyter_ystore.db in the working directory
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter-server exited: {log_path.read_text()[-3000:]}")
        try:
            request = urllib.request.Request(
                url + "api/status", headers={"Authorization": f"token {token}"}
            )
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return JupyterServer(url, token, root, runtime, process, log_path)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("jupyter-server did not start in 60 s")


def stop_jupyter_server(server: JupyterServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def jupyter_server() -> Iterator[JupyterServer]:
    tmp = Path(tempfile.mkdtemp(prefix="replay-proxy-test-"))
    server = start_jupyter_server(tmp)
    yield server
    stop_jupyter_server(server)
    shutil.rmtree(tmp, ignore_errors=True)


async def start_kernel(server: JupyterServer) -> str:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.post(server.url + "api/kernels", json={"name": "python3"}) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]


async def shutdown_kernel(server: JupyterServer, kernel_id: str) -> None:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.delete(server.url + f"api/kernels/{kernel_id}"),
    ):
        pass


@pytest.fixture
async def kernel_id(jupyter_server: JupyterServer) -> AsyncIterator[str]:
    kid = await start_kernel(jupyter_server)
    yield kid
    await shutdown_kernel(jupyter_server, kid)


@dataclass
class RunningProxy:
    url: str
    proxy: ReplayProxy
    writer: LogWriter
    db_path: Path
    server: Any = None

    def db(self) -> Any:
        self.writer.flush()
        conn = connect(self.db_path)
        conn.row_factory = __import__("sqlite3").Row
        return conn


async def make_proxy(
    aiohttp_server: Any,
    upstream_url: str,
    token: str,
    runtime_dir: Path,
    db_path: Path,
    writer_options: dict[str, Any] | None = None,
    **settings: Any,
) -> RunningProxy:
    open_database(db_path).close()
    writer = LogWriter(lambda: connect(db_path), flush_interval=0.02, **(writer_options or {}))
    proxy = ReplayProxy(
        Upstream(upstream_url, token),
        writer,
        ProxySettings(
            runtime_dir=runtime_dir,
            websocket_link_session_id="test-link",
            link_namespace=str(db_path),
            **{"spool_dir": Path(f"{db_path}.spool"), **settings},
        ),
        lambda: connect(db_path),
    )
    app = proxy.make_app()
    app.on_cleanup.append(lambda _: asyncio.to_thread(writer.close))  # after the proxy's own
    test_server = await aiohttp_server(app)
    return RunningProxy(
        f"http://127.0.0.1:{test_server.port}/", proxy, writer, db_path, test_server
    )


@pytest.fixture(params=["zmq", "websocket"])
async def proxy(
    request: pytest.FixtureRequest, aiohttp_server: Any, jupyter_server: JupyterServer,
    tmp_path: Path,
) -> AsyncIterator[RunningProxy]:  # fmt: skip
    """The proxy in front of the session's jupyter-server, once per kind of kernel link."""
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link=request.param,
    )  # fmt: skip
    yield running


@pytest.fixture
async def zmq_proxy(
    aiohttp_server: Any, jupyter_server: JupyterServer, tmp_path: Path
) -> AsyncIterator[RunningProxy]:
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq",
    )  # fmt: skip
    yield running


@dataclass
class KernelChannels:
    """A frontend on a kernel's channels websocket, in either protocol."""

    ws: aiohttp.ClientWebSocketResponse
    http: aiohttp.ClientSession
    session: Session = field(default_factory=lambda: Session(key=b"unused: frontends do not sign"))
    received: list[Message] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        return self.ws.protocol or "legacy"

    async def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict | None = None,
        parent: dict | None = None,
    ) -> str:
        msg = self.session.msg(msg_type, content, parent=parent, metadata=metadata or {})
        parts = [
            self.session.pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")
        ]
        message = message_from_parts(
            channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True
        )
        frame = encode_v1(message) if self.protocol == V1_SUBPROTOCOL else encode_legacy(message)
        if isinstance(frame, str):
            await self.ws.send_str(frame)
        else:
            await self.ws.send_bytes(frame)
        return msg["header"]["msg_id"]

    async def recv(self, timeout: float = 30) -> Message:
        frame = await self.ws.receive(timeout=timeout)
        if frame.type == aiohttp.WSMsgType.BINARY:
            if self.protocol == V1_SUBPROTOCOL:
                message = decode_v1(frame.data, allowed_channels=KERNEL_CHANNELS)
            else:
                message = decode_legacy_binary(frame.data, allowed_channels=KERNEL_CHANNELS)
        elif frame.type == aiohttp.WSMsgType.TEXT:
            message = decode_legacy_text(frame.data, allowed_channels=KERNEL_CHANNELS)
        else:
            raise ConnectionError(f"websocket {frame.type.name}: {frame.data} {frame.extra}")
        self.received.append(message)
        return message

    async def kernel_info(self) -> None:
        """Wait until the kernel answers, as every frontend does before it runs code."""
        info = await self.send("shell", "kernel_info_request", {})
        while not any(m.parent_msg_id == info and m.channel == "shell" for m in self.received):
            await self.recv()

    async def execute(
        self, code: str, timeout: float = 60, metadata: dict | None = None, **content: Any
    ) -> tuple[str, Message, list[Message]]:
        """Run code; return its msg_id, execute_reply, and its iopub up to the idle status."""
        msg_id = await self.send(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": True, **content},
            metadata,
        )  # fmt: skip
        return msg_id, *(await self.collect(msg_id, timeout))

    async def collect(self, msg_id: str, timeout: float = 60) -> tuple[Message, list[Message]]:
        reply: Message | None = None
        iopub: list[Message] = []
        idle = False
        deadline = asyncio.get_running_loop().time() + timeout
        while reply is None or not idle:
            message = await self.recv(deadline - asyncio.get_running_loop().time())
            if message.parent_msg_id != msg_id:
                continue
            if message.channel == "iopub":
                iopub.append(message)
                if message.msg_type == "status" and message.content()["execution_state"] == "idle":
                    idle = True
            elif message.msg_type.endswith("_reply"):
                reply = message
        return reply, iopub

    def blip(self) -> None:
        """Drop the TCP connection abruptly, as a network blip or a sleeping laptop does."""
        self.ws._conn.transport.abort()  # type: ignore[union-attr]

    async def drain(self, quiet: float = 0.5) -> None:
        """Receive until nothing arrives for `quiet` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                await self.recv(timeout=quiet)

    async def closing(self, timeout: float = 10) -> aiohttp.WSMessage:
        """Read until the proxy closes this websocket; the close frame."""
        while True:
            frame = await self.ws.receive(timeout=timeout)
            if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return frame

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


async def open_channels(
    base_url: str,
    kernel_id: str,
    token: str | None,
    *,
    protocol: str | None = V1_SUBPROTOCOL,
    session_id: str | None = None,
    replay: str | None = None,
    autoping: bool = True,
    token_in_header: bool = False,
) -> KernelChannels:
    """A frontend's channels websocket; the token in the URL, as JupyterLab sends it, or
    (`token_in_header`) in an Authorization header (JupyterHub 5 refuses it in the URL)."""
    headers = {"Authorization": f"token {token}"} if token and token_in_header else {}
    http = aiohttp.ClientSession(headers=headers)
    query = {"session_id": session_id or secrets.token_hex(8)}
    if replay is not None:
        query["replay"] = replay
    if token is not None and not token_in_header:
        query["token"] = token
    try:
        ws = await http.ws_connect(
            f"{base_url}api/kernels/{kernel_id}/channels",
            params=query, protocols=(protocol,) if protocol else (), max_msg_size=0,
            autoping=autoping,
        )  # fmt: skip
    except BaseException:
        await http.close()
        raise
    return KernelChannels(ws, http)


def serve_proxy(server: JupyterServer, port: int, db: Path, *args: str) -> subprocess.Popen[bytes]:
    """`jupyter-replay-proxy serve` as a process of its own, so that it can be killed -9."""
    return subprocess.Popen(
        [
            sys.executable, "-m", "proxy", "serve", f"--upstream={server.url}", f"--port={port}",
            f"--db={db}", f"--ProxyApp.kernel_runtime_dir={server.runtime_dir}", *args,
        ],
        env={**os.environ, "JUPYTER_TOKEN": server.token},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def open_channels_when_up(
    url: str, kernel_id: str, token: str, session_id: str | None = None
) -> KernelChannels:
    """open_channels, retried while a proxy process starts."""
    for _ in range(100):
        try:
            return await open_channels(url, kernel_id, token, session_id=session_id)
        except aiohttp.ClientError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"the proxy at {url} did not come up")


async def finished_in_log(db: Path, executions: int = 1, timeout: float = 60) -> None:
    """Until the log at `db` holds so many finished executions (their reply and idle logged):
    what a test waits for rather than a cell's expected run time."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(db)) as log:
            (finished,) = log.execute(
                "SELECT count(*) FROM executions WHERE finished_at IS NOT NULL"
            ).fetchone()
        if finished >= executions:
            return
        assert time.monotonic() < deadline, f"{finished} of {executions} executions finished"
        await asyncio.sleep(0.1)


def stream_text(iopub: list[Message]) -> str:
    return "".join(m.content()["text"] for m in iopub if m.msg_type == "stream")


class TcpCutter:
    """A real TCP hop in front of jupyter-server whose open connections a test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
