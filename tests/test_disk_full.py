"""A full disk under the log and the spool: a real 4 MB tmpfs (mounting it needs root, as CI
has). Output keeps reaching the client from memory; once there is room again the log catches
up with every message, in order."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.links import ZmqLink

from .conftest import JupyterServer, make_proxy, open_channels, stream_text

LINES = 2000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


@pytest.mark.timeout(300)
async def test_a_full_disk_stops_no_output(
    aiohttp_server: Any, jupyter_server: JupyterServer, kernel_id: str, small_disk: Path
) -> None:
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        small_disk / "log.sqlite", writer_options={"retry_interval": 0.2}, link="zmq",
    )  # fmt: skip
    channels = await open_channels(running.url, kernel_id, jupyter_server.token)
    spool = None
    try:
        await channels.kernel_info()
        link = running.proxy.relay.kernels[kernel_id].link
        assert isinstance(link, ZmqLink)
        spool = link.iopub
        went_to_memory = False
        for round_ in range(3):
            code = f"for i in range({LINES}): print('{round_}', i, flush=True)"
            _, reply, iopub = await channels.execute(code, timeout=120)
            assert reply.content()["status"] == "ok"
            expected = "".join(f"{round_} {i}\n" for i in range(LINES))
            assert stream_text(iopub) == expected, f"round {round_}: lines missing at the client"
            went_to_memory |= spool.in_memory
        status = await (await channels.http.get(
            f"{running.url}replay-proxy/api/status", params={"token": jupyter_server.token}
        )).json()  # fmt: skip
        (kernel,) = [k for k in status["kernels"] if k["id"] == kernel_id]
        assert kernel["spool_dropped"] == 0 and status["log"]["pending"] > 0
        assert not running.writer.health().ok, "the disk never filled: the test tests nothing"
        assert went_to_memory, "the spool never had to keep output in memory"
    finally:
        await channels.close()
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    assert running.writer.flush(60), "the log did not catch up once there was room"
    assert running.writer.health().ok and running.writer.health().dropped == 0
    assert spool is not None and spool.dropped == 0
    rows = running.db().execute(
        "SELECT content FROM messages WHERE kernel_id = ? AND msg_type = 'stream' ORDER BY seq",
        (kernel_id,),
    )
    logged = "".join(json.loads(content)["text"] for (content,) in rows)
    assert logged == "".join(f"{r} {i}\n" for r in range(3) for i in range(LINES))
