"""The commands a user runs: `lab` and `serve`, as real processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from proxy.app import SingleUserApp

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
            # stopped while a cell runs: quietly, and its end is in the log
            running = await client.send(
                "shell", "execute_request",
                {"code": "import time\nfor i in range(300):\n    print(i); time.sleep(0.1)",
                 "silent": False, "store_history": True, "user_expressions": {},
                 "allow_stdin": False},
            )  # fmt: skip
            while (await client.recv()).parent_msg_id != running:
                pass  # until it runs
        finally:
            await client.close()
        assert status["log"]["ok"]
        db = tmp_path / "data" / "replay-proxy" / "log.sqlite"
        assert db.stat().st_mode & 0o777 == 0o600
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, output
    assert not re.search(r"Traceback|\[E |ERROR \|", output), output
    ended = (
        sqlite3.connect(db)
        .execute(
            "SELECT msg_type, content FROM messages WHERE parent_msg_id = ? ORDER BY seq",
            (running,),
        )
        .fetchall()
    )
    assert ended[-1][0] in ("execute_reply", "status")
    assert any(kind == "error" and "KeyboardInterrupt" in content for kind, content in ended), ended
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


def _mistake(tmp_path: Path, *args: str, status: int = 2, timeout: float = 60) -> str:
    """Run a command as a user who got something wrong: the one line it says."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=_env(tmp_path), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    said = result.stderr.strip().splitlines()
    assert (result.returncode, len(said)) == (status, 1), (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout and "[lab]" not in result.stderr
    assert said[0].startswith("jupyter-replay-proxy: ")
    assert time.monotonic() - started < timeout
    return said[0]


def test_a_users_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    db = f"--db={tmp_path / 'log.sqlite'}"
    (tmp_path / "a-file").write_text("")
    assert "unknown option --prot" in _mistake(tmp_path, "lab", "--prot", "18999", db)
    assert "unknown option --bogus" in _mistake(tmp_path, "serve", "--bogus", "x", db)
    assert "unknown option --follow" in _mistake(tmp_path, "stats", "--follow", db)
    assert "option --kernel needs a value" in _mistake(tmp_path, "log", "--kernel", db)
    assert "unexpected argument 'x'" in _mistake(tmp_path, "serve", "x", db)
    said = _mistake(tmp_path, "labb")
    assert "unknown command 'labb'" in said and "lab, serve" in said
    for where, why in (
        ("/proc/log.sqlite", "No such file or directory"),
        (f"{tmp_path / 'a-file'}/log.sqlite", f"{tmp_path / 'a-file'} is a file"),
        (str(tmp_path), "a directory"),
    ):
        said = _mistake(tmp_path, "serve", f"--db={where}")
        assert f"cannot create the log database at {where}: {why}" in said, said
        assert "choose another --db" in said
    assert "export needs --kernel" in _mistake(tmp_path, "export", db)
    said = _mistake(tmp_path, "lab", db, f"--root-dir={tmp_path / 'nowhere'}")
    assert "is not a directory" in said
    said = _mistake(tmp_path, "serve", db, "--ProxyApp.redact_patterns=['(']")
    assert "redact pattern '(' is not a regular expression" in said
    said = _mistake(tmp_path, "singleuser", db)  # not started by a JupyterHub spawner
    assert "$JUPYTERHUB_SERVICE_URL is not set" in said and "c.Spawner.cmd" in said


def test_a_port_in_use_stops_lab_before_jupyterlab_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = _mistake(
            tmp_path, "lab", f"--port={port}", f"--db={tmp_path / 'log.sqlite'}", timeout=15
        )
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in said
    assert "choose another --port" in said


def test_serve_refuses_a_token_jupyter_server_refuses(
    jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    said = _mistake(
        tmp_path, "serve", f"--upstream={jupyter_server.url}", "--upstream-token=wrong",
        f"--db={tmp_path / 'log.sqlite'}", f"--port={free_port()}",
    )  # fmt: skip
    assert "refused the proxy's token (403)" in said and "--upstream-token" in said
    assert "jupyter-collaboration" not in said


def test_serve_waits_for_a_server_not_up_yet_saying_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", f"--upstream=http://127.0.0.1:{free_port()}/",
         f"--db={tmp_path / 'log.sqlite'}", f"--port={free_port()}", "--upstream-token=t",
         "--ServeApp.upstream_wait=2"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Waiting for jupyter-server at" in result.stderr
    assert "did not answer within 2 s" in result.stderr.strip().splitlines()[-1]


def test_help_states_the_real_defaults_and_choices(tmp_path: Path) -> None:
    def helped(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args, "--help"], env=_env(tmp_path),
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip

    assert re.search(r"--port=<Int>\n.*\n\s+Default: 8889", helped("serve"))
    assert re.search(r"--port=<Int>\n.*\n\s+Default: 8888", helped("lab"))
    assert "['text', 'json', 'markdown']" in helped("transcript")


def test_status_and_stats_for_a_person(jupyter_server: JupyterServer, tmp_path: Path) -> None:
    db = tmp_path / "log.sqlite"
    empty = subprocess.run(
        [sys.executable, "-m", "proxy", "stats", f"--db={db}"], env=_env(tmp_path),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert empty.returncode == 2 and "no log database" in empty.stderr
    subprocess.run([sys.executable, "-m", "proxy", "migrate", f"--db={db}"], env=_env(tmp_path),
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    stats = subprocess.run(
        [sys.executable, "-m", "proxy", "stats", f"--db={db}"], env=_env(tmp_path),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert stats.stdout.strip() == f"{db}: the log is empty"

    port = free_port()
    env = {**_env(tmp_path), "JUPYTER_TOKEN": jupyter_server.token}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", f"--upstream={jupyter_server.url}",
         f"--port={port}", f"--db={db}",
         f"--ProxyApp.kernel_runtime_dir={jupyter_server.runtime_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen: list[str] = []
        _read_until(process, r"Proxying", seen)
        env.pop("JUPYTER_TOKEN")  # status finds the proxy, and its token, by itself
        status = subprocess.run(
            [sys.executable, "-m", "proxy", "status"], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("jupyter-replay-proxy ")
    assert lines[1] == f"upstream  {jupyter_server.url} (ok)"
    assert lines[2].startswith("log       ok; ") and "0 set aside" in lines[2]
    assert any(line.startswith("kernels   ") for line in lines)
    gone = subprocess.run(
        [sys.executable, "-m", "proxy", "status"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert gone.returncode == 1 and "no proxy of yours runs on this machine" in gone.stderr


def test_singleuser_takes_its_options_and_passes_the_rest_on() -> None:
    """A spawner's command line is the sidecar's and the server's at once (Spawner.args)."""
    app = SingleUserApp()
    app.parse_command_line(
        ["--port=9000", "--allow-root", "--ServerApp.root_dir=/srv", "--db", "/tmp/a.sqlite",
         "--SingleUserApp.handoff_grace=2", "--debug", "--ip", "0.0.0.0"]
    )  # fmt: skip
    assert (app.port, app.ip, app.db, app.handoff_grace) == (9000, "0.0.0.0", "/tmp/a.sqlite", 2)
    assert app.passed_on == ["--allow-root", "--ServerApp.root_dir=/srv", "--debug"]
