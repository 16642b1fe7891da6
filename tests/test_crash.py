"""kill -9 of the proxy during a flood, a few times (``bench/crash.py`` does it twenty times):
the client that comes back with its session misses no line, and the log holds every line."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from .conftest import JupyterServer, RunningProxy, open_channels
from .crashes import flood_with_kills, summary


@pytest.mark.timeout(300)
async def test_kill_9_at_random_moments_of_a_flood_loses_nothing(
    jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    report = await flood_with_kills(
        jupyter_server, kernel_id, tmp_path / "log.sqlite", lines=1500, kills=3, seed=7
    )
    assert report.reply_status == "ok" and report.idle, summary(report)
    assert report.lost_at_client == [], summary(report)
    assert report.missing_from_log == [], summary(report)
    assert not report.out_of_order, summary(report)
    assert report.logged == list(range(report.lines)), "the log holds each line once, in order"


@pytest.mark.timeout(300)
async def test_killing_the_iopub_reader_mid_flood_loses_nothing(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """kill -9 of the proxy's iopub reader process while a cell prints: its standby takes
    over, and the client gets every line once, in order; the log holds each once."""
    lines = 6000
    channels = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        await channels.kernel_info()
        spools = zmq_proxy.proxy.spools
        await asyncio.sleep(0.5)  # (the standby's subscription lands)
        msg_id = await channels.send(
            "shell", "execute_request",
            {"code": f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n"
                     "    time.sleep(0.0002)",
             "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": True},
        )  # fmt: skip
        received: list[int] = []
        killed = None
        idle = False
        while not idle:
            message = await channels.recv(60)
            if message.parent_msg_id != msg_id or message.channel != "iopub":
                continue
            if message.msg_type == "stream":
                received += [int(n) for n in message.content()["text"].split()]
            idle = message.msg_type == "status" and b'"idle"' in message.parts[3]
            if killed is None and len(received) >= lines // 3:
                killed = spools.pid
                assert killed is not None
                os.kill(killed, signal.SIGKILL)
        assert killed is not None and spools.promotions == 1 and spools.pid != killed
        assert received == list(range(lines)), "lines lost, repeated or reordered"
    finally:
        await channels.close()
    rows = zmq_proxy.db().execute(
        "SELECT content FROM messages WHERE kernel_id = ? AND msg_type = 'stream' ORDER BY seq",
        (kernel_id,),
    )
    logged = [int(n) for (content,) in rows for n in json.loads(content)["text"].split()]
    assert logged == list(range(lines)), "the log lacks lines or holds some twice"
