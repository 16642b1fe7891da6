"""A real JupyterHub for the tests and benchmarks: configurable-http-proxy (from npm, installed
by `npm ci` at the project's root), SimpleLocalProcessSpawner, DummyAuthenticator. Users whose
name starts with ``stock`` get the stock ``jupyterhub-singleuser``; every other user gets
``jupyter-replay-proxy singleuser`` (the sidecar), each with a home of their own."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CHP = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
BIN = Path(sys.executable).parent
#: How often (seconds) the user servers report activity to the hub (300 by default).
ACTIVITY_INTERVAL = 1


def _config(tmp: Path, port: int, service_token: str, stock_args: tuple[str, ...]) -> str:
    args = ["--allow-root"] if os.geteuid() == 0 else []  # Spawner.args, passed on
    return textwrap.dedent(f"""
        c.JupyterHub.ip = "127.0.0.1"
        c.JupyterHub.port = {port}
        c.JupyterHub.hub_port = {free_port()}
        c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
        c.ConfigurableHTTPProxy.command = [{str(CHP)!r}]
        c.ConfigurableHTTPProxy.pid_file = {str(tmp / "proxy.pid")!r}
        c.JupyterHub.db_url = "sqlite:///{tmp / "jupyterhub.sqlite"}"
        c.JupyterHub.cookie_secret_file = {str(tmp / "cookie_secret")!r}
        c.JupyterHub.authenticator_class = "dummy"
        c.Authenticator.allow_all = True
        c.JupyterHub.spawner_class = "simple"
        c.SimpleLocalProcessSpawner.home_dir_template = {str(tmp / "home" / "{username}")!r}
        c.Spawner.cmd = [{str(BIN / "jupyter-replay-proxy")!r}, "singleuser"]
        c.Spawner.args = {args!r}
        c.Spawner.default_url = "/lab"
        c.Spawner.http_timeout = 60
        c.Spawner.poll_interval = 2  # how soon the hub sees a server that died
        c.Spawner.environment = {{
            "JUPYTERHUB_ACTIVITY_INTERVAL": "{ACTIVITY_INTERVAL}",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "REPLAY_PROXY_TEST_SESSION": {os.environ.get("REPLAY_PROXY_TEST_SESSION", "")!r},
        }}

        def stock_for_some(spawner):
            if spawner.user.name.startswith("stock"):
                spawner.cmd = [{str(BIN / "jupyterhub-singleuser")!r}]
                spawner.args = [*spawner.args, *{list(stock_args)!r}]

        c.Spawner.pre_spawn_hook = stock_for_some
        c.JupyterHub.services = [{{"name": "tester", "api_token": {service_token!r}}}]
        c.JupyterHub.load_roles = [{{
            "name": "tester",
            "scopes": ["admin:users", "admin:servers", "tokens", "access:servers"],
            "services": ["tester"],
        }}]
    """)


@dataclass
class Hub:
    url: str  # the public URL (configurable-http-proxy), e.g. http://127.0.0.1:PORT/
    tmp: Path
    process: subprocess.Popen[bytes]
    service_token: str  # of a service that may create users, start servers and make tokens

    def home(self, user: str) -> Path:
        return self.tmp / "home" / user

    def server_url(self, user: str) -> str:
        return f"{self.url}user/{user}/"

    async def api(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"token {token or self.service_token}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.request(method, f"{self.url}hub/api/{path}", **kwargs) as resp,
        ):
            body = await resp.read()
            return resp.status, (json.loads(body) if body else None)

    async def user(self, name: str) -> dict[str, Any]:
        status, model = await self.api("GET", f"users/{name}")
        assert status == 200, (status, model)
        return model

    async def start_server(self, name: str) -> None:
        """Create the user if need be and start their server; wait until it is ready."""
        self.home(name).mkdir(parents=True, exist_ok=True)
        await self.api("POST", f"users/{name}")
        status, body = await self.api("POST", f"users/{name}/server")
        assert status in (201, 202, 400), (status, body)  # 400: already running
        for _ in range(1200):
            server = (await self.user(name))["servers"].get("")
            if server and server["ready"]:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name}'s server did not start: {self.log()[-3000:]}")

    async def stop_server(self, name: str) -> None:
        status, body = await self.api("DELETE", f"users/{name}/server")
        assert status in (202, 204), (status, body)
        for _ in range(600):
            if not (await self.user(name))["servers"]:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name}'s server did not stop")

    async def token(self, name: str) -> str:
        status, body = await self.api("POST", f"users/{name}/tokens", json={"note": "test"})
        assert status == 201, (status, body)
        return body["token"]

    def log(self) -> str:
        return (self.tmp / "hub.log").read_text(errors="replace")


def start_hub(tmp: Path, stock_args: tuple[str, ...] = ()) -> Hub:
    """JupyterHub on a loopback port, its proxy from the project's node_modules; `stock_args`:
    more Spawner.args for the stock single-user servers."""
    if not CHP.exists():  # CI installs it (.ci/run: npm ci): never skipped
        raise RuntimeError(f"{CHP} is missing: run `npm ci` at the project's root")
    tmp.mkdir(parents=True, exist_ok=True)
    port, service_token = free_port(), secrets.token_hex(16)
    (tmp / "jupyterhub_config.py").write_text(_config(tmp, port, service_token, stock_args))
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
        cwd=tmp, stdout=(tmp / "hub.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        start_new_session=True,
    )  # fmt: skip
    hub = Hub(f"http://127.0.0.1:{port}/", tmp, process, service_token)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyterhub exited: {hub.log()[-3000:]}")
        try:
            with urllib.request.urlopen(hub.url + "hub/api/", timeout=2) as resp:
                if resp.status == 200:
                    return hub
        except OSError:
            time.sleep(0.2)
    stop_hub(hub)
    raise RuntimeError(f"jupyterhub did not start in 60 s: {hub.log()[-3000:]}")


def stop_hub(hub: Hub) -> None:
    """Stop the hub (it stops the user servers and its proxy first); then whatever of its
    users' servers is still there (a failed test's) is killed."""
    hub.process.send_signal(signal.SIGTERM)
    try:
        hub.process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(hub.process.pid, signal.SIGKILL)
        hub.process.wait()
    homes = f"HOME={hub.tmp / 'home'}/".encode()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if any(v.startswith(homes) for v in (process / "environ").read_bytes().split(b"\0")):
                os.kill(int(process.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def processes_of(user: str) -> list[tuple[int, str]]:
    """The processes started for a user's server (the spawner's environment names the user):
    pid and command line."""
    found = []
    marker = f"JUPYTERHUB_USER={user}".encode()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (process / "environ").read_bytes().split(b"\0"):
                command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(process.name), command.strip()))
        except (OSError, ValueError):
            continue
    return found
