"""Outputs of a cell whose tab closed mid-run end up in the notebook: in the collaborative
document any frontend opens later, and in the saved .ipynb (real jupyter-server,
jupyter-collaboration and ipykernel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import nbformat
import pytest

from proxy.codecs import KERNEL_CHANNELS, Message, message_from_parts
from proxy.relay import Client, KernelRelay
from proxy.upstream import Upstream
from proxy.yroom import NotebookRoom

from .conftest import (
    JupyterServer,
    free_port,
    make_proxy,
    open_channels,
    open_channels_when_up,
    serve_proxy,
    start_jupyter_server,
    stop_jupyter_server,
)
from .test_lifecycle import NoKernel, Numbered

PRINTING = "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.25)\n'done'"


async def _run_in_cell(client: Any, code: str, cell_id: str) -> str:
    """Send an execute_request for a notebook cell, as JupyterLab does; its msg_id."""
    return await client.send(
        "shell", "execute_request",
        {"code": code, "silent": False, "store_history": True, "user_expressions": {},
         "allow_stdin": False, "stop_on_error": True},
        {"cellId": cell_id},
    )  # fmt: skip


async def _lines_printed(client: Any, msg_id: str, lines: int) -> None:
    """Receive until the execution has printed `lines` lines."""
    seen = 0
    while seen < lines:
        message = await client.recv()
        if message.msg_type == "stream" and message.parent_msg_id == msg_id:
            seen += message.content()["text"].count("\n")


def _notebook(root: Path, name: str, cells: dict[str, str]) -> None:
    notebook = nbformat.v4.new_notebook()
    for cell_id, source in cells.items():
        cell = nbformat.v4.new_code_cell(source)
        cell["id"] = cell_id
        notebook.cells.append(cell)
    nbformat.write(notebook, root / name)


async def _session(server: JupyterServer, proxy_url: str, name: str) -> str:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.post(proxy_url + "api/sessions", json={
            "path": name, "type": "notebook", "name": name, "kernel": {"name": "python3"},
        }) as resp,
    ):  # fmt: skip
        assert resp.status == 201, await resp.text()
        return (await resp.json())["kernel"]["id"]


async def _delete_kernel(server: JupyterServer, kernel_id: str) -> None:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.delete(server.url + f"api/kernels/{kernel_id}"),
    ):
        pass


class _Viewer(NotebookRoom):
    """Another frontend opening the notebook later: a Y client of its own."""

    @classmethod
    async def open(cls, server: JupyterServer, name: str) -> _Viewer:
        upstream = Upstream(server.url, server.token)
        await upstream.start()
        room = cls(upstream, name)
        room.start()
        await room.ready()
        return room

    async def close(self) -> None:
        await super().close()
        await self.upstream.close()


def _cell(room: NotebookRoom, cell_id: str) -> dict[str, Any]:
    ycell = room.cell(cell_id)
    assert ycell is not None
    return ycell.to_py()


def _text(cell: dict[str, Any]) -> str:
    return "".join(o["text"] for o in cell["outputs"] if o["output_type"] == "stream")


async def _until(check: Any, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.fixture
async def handoff(aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path, request):
    name = f"handoff-{request.node.name[:40]}.ipynb".replace("[", "-").replace("]", "")
    _notebook(jupyter_server.root_dir, name, {"printing": PRINTING, "other": "print('x')"})
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", handoff_grace=0.5,
    )  # fmt: skip
    kernel_id = await _session(jupyter_server, running.url, name)
    await running.proxy.refresh_kernels()
    yield running, kernel_id, name
    await _delete_kernel(jupyter_server, kernel_id)


async def test_a_cell_whose_tab_closed_mid_run_gets_every_output(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    msg_id = await _run_in_cell(client, PRINTING, "printing")
    await _lines_printed(client, msg_id, 2)
    await client.close()  # the tab closes; the cell prints on

    viewer = await _Viewer.open(jupyter_server, name)
    try:
        await _until(lambda: _cell(viewer, "printing").get("execution_state") == "running")
        await _until(lambda: _cell(viewer, "printing").get("execution_state") == "idle")
        cell = _cell(viewer, "printing")
        assert _text(cell) == "".join(f"{i}\n" for i in range(8))
        assert cell["execution_count"] == 1
        assert cell["outputs"][-1]["output_type"] == "execute_result"
        assert cell["outputs"][-1]["data"]["text/plain"] == "'done'"
        assert _cell(viewer, "other")["outputs"] == []
    finally:
        await viewer.close()

    def saved() -> dict[str, Any]:
        notebook = nbformat.read(jupyter_server.root_dir / name, as_version=4)
        return next(c for c in notebook.cells if c["id"] == "printing")

    await _until(lambda: saved().get("execution_count") == 1)
    on_disk = saved()
    assert "".join(
        o.get("text", "") for o in on_disk["outputs"] if o["output_type"] == "stream"
    ) == ("".join(f"{i}\n" for i in range(8)))


async def test_no_writes_while_the_executing_client_stays(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    folder = running.proxy.folder
    assert folder is not None
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        msg_id = await _run_in_cell(client, PRINTING, "printing")
        await client.collect(msg_id)  # 2 s, four grace periods, with its client there all along
        assert folder.handoffs == 0 and not running.proxy.rooms.rooms
    finally:
        await client.close()
    viewer = await _Viewer.open(jupyter_server, name)
    try:
        assert _cell(viewer, "printing")["outputs"] == []  # the client writes them, not the proxy
    finally:
        await viewer.close()


async def test_a_cell_executed_again_meanwhile_is_not_overwritten(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, _ = handoff
    leaving = await open_channels(running.url, kernel_id, jupyter_server.token)
    await _run_in_cell(leaving, PRINTING, "printing")
    staying = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        again = await _run_in_cell(staying, "print('second run')", "printing")
        relay = running.proxy.relay.kernels[kernel_id]
        await _until(lambda: again in relay.executions)  # requested before the first one's
        await leaving.close()  # client left: its execution is taken over at once, and found
        await staying.collect(again)  # superseded
        assert running.proxy.folder is not None and running.proxy.folder.handoffs == 0
        assert not running.proxy.rooms.rooms
    finally:
        await staying.close()


async def _queue_execution(
    http: aiohttp.ClientSession, proxy_url: str, kernel_id: str, body: dict[str, Any]
) -> str:
    """POST a server-side execution; the URL to follow it at."""
    async with http.post(proxy_url + f"api/kernels/{kernel_id}/execute", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return proxy_url.rstrip("/") + resp.headers["Location"]


async def _until_done(http: aiohttp.ClientSession, location: str, timeout: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(location) as resp:
            if resp.status != 202:
                return resp.status, await resp.json(), resp.headers.get("Location")
        assert asyncio.get_running_loop().time() < deadline, "execution did not end"
        await asyncio.sleep(0.1)


async def test_a_cell_run_as_soon_as_jupyterlab_names_its_notebook(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    """JupyterLab creates a notebook's session under a placeholder path and names the notebook
    in a PATCH just after; a cell run at once finds its notebook (it was refused, "no notebook
    session", when it came before the proxy's next look at the sessions)."""
    name = "named-late.ipynb"
    _notebook(jupyter_server.root_dir, name, {"printing": "print('ran')"})
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", kernel_poll_interval=3600,
    )  # fmt: skip
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        async with http.post(running.url + "api/sessions", json={
            "path": str(uuid.uuid4()), "type": "notebook", "name": "",
            "kernel": {"name": "python3"},
        }) as resp:  # fmt: skip
            assert resp.status == 201, await resp.text()
            session = await resp.json()
        kernel_id = session["kernel"]["id"]
        await running.proxy.refresh_kernels()  # (the proxy has looked: a placeholder)
        try:
            async with http.patch(
                running.url + f"api/sessions/{session['id']}", json={"path": name, "name": name}
            ) as resp:
                assert resp.status == 200, await resp.text()
            location = await _queue_execution(
                http, running.url, kernel_id, {"cell_id": "printing", "document_id": "json:x"}
            )
            status, result, _ = await _until_done(http, location)
            assert status == 200 and result["status"] == "ok"
        finally:
            await _delete_kernel(jupyter_server, kernel_id)


