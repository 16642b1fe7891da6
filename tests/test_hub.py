"""`jupyter-replay-proxy singleuser` as JupyterHub's Spawner.cmd, under a real JupyterHub (see
tests/hub.py): a user logs in through the hub's page in Chromium, runs a cell and closes the
tab mid-run: reopened, the notebook shows every line and the count, and so does the file;
users are kept apart; the hub sees a running cell as activity, and an idle server as idle;
the hub's stop leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page

from .conftest import finished_in_log, open_channels, stream_text
from .hub import ACTIVITY_INTERVAL, BIN, Hub, processes_of, start_hub, stop_hub
from .test_browser import (
    _notebook,
    _wait_for,
    browser,
    notebook_ready,
    run_first_cell,
    saved_with_every_line,
    shows_every_line_and_the_count,
)

__all__ = ["browser"]  # a fixture


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    running = start_hub(Path(tempfile.mkdtemp(prefix="replay-proxy-hub-")))
    yield running
    stop_hub(running)


def _log_of(hub: Hub, user: str) -> Path:
    """Where the sidecar keeps a user's log: their Jupyter data directory."""
    return hub.home(user) / ".local" / "share" / "jupyter" / "replay-proxy" / "log.sqlite"


async def _login(context: BrowserContext, hub: Hub, user: str, path: str) -> Page:
    """Log in on the hub's own page and land on `path` of the user's server."""
    page = await context.new_page()
    page.set_default_timeout(60_000)
    await page.goto(f"{hub.url}hub/login?next={quote(path)}")
    await page.fill("#username_input", user)
    await page.fill("#password_input", "any")
    await page.click("#login_submit")
    return page


def _workspace(user: str, name: str) -> str:
    return f"/user/{user}/lab/workspaces/{uuid.uuid4().hex}/tree/{name}?reset"


async def test_a_tab_closed_mid_run_under_jupyterhub(hub: Hub, browser: Browser) -> None:
    user, name = "alice", "hub.ipynb"
    hub.home(user).mkdir(parents=True, exist_ok=True)
    _notebook(hub.home(user), name)
    await hub.start_server(user)
    context = await browser.new_context()
    try:
        first = await notebook_ready(await _login(context, hub, user, _workspace(user, name)))
        await run_first_cell(first, _log_of(hub, user))
        await _wait_for(first, "line 2")
        await first.close()  # the tab goes away while the cell prints on

        await finished_in_log(_log_of(hub, user))  # the cell ends with nobody watching
        second = await context.new_page()  # the hub's cookies are the context's
        second.set_default_timeout(60_000)
        await second.goto(hub.url.rstrip("/") + _workspace(user, name))
        await notebook_ready(second)
        await shows_every_line_and_the_count(second)
    finally:
        await context.close()
    await saved_with_every_line(hub.home(user) / name)
    with sqlite3.connect(_log_of(hub, user)) as log:  # in the user's own data directory
        (lines,) = log.execute("SELECT count(*) FROM messages WHERE msg_type = 'stream'").fetchone()
    assert lines >= 1
    await hub.stop_server(user)


async def _get(url: str, token: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http,
        http.get(url) as resp,
    ):
        body = await resp.read()
        return resp.status, (json.loads(body) if resp.status == 200 else None)


async def _start_kernel(hub: Hub, user: str, token: str) -> str:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http,
        http.post(hub.server_url(user) + "api/kernels", json={}) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]


