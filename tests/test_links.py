"""Kernel lifecycle through both kinds of link: drops, restarts, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
from yarl import URL

from .conftest import (
    JupyterServer,
    RunningProxy,
    TcpCutter,
    make_proxy,
    open_channels,
    shutdown_kernel,
    start_kernel,
    stream_text,
)

COUNT_SLOWLY = "import time\nfor i in range(10):\n    print(i, flush=True)\n    time.sleep(0.3)"


async def test_websocket_link_reconnects_without_losing_output(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    cutter = TcpCutter(URL(jupyter_server.url).port)
    upstream = await cutter.start()
    running = await make_proxy(
        aiohttp_server, upstream, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="websocket",
    )  # fmt: skip
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        msg_id = await client.send(
            "shell", "execute_request",
            {"code": COUNT_SLOWLY, "silent": False, "store_history": False,
             "user_expressions": {}, "allow_stdin": False},
        )  # fmt: skip

        def printed() -> str:
            return stream_text([m for m in client.received if m.parent_msg_id == msg_id])

        while printed().count("\n") < 2:
            await client.recv()
        cutter.cut()  # the link drops mid-cell; jupyter-server buffers for its session_id
        reply, _ = await client.collect(msg_id)
        assert reply.content()["status"] == "ok"
        assert printed() == "".join(f"{i}\n" for i in range(10))
    finally:
        await client.close()
        await cutter.close()


async def _wait_for_state(client, state: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await client.recv(deadline - asyncio.get_running_loop().time())
        if message.msg_type == "status" and message.content()["execution_state"] == state:
            return


async def test_restart_through_the_proxy(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """Stock jupyter-server loses the output of a cell run right after a restart (its iopub
    subscription lands late, measured: 4 of 6 times); the zmq link holds the request until the
    new kernel's iopub reaches it."""
    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        for _ in range(3):
            await client.execute("x = 1")
            async with (
                aiohttp.ClientSession(headers=jupyter_server.headers()) as http,
                http.post(zmq_proxy.url + f"api/kernels/{kernel_id}/restart") as resp,
            ):
                assert resp.status == 200
            _, _, iopub = await client.execute("print('x' in dir())", timeout=60)
            assert stream_text(iopub) == "False\n"
    finally:
        await client.close()


async def test_input_right_after_a_restart_reaches_the_frontend(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """The kernel drops an input_request while the link's stdin is not connected: after a
    restart stdin reconnects apart from shell and iopub, so the link holds requests until it is."""
    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        for _ in range(3):
            async with (
                aiohttp.ClientSession(headers=jupyter_server.headers()) as http,
                http.post(zmq_proxy.url + f"api/kernels/{kernel_id}/restart") as resp,
            ):
                assert resp.status == 200
            msg_id = await client.send(
                "shell", "execute_request",
                {"code": "print(input('name? '))", "silent": False, "allow_stdin": True},
            )  # fmt: skip
            prompt = await client.recv(timeout=20)
            while prompt.msg_type != "input_request":
                prompt = await client.recv(timeout=20)
            await client.send("stdin", "input_reply", {"value": "ada"}, parent=prompt.header)
            _, iopub = await client.collect(msg_id)
            assert stream_text(iopub) == "ada\n"
    finally:
        await client.close()


async def _until_iopub_flows(client) -> None:  # type: ignore[no-untyped-def]
    """What jupyter-server's own nudge does: ask for kernel_info until iopub answers."""
    for _ in range(20):
        msg_id = await client.send("shell", "kernel_info_request", {})
        try:
            while True:
                message = await client.recv(timeout=0.5)
                if message.channel == "iopub" and message.parent_msg_id == msg_id:
                    return
        except asyncio.TimeoutError:
            continue
    raise AssertionError("iopub never flowed")


async def test_restart_through_a_websocket_link(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="websocket",
    )  # fmt: skip
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        await client.execute("x = 1")
        async with (
            aiohttp.ClientSession(headers=jupyter_server.headers()) as http,
            http.post(running.url + f"api/kernels/{kernel_id}/restart") as resp,
        ):
            assert resp.status == 200
        await _until_iopub_flows(client)
        _, _, iopub = await client.execute("print('x' in dir())")
        assert stream_text(iopub) == "False\n"
    finally:
        await client.close()


async def test_auto_restart_is_shown_as_jupyter_server_shows_it(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    client = await open_channels(proxy.url, kernel_id, jupyter_server.token)
    try:
        _, _, iopub = await client.execute("import os; print(os.getpid())")
        os.kill(int(stream_text(iopub)), signal.SIGKILL)
        await _wait_for_state(client, "restarting")  # made by jupyter-server, not the kernel
        for _ in range(3):
            try:
                _, _, iopub = await client.execute("print('back')", timeout=10)
                break
            except asyncio.TimeoutError:
                continue
        assert stream_text(iopub) == "back\n"
    finally:
        await client.close()


@pytest.mark.parametrize("link", ["zmq", "websocket"])
async def test_shutdown_closes_clients(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path, link: str
) -> None:
    kernel_id = await start_kernel(jupyter_server)
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link=link, kernel_poll_interval=0.2,
    )  # fmt: skip
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        await client.execute("1")
        await shutdown_kernel(jupyter_server, kernel_id)
        await client.closing(timeout=20)
        assert kernel_id not in running.proxy.relay.kernels
    finally:
        await client.close()
