"""The adversarial suite in CI: generated frames of both protocols (``tests/frames.py``) on two
kernels' channels, beside a well-behaved frontend on each that must not notice. ``bench/fuzz.py``
runs the same for 100,000 frames."""

from __future__ import annotations

import asyncio

import pytest

from .adversary import GoodClient, Tally, draw_frames, fuzz
from .conftest import (
    JupyterServer,
    RunningProxy,
    open_channels,
    shutdown_kernel,
    start_kernel,
    stream_text,
)

FRAMES = 1500
FUZZERS = 3


@pytest.mark.timeout(300)
async def test_fuzzed_frames_harm_neither_other_clients_nor_kernels_nor_the_log(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    kernels = [kernel_id, await start_kernel(jupyter_server)]
    try:
        frames = draw_frames(FRAMES, seed=11)
        stop = asyncio.Event()
        good = [GoodClient() for _ in kernels]
        runs = [
            asyncio.ensure_future(client.run(zmq_proxy.url, kernel, jupyter_server.token, stop))
            for client, kernel in zip(good, kernels, strict=True)
        ]
        tally = Tally()
        shares = [frames[i::FUZZERS] for i in range(FUZZERS)]
        try:
            await asyncio.gather(
                *(fuzz(zmq_proxy.url, kernels, jupyter_server.token, s, tally) for s in shares)
            )
        finally:
            stop.set()
            await asyncio.gather(*runs)
        for kernel in kernels:  # every fuzzed kernel still answers
            client = await open_channels(zmq_proxy.url, kernel, jupyter_server.token)
            try:
                _, reply, iopub = await client.execute("print('still here')", timeout=30)
            finally:
                await client.close()
            assert (reply.content()["status"], stream_text(iopub)) == ("ok", "still here\n")
    finally:
        await shutdown_kernel(jupyter_server, kernels[1])

    assert tally.sent == FRAMES
    assert tally.wrong == []
    assert sum(tally.closes.values()) > FRAMES // 3 and sum(tally.relayed.values()) > FRAMES // 5
    assert [failure for client in good for failure in client.failures] == []
    assert all(client.executions > 10 for client in good)
    assert zmq_proxy.writer.flush(30)
    health = zmq_proxy.writer.health()
    assert (health.ok, health.set_aside, health.dropped) == (True, 0, 0)
    logged = {row[0] for row in zmq_proxy.db().execute("SELECT msg_id FROM messages")}
    good_ids = [msg_id for client in good for msg_id in client.message_ids]
    assert [msg_id for msg_id in good_ids if msg_id not in logged] == []
    assert [msg_id for msg_id in tally.valid_ids if msg_id not in logged] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no tracebacks