async def test_users_are_kept_apart(hub: Hub) -> None:
    """Another user's token gets nothing from a user's proxy (audit API, status, channels,
    server-side execution); a service the hub grants access:servers reads it."""
    await asyncio.gather(hub.start_server("ada"), hub.start_server("bob"))
    ada, bob = await hub.token("ada"), await hub.token("bob")
    kernel_id = await _start_kernel(hub, "ada", ada)
    channels = await open_channels(hub.server_url("ada"), kernel_id, ada, token_in_header=True)
    try:
        _, _, iopub = await channels.execute("print('secret of ada')")
        assert stream_text(iopub) == "secret of ada\n"
    finally:
        await channels.close()
    own = hub.server_url("ada") + "replay-proxy/api/"
    for _ in range(50):  # the log writer commits within its flush interval
        status, executions = await _get(own + "audit/executions", ada)
        if status == 200 and executions["items"]:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    assert [e["code"] for e in executions["items"]] == ["print('secret of ada')"]

    for path in ("audit/executions", "audit/messages", "status"):
        assert (await _get(own + path, bob))[0] == 403, path
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channels(hub.server_url("ada"), kernel_id, bob, token_in_header=True)
    assert refused.value.status == 403
    async with aiohttp.ClientSession(headers={"Authorization": f"token {bob}"}) as http:
        execute = hub.server_url("ada") + f"api/kernels/{kernel_id}/execute"
        async with http.post(execute, json={"code": "print(1)"}) as resp:
            assert resp.status == 403

    status, seen = await _get(own + "audit/executions", hub.service_token)  # access:servers
    assert status == 200 and [e["code"] for e in seen["items"]] == ["print('secret of ada')"]
    assert "secret of ada" not in _log_of(hub, "bob").read_bytes().decode(errors="replace")

    # the CLI, as ada runs it in a terminal of her server: her log and her proxy by default
    env = {**os.environ, "HOME": str(hub.home("ada"))}
    for variable in ("JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_TOKEN"):
        env.pop(variable, None)
    transcript = subprocess.run(
        [str(BIN / "jupyter-replay-proxy"), "transcript"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert transcript.returncode == 0 and "print('secret of ada')" in transcript.stdout
    status_line = subprocess.run(
        [str(BIN / "jupyter-replay-proxy"), "status"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert status_line.returncode == 0, status_line.stderr
    assert kernel_id in status_line.stdout

    # a hub admin (here a service with access:servers) reads every server's trail at once;
    # bob's own token may not even list the hub's users
    def hub_transcript(token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "jupyter-replay-proxy"), "hub-transcript", f"--hub-url={hub.url}",
             f"--token={token}", "--format=json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    admin = hub_transcript(hub.service_token)
    assert admin.returncode == 0, admin.stderr
    by_user: dict[str, list[str]] = {}
    for execution in map(json.loads, admin.stdout.splitlines()):
        by_user.setdefault(execution["hub_user"], []).append(execution["code"])
    assert by_user["ada"] == ["print('secret of ada')"] and "bob" not in by_user  # ran nothing
    refused = hub_transcript(bob)
    assert refused.returncode == 1 and "the hub refused the token (403)" in refused.stderr
    assert "secret of ada" not in refused.stdout
    await asyncio.gather(hub.stop_server("ada"), hub.stop_server("bob"))


def _activity(model: dict[str, Any]) -> float:
    return datetime.fromisoformat(model["servers"][""]["last_activity"]).timestamp()


async def test_the_hub_sees_a_running_cell_and_its_stop_leaves_nothing(hub: Hub) -> None:
    """What jupyterhub-idle-culler reads: an idle server stays idle (the proxy's own polling
    is not the user's activity), a cell running with no tab open is activity. The hub's stop
    ends the sidecar, the server, its kernels and the iopub readers."""
    user = "carol"
    await hub.start_server(user)
    token = await hub.token(user)
    kernel_id = await _start_kernel(hub, user, token)
    await asyncio.sleep(3 * ACTIVITY_INTERVAL)
    idle = _activity(await hub.user(user))
    await asyncio.sleep(4 * ACTIVITY_INTERVAL)
    assert _activity(await hub.user(user)) == idle, "an idle server reported activity"

    started = time.time()
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
        execute = hub.server_url(user) + f"api/kernels/{kernel_id}/execute"
        code = "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(1)"
        async with http.post(execute, json={"code": code}) as resp:
            assert resp.status == 202, await resp.text()
    for _ in range(100):  # no client is connected: only the kernel is busy
        if _activity(await hub.user(user)) >= started + 3:
            break
        await asyncio.sleep(0.1)
    assert _activity(await hub.user(user)) >= started + 3, "a running cell was not activity"

    assert any("spool_writer" in command for _, command in processes_of(user))
    stopping = time.monotonic()
    await hub.stop_server(user)
    for _ in range(100):
        left = processes_of(user)
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == [], left
    assert time.monotonic() - stopping < 10  # within the spawner's SIGINT grace, not killed


async def test_a_sidecar_killed_leaves_no_server_behind(hub: Hub) -> None:
    """kill -9 of the sidecar (the spawner's last resort): jupyterhub-singleuser and its
    kernels end with it, and the hub, seeing the server gone, can start it again."""
    user = "dave"
    await hub.start_server(user)
    token = await hub.token(user)
    await _start_kernel(hub, user, token)
    (sidecar,) = [
        pid for pid, command in processes_of(user)
        if "jupyter-replay-proxy singleuser" in command
    ]  # fmt: skip
    os.kill(sidecar, signal.SIGKILL)
    for _ in range(150):
        left = [c for _, c in processes_of(user) if "spool_writer" not in c]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == [], left  # (its iopub readers wait for a successor, see the README)
    for _ in range(100):
        if not (await hub.user(user))["servers"]:
            break
        await asyncio.sleep(0.1)
    await hub.start_server(user)
    await hub.stop_server(user)
