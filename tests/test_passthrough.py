"""Everything the proxy does not need to understand reaches jupyter-server untouched."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import aiohttp
from pycrdt import (
    Array,
    Doc,
    Text,
    YMessageType,
    create_sync_message,
    create_update_message,
    handle_sync_message,
)

from .conftest import JupyterServer, RunningProxy


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


async def test_rest_answers_match_direct(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer
) -> None:
    (jupyter_server.root_dir / "hello.txt").write_text("hi there")
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        answers = []
        for base in (jupyter_server.url, zmq_proxy.url):
            async with http.get(base + "api/contents/hello.txt?content=1") as resp:
                answers.append((resp.status, (await resp.json())["content"]))
        assert answers[0] == answers[1] == (200, "hi there")
        async with http.get(zmq_proxy.url + "lab") as resp:
            assert resp.status == 200
            assert "JupyterLab" in await resp.text()
        async with http.get(zmq_proxy.url + "api/contents/no-such-file") as resp:
            assert resp.status == 404


async def test_large_download_and_upload_stream_through(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer
) -> None:
    size = 512 * 1024 * 1024
    big = jupyter_server.root_dir / "big.bin"
    with big.open("wb") as f:
        f.truncate(size)  # sparse: costs no disk, served like any file
    before = peak_rss_mb()
    received = 0
    try:
        async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
            async with http.get(zmq_proxy.url + "files/big.bin") as resp:
                assert resp.status == 200
                assert int(resp.headers["Content-Length"]) == size
                async for chunk in resp.content.iter_chunked(1 << 20):
                    received += len(chunk)
            assert received == size

            upload = 128 * 1024 * 1024
            head = b'{"type": "file", "format": "text", "content": "'

            async def body():  # type: ignore[no-untyped-def]
                yield head
                for _ in range(upload // (1 << 20)):
                    yield b"x" * (1 << 20)
                yield b'"}'

            async with http.put(
                zmq_proxy.url + "api/contents/uploaded.txt",
                data=body(),
                headers={"Content-Length": str(len(head) + upload + 2)},
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
    finally:
        big.unlink()
    uploaded = jupyter_server.root_dir / "uploaded.txt"
    assert uploaded.stat().st_size == upload
    uploaded.unlink()
    assert peak_rss_mb() - before < 100, "the proxy held a body in memory"


async def test_cookie_login_and_xsrf_work_as_direct(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer
) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(zmq_proxy.url + "login") as resp:
            assert resp.status == 200
        xsrf = next(c.value for c in jar if c.key == "_xsrf")
        async with http.post(
            zmq_proxy.url + "login",
            data={"password": jupyter_server.token, "_xsrf": xsrf},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302
        async with http.get(zmq_proxy.url + "api/contents") as resp:
            assert resp.status == 200  # the login cookie alone authenticates
        body = {"type": "file", "format": "text", "content": "by cookie"}
        async with http.put(zmq_proxy.url + "api/contents/by-cookie.txt", json=body) as resp:
            assert resp.status == 403  # jupyter-server's XSRF check, seen through the proxy
        async with http.put(
            zmq_proxy.url + "api/contents/by-cookie.txt", json=body, headers={"X-XSRFToken": xsrf}
        ) as resp:
            assert resp.status == 201
    assert (jupyter_server.root_dir / "by-cookie.txt").read_text() == "by cookie"


async def _join_room(http: aiohttp.ClientSession, base: str, token: str, path: str):  # type: ignore[no-untyped-def]
    async with http.put(
        base + f"api/collaboration/session/{path}", json={"format": "json", "type": "notebook"}
    ) as resp:
        assert resp.status in (200, 201), await resp.text()
        session = await resp.json()
    return await http.ws_connect(
        base + f"api/collaboration/room/json:notebook:{session['fileId']}",
        params={"sessionId": session["sessionId"], "token": token},
    )


async def _sync(ws: aiohttp.ClientWebSocketResponse, doc: Doc, until) -> None:  # type: ignore[no-untyped-def]
    async def loop() -> None:
        while not until():
            frame = await ws.receive()
            assert frame.type == aiohttp.WSMsgType.BINARY, frame
            if frame.data[0] == YMessageType.SYNC:
                reply = handle_sync_message(frame.data[1:], doc)
                if reply is not None:
                    await ws.send_bytes(reply)

    await asyncio.wait_for(loop(), 20)


async def test_y_room_websocket_passes_through(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer
) -> None:
    notebook = {
        "cells": [
            {"cell_type": "markdown", "id": "a1", "metadata": {}, "source": "hello from disk"}
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (jupyter_server.root_dir / "room.ipynb").write_text(json.dumps(notebook))
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        first = await _join_room(http, zmq_proxy.url, jupyter_server.token, "room.ipynb")
        second = await _join_room(http, zmq_proxy.url, jupyter_server.token, "room.ipynb")
        docs = [Doc(), Doc()]
        for ws, doc in zip((first, second), docs, strict=True):
            await ws.send_bytes(create_sync_message(doc))
            cells = doc.get("cells", type=Array)
            await _sync(ws, doc, lambda cells=cells: len(cells) == 1)
            assert str(cells[0]["source"]) == "hello from disk"

        # An edit by one client reaches the other through the proxy, both ways binary.
        def send_update(event) -> None:  # type: ignore[no-untyped-def]
            updates.append(event.update)

        updates: list[bytes] = []
        subscription = docs[0].observe(send_update)
        source: Text = docs[0].get("cells", type=Array)[0]["source"]
        source += ", edited"
        docs[0].unobserve(subscription)
        for update in updates:
            await first.send_bytes(create_update_message(update))
        other = docs[1].get("cells", type=Array)[0]["source"]
        await _sync(second, docs[1], lambda: str(other) == "hello from disk, edited")
        await first.close()
        await second.close()
    os.remove(jupyter_server.root_dir / "room.ipynb")