async def test_server_side_execution_of_a_cell_from_its_y_document(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    origin = running.url.rstrip("/")
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        location = await _queue_execution(
            http, running.url, kernel_id, {"cell_id": "printing", "document_id": "json:notebook:x"}
        )
        status, result, _ = await _until_done(http, location)
        assert status == 200 and result["status"] == "ok" and result["execution_count"] == 1
        streams = "".join(o["text"] for o in result["outputs"] if o["output_type"] == "stream")
        assert streams == "".join(f"{i}\n" for i in range(8))

        # jupyter-server-nbmodel's request shape, with input()
        location = await _queue_execution(http, running.url, kernel_id, {
            "code": "name = input('name? ')\nprint('hi', name)", "metadata": {"cell_id": "other"},
        })  # fmt: skip
        status, waiting, input_location = await _until_done(http, location)
        assert status == 300 and waiting["input_request"]["prompt"] == "name? "
        async with http.post(origin + input_location, json={"input": "ada"}) as resp:
            assert resp.status == 200
        status, result, _ = await _until_done(http, location)
        assert status == 200
        assert [o["text"] for o in result["outputs"]] == ["name?  ada\n", "hi ada\n"]

        async with http.post(
            running.url + f"api/kernels/{kernel_id}/execute", json={"cell_id": "printing"},
            params={"token": "wrong"}, headers={"Authorization": ""},
        ) as resp:  # fmt: skip
            assert resp.status == 403
        async with http.post(
            running.url + f"api/kernels/{kernel_id}/execute", data=b"{not json"
        ) as resp:
            assert resp.status == 400

    viewer = await _Viewer.open(jupyter_server, name)
    try:
        cell = _cell(viewer, "printing")
        assert _text(cell) == "".join(f"{i}\n" for i in range(8))
        assert cell["execution_count"] == 1 and cell["execution_state"] == "idle"
        assert [o["text"] for o in _cell(viewer, "other")["outputs"]] == [
            "name?  ada\n",  # the answer, echoed as JupyterLab echoes it
            "hi ada\n",
        ]
    finally:
        await viewer.close()
    conn = running.db()
    users = conn.execute("SELECT user, code FROM executions ORDER BY seq").fetchall()
    assert [code for _, code in users] == [PRINTING, "name = input('name? ')\nprint('hi', name)"]
    assert all(user for user, _ in users)  # named as jupyter-server's /api/me named the caller


async def test_outputs_after_the_reply_still_reach_the_cell(handoff) -> None:
    """The reply (shell) can overtake the last outputs (iopub): the relay ends an execution at
    its reply and its idle status, and the fold writes what came between. The order is forced
    here: the messages are made and fed to a relay with no kernel behind it; the notebook room
    is jupyter-collaboration's."""
    running, _, name = handoff
    folder = running.proxy.folder
    assert folder is not None
    room = await running.proxy.rooms.join(name)
    kernel_id = "a-kernel-of-made-messages"
    relay = KernelRelay(kernel_id, NoKernel(), [folder], Numbered())
    executor = Client("executor", kernel_id, "s", "internal", notebook_path=name)

    def message(channel: str, msg_type: str, content: dict[str, Any]) -> Message:
        request = msg_type == "execute_request"
        parts = [
            json.dumps({"msg_id": "request-1" if request else f"{msg_type}-1",
                        "msg_type": msg_type}).encode(),
            json.dumps({} if request else {"msg_id": "request-1"}).encode(),
            json.dumps({"cellId": "other"} if request else {}).encode(),
            json.dumps(content).encode(),
        ]  # fmt: skip
        return message_from_parts(
            channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True
        )

    try:
        relay.from_client(executor, message("shell", "execute_request", {"code": "late()"}))
        relay.from_kernel(message("shell", "execute_reply", {"status": "ok", "execution_count": 7}))
        assert _cell(room, "other")["execution_state"] == "running"  # not at its reply alone
        relay.from_kernel(message("iopub", "stream", {"name": "stdout", "text": "late\n"}))
        relay.from_kernel(message("iopub", "status", {"execution_state": "idle"}))
        cell = _cell(room, "other")
        assert _text(cell) == "late\n"
        assert cell["execution_count"] == 7 and cell["execution_state"] == "idle"
    finally:
        relay.close()
        running.proxy.rooms.leave(name)


async def test_a_frontend_of_the_kernel_answers_input_of_a_server_side_execution(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, _ = handoff
    watching = await open_channels(
        running.url, kernel_id, jupyter_server.token, session_id="watching-tab"
    )
    try:
        async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
            location = await _queue_execution(http, running.url, kernel_id, {
                "code": "import getpass\nsecret = getpass.getpass('who? ')\nprint(len(secret))",
                "metadata": {"cell_id": "other"},
            })  # fmt: skip
            prompt = await watching.recv()
            while prompt.msg_type != "input_request":
                prompt = await watching.recv()
            # addressed to this frontend, as if it had sent the request: JupyterLab's plugin
            # finds the cell by its id
            assert prompt.parent_header["session"] == "watching-tab"
            assert json.loads(prompt.parts[2])["cellId"] == "other"
            late = await open_channels(running.url, kernel_id, jupyter_server.token)
            try:  # a frontend opened while the prompt waits is asked as well
                asked = await late.recv()
                while asked.msg_type != "input_request":
                    asked = await late.recv()
                assert asked.msg_id == prompt.msg_id
            finally:
                await late.close()
            await watching.send(
                "stdin", "input_reply", {"status": "ok", "value": "grace"}, parent=prompt.header
            )
            status, result, _ = await _until_done(http, location)
        assert status == 200 and result["status"] == "ok"
        assert [o["text"] for o in result["outputs"]] == [
            "who?  \u00b7\u00b7\u00b7\u00b7\u00b7\u00b7\u00b7\u00b7\n",
            "5\n",
        ]
    finally:
        await watching.close()


async def test_pages_turn_server_side_execution_on(handoff, jupyter_server: JupyterServer) -> None:
    running, _, _ = handoff
    async with (
        aiohttp.ClientSession(headers=jupyter_server.headers()) as http,
        http.get(running.url + "lab") as resp,
    ):
        page = await resp.text()
    start = page.index('<script id="jupyter-config-data" type="application/json">')
    config = page[page.index(">", start) + 1 : page.index("</script>", start)]
    assert resp.status == 200 and json.loads(config)["serverSideExecution"] == "true"


async def test_a_returning_session_gets_its_reply_but_not_outputs_the_proxy_wrote(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    session = "returning-session"
    client = await open_channels(running.url, kernel_id, jupyter_server.token, session_id=session)
    msg_id = await _run_in_cell(client, PRINTING, "printing")
    while not any(m.msg_type == "stream" for m in client.received):
        await client.recv()
    await client.close()
    viewer = await _Viewer.open(jupyter_server, name)
    try:
        await _until(lambda: _cell(viewer, "printing").get("execution_state") == "running")
        back = await open_channels(running.url, kernel_id, jupyter_server.token, session_id=session)
        try:
            reply, iopub = await back.collect(msg_id)
            assert reply.content()["status"] == "ok"
            assert [m for m in iopub if m.msg_type == "stream"] == []  # the proxy wrote them
            assert iopub[-1].msg_type == "status"  # the state still reaches it
        finally:
            await back.close()
        await _until(lambda: _cell(viewer, "printing").get("execution_state") == "idle")
        assert _text(_cell(viewer, "printing")) == "".join(f"{i}\n" for i in range(8))
    finally:
        await viewer.close()


async def test_a_kernel_restart_ends_a_waiting_server_side_execution(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        location = await _queue_execution(http, running.url, kernel_id, {
            "code": "import time\ntime.sleep(60)", "metadata": {"cell_id": "other"},
        })  # fmt: skip
        executor = running.proxy.executor
        assert executor is not None
        await _until(lambda: any(job.state == "running" for job in executor.jobs.values()))
        async with http.post(running.url + f"api/kernels/{kernel_id}/restart") as resp:
            assert resp.status == 200
        status, result, _ = await _until_done(http, location)
    assert status == 200 and result["status"] == "error"
    assert "restart" in result["evalue"]
    viewer = await _Viewer.open(jupyter_server, name)
    try:  # the cell does not stay [*]
        await _until(lambda: _cell(viewer, "other").get("execution_state") == "idle")
    finally:
        await viewer.close()


async def test_server_side_executions_are_interrupted_from_the_toolbar_and_the_api(
    handoff, jupyter_server: JupyterServer
) -> None:
    running, kernel_id, name = handoff
    sleeping = {"code": "import time\ntime.sleep(60)", "metadata": {"cell_id": "other"}}
    async with aiohttp.ClientSession(headers=jupyter_server.headers()) as http:
        started = 0

        async def until_running(location: str) -> None:
            """Until the kernel runs the code (its execute_input is logged): an interrupt
            before that could come while the kernel is not yet in the cell's code."""
            nonlocal started
            started += 1
            for _ in range(100):
                with contextlib.closing(running.db()) as log:
                    (inputs,) = log.execute(
                        "SELECT count(*) FROM messages WHERE msg_type = 'execute_input'"
                        " AND json_extract(content, '$.code') = ?", (sleeping["code"],),
                    ).fetchone()  # fmt: skip
                if inputs == started:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError("the execution never ran")

        # JupyterLab's toolbar: the kernels API, through the proxy
        location = await _queue_execution(http, running.url, kernel_id, sleeping)
        await until_running(location)
        async with http.post(running.url + f"api/kernels/{kernel_id}/interrupt") as resp:
            assert resp.status == 204
        status, result, _ = await _until_done(http, location)
        assert status == 200 and result["status"] == "error"
        assert result["ename"] == "KeyboardInterrupt"

        # jupyter-server-nbmodel's way: DELETE the running request; a queued one is cancelled
        location = await _queue_execution(http, running.url, kernel_id, sleeping)
        queued = await _queue_execution(http, running.url, kernel_id, {"code": "print('never')"})
        await until_running(location)
        async with http.delete(queued) as resp:
            assert (await resp.json())["status"] == "cancelled"
        async with http.delete(location) as resp:
            assert resp.status == 200
        status, result, _ = await _until_done(http, location)
        assert status == 200 and result["ename"] == "KeyboardInterrupt"
        status, result, _ = await _until_done(http, queued)
        assert status == 200 and result["status"] == "cancelled"
    viewer = await _Viewer.open(jupyter_server, name)
    try:  # idle, and the cancelled request never ran
        await _until(lambda: _cell(viewer, "other").get("execution_state") == "idle")
        assert "never" not in json.dumps(_cell(viewer, "other")["outputs"])
    finally:
        await viewer.close()


async def test_a_takeover_survives_kill_9_of_the_proxy(
    jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    name = "handoff-kill-9.ipynb"
    code = "import time\nfor i in range(16):\n    print(i, flush=True)\n    time.sleep(0.25)"
    _notebook(jupyter_server.root_dir, name, {"printing": code})
    kernel_id = await _session(jupyter_server, jupyter_server.url, name)
    port, db = free_port(), tmp_path / "log.sqlite"
    url = f"http://127.0.0.1:{port}/"
    serving = ("--link=zmq", "--ProxyApp.handoff_grace=1")
    process = serve_proxy(jupyter_server, port, db, *serving)
    try:
        client = await open_channels_when_up(url, kernel_id, jupyter_server.token)
        msg_id = await _run_in_cell(client, code, "printing")
        await _lines_printed(client, msg_id, 3)
        # at once: what the tab was sent is in the log already
        process.send_signal(signal.SIGKILL)  # the proxy dies, and with it the tab's connection
        process.wait()
        await client.http.close()
        await asyncio.sleep(0.5)  # the cell prints on with no proxy at all
        process = serve_proxy(jupyter_server, port, db, *serving)

        viewer = await _Viewer.open(jupyter_server, name)
        try:  # the new proxy finds the cell unfinished in the log and takes it over
            await _until(lambda: _cell(viewer, "printing").get("execution_count") == 1, 30)
            await _until(lambda: _cell(viewer, "printing").get("execution_state") == "idle", 30)
            assert _text(_cell(viewer, "printing")) == "".join(f"{i}\n" for i in range(16))
        finally:
            await viewer.close()
    finally:
        process.kill()
        process.wait()
        await _delete_kernel(jupyter_server, kernel_id)


async def test_the_y_client_joins_again_after_an_upstream_restart(tmp_path: Path) -> None:
    server = start_jupyter_server(tmp_path)
    name = "rejoin.ipynb"
    _notebook(server.root_dir, name, {"a": "1 + 1"})
    upstream = Upstream(server.url, server.token)
    await upstream.start()
    room = NotebookRoom(upstream, name)
    room.start()
    try:
        await room.ready()
        first = room.doc
        server.process.kill()  # (stopping it gracefully hangs while a room is open: 20 s)
        server.process.wait()
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        server = start_jupyter_server(tmp_path, port=port, token=server.token)
        # the old document session is refused: a new one, and a fresh document synced from it
        await _until(lambda: room.doc is not first and room.synced.is_set(), 60)
        ycell = room.cell("a")
        assert ycell is not None and len(room.notebook.ycells) == 1  # nothing merged twice
        with room.doc.transaction():
            ycell["execution_count"] = 7
        viewer = await _Viewer.open(server, name)
        try:
            await _until(lambda: _cell(viewer, "a").get("execution_count") == 7)
            assert len(viewer.notebook.ycells) == 1
        finally:
            await viewer.close()
    finally:
        await room.close()
        await upstream.close()
        stop_jupyter_server(server)


async def test_a_clean_close_is_taken_over_at_once(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path
) -> None:
    """A tab that closes says goodbye (a close frame): no reconnect follows, so a collaborator
    watching sees the outputs go on within a second, not after the grace period."""
    name = "handoff-clean-close.ipynb"
    _notebook(jupyter_server.root_dir, name, {"printing": PRINTING})
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", handoff_grace=60,
    )  # fmt: skip
    kernel_id = await _session(jupyter_server, running.url, name)
    viewer = await _Viewer.open(jupyter_server, name)
    try:
        client = await open_channels(running.url, kernel_id, jupyter_server.token)
        msg_id = await _run_in_cell(client, PRINTING, "printing")
        await _lines_printed(client, msg_id, 2)
        await client.close()  # a close frame, code 1000
        closed = asyncio.get_running_loop().time()
        await _until(lambda: _text(_cell(viewer, "printing")) != "", timeout=5)
        assert asyncio.get_running_loop().time() - closed <= 1.0
        await _until(lambda: _cell(viewer, "printing").get("execution_state") == "idle")
        assert _text(_cell(viewer, "printing")) == "".join(f"{i}\n" for i in range(8))
    finally:
        await viewer.close()
        await _delete_kernel(jupyter_server, kernel_id)
