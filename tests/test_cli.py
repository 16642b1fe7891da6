"""The commands a user runs: `lab` and `serve`, as real processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from .conftest import JupyterServer, free_port, open_channels, start_kernel, stream_text


def _read_until(
    process: subprocess.Popen[str], pattern: str, seen: list[str], timeout: float = 90
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not printed; got:\n{''.join(seen)[-3000:]}")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
    }


async def test_lab_command_runs_jupyterlab_behind_the_proxy(tmp_path: Path) -> None:
    port = free_port()
    seen: list[str] = []
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "lab", f"--port={port}", f"--root-dir={tmp_path}"],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path,  # where JupyterLab keeps its .jupyter_ystore.db
    )  # fmt: skip
    try:
        match = await asyncio.to_thread(
            _read_until, process, rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", seen
        )
        token = match[1]
        base = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
            async with http.get(base + "lab") as resp:
                assert resp.status == 200
            async with http.post(base + "api/kernels", json={"name": "python3"}) as resp:
                kernel_id = (await resp.json())["id"]
            async with http.get(base + "replay-proxy/api/status") as resp:
                status = await resp.json()
        client = await open_channels(base, kernel_id, token)
        try:
            _, _, iopub = await client.execute("print('through lab')")
            assert stream_text(iopub) == "through lab\n"
        finally:
            await client.close()
        assert status["log"]["ok"]
        db = tmp_path / "data" / "replay-proxy" / "log.sqlite"
        assert db.stat().st_mode & 0o777 == 0o600
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, output
    leaks = [line for line in [*seen, *output.splitlines()] if token in line]
    assert [line.strip() for line in leaks] == [match[0]], (
        "the token is in more than the URL printed for the user"
    )
    kernel_files = list((tmp_path / "runtime").glob("kernel-*.json"))
    assert kernel_files == [], "kernels were left running"


async def test_serve_discovers_the_token_of_a_local_server(
    jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {**_env(tmp_path), "JUPYTER_RUNTIME_DIR": str(jupyter_server.runtime_dir)}
    env.pop("JUPYTER_TOKEN", None)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "proxy", "serve", f"--upstream={jupyter_server.url}",
            f"--port={port}", f"--db={tmp_path / 'log.sqlite'}",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen: list[str] = []
        await asyncio.to_thread(_read_until, process, r"Proxying", seen)
        kernel_id = await start_kernel(jupyter_server)
        base = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
            for _ in range(50):
                async with http.get(base + "replay-proxy/api/status") as resp:
                    status = await resp.json()
                if any(k["id"] == kernel_id for k in status["kernels"]):
                    break
                await asyncio.sleep(0.2)
        # It followed the new kernel by itself: it found the server's token on its own.
        kernel = next(k for k in status["kernels"] if k["id"] == kernel_id)
        assert (kernel["link"], kernel["clients"], type(kernel["spool_peak"])) == ("zmq", 0, int)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, output
    assert jupyter_server.token not in "".join(seen) + output


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream=ftp://nowhere", f"--db={tmp_path}/x"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "upstream must be an http(s) URL" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--link=carrier-pigeon"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "carrier-pigeon" in result.stderr


async def test_serve_masks_credentials_in_every_log_line(
    jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    """Also in what aiohttp logs of a request it cannot parse: that is one line, no traceback."""
    port = free_port()
    env = {**_env(tmp_path), "JUPYTER_TOKEN": jupyter_server.token}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "proxy", "serve", f"--upstream={jupyter_server.url}",
            f"--port={port}", f"--db={tmp_path / 'log.sqlite'}",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    secret = jupyter_server.token
    try:
        seen: list[str] = []
        await asyncio.to_thread(_read_until, process, r"Proxying", seen)
        for head in (
            f"GET /api/status HTTP/1.1\nHost: x\nAuthorization: token {secret}\n\n",
            f"GET /api/status?token={secret} HTTP/1.1\r\nCookie: a=1; t={secret}\r\nX: \0\r\n\r\n",
            f"GET /nowhere?token={secret} HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head.encode())
            await reader.read(100)
            writer.close()
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    output = "".join(seen) + output
    assert process.returncode == 0, output
    assert secret not in output
    assert "Traceback" not in output
    assert output.count("Bad HTTP request from 127.0.0.1") == 2, output
    assert "token=[secret]" in output  # the third, a well-formed request, in the access log
