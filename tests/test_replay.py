"""Replay to reconnecting and late-joining clients, against a real jupyter-server and ipykernel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

import aiohttp
import pytest

from proxy.codecs import KERNEL_CHANNELS, message_from_parts
from proxy.database import connect, open_database
from proxy.relay import FROM_KERNEL, TO_KERNEL, Client, KernelRelay
from proxy.taps.log import LogWriter
from proxy.taps.replay import Replayer

from .conftest import (
    JupyterServer,
    RunningProxy,
    make_proxy,
    open_channels,
    open_channels_when_up,
    serve_proxy,
    stream_text,
)
from .test_lifecycle import NoKernel, made, status

COUNT_SLOWLY = "import time\nfor i in range(10):\n    print(i, flush=True)\n    time.sleep(0.3)"
EXECUTE = {"silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}


def lines_of(messages) -> list[str]:  # type: ignore[no-untyped-def]
    return stream_text([m for m in messages if m.channel == "iopub"]).split()


def _logged_lines(proxy: RunningProxy, msg_id: str) -> int:
    """How many stream messages of an execution the proxy has logged."""
    with contextlib.closing(proxy.db()) as log:
        (count,) = log.execute(
            "SELECT count(*) FROM messages WHERE parent_msg_id = ? AND msg_type = 'stream'",
            (msg_id,),
        ).fetchone()
    return count


async def test_blip_reconnect_mid_cell_misses_nothing(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    session = secrets.token_hex(8)
    first = await open_channels(proxy.url, kernel_id, jupyter_server.token, session_id=session)
    msg_id = await first.send("shell", "execute_request", {"code": COUNT_SLOWLY, **EXECUTE})

    def of_cell(messages):  # type: ignore[no-untyped-def]
        return [m for m in messages if m.parent_msg_id == msg_id]

    while lines_of(of_cell(first.received)) != ["0", "1"]:
        await first.recv()
    # A browser answers the proxy's ping as soon as it reads it; then the network drops.
    # (A blip inside that round trip makes the messages of the round trip arrive twice.)
    await first.drain(quiet=0.1)
    first.blip()
    await first.http.close()
    while _logged_lines(proxy, msg_id) < 4:  # the cell goes on printing meanwhile
        await asyncio.sleep(0.05)
    second = await open_channels(proxy.url, kernel_id, jupyter_server.token, session_id=session)
    try:
        reply, _ = await second.collect(msg_id)
        assert reply.content()["status"] == "ok"
        assert lines_of(of_cell(first.received)) + lines_of(of_cell(second.received)) == [
            str(i) for i in range(10)
        ]
    finally:
        await second.close()


async def test_late_joiner_sees_a_busy_kernel_at_once(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    runner = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        msg_id = await runner.send(
            "shell", "execute_request", {"code": "import time; time.sleep(4)", **EXECUTE}
        )
        while not ((m := await runner.recv()).msg_type == "execute_input"
                   and m.parent_msg_id == msg_id):  # fmt: skip
            pass  # until the cell runs
        started = time.monotonic()
        late = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
        try:
            first = await late.recv(timeout=5)
            waited = time.monotonic() - started
            assert first.msg_type == "status"
            assert first.content()["execution_state"] == "busy"
            assert first.parent_msg_id == msg_id
            assert waited < 1.0
        finally:
            await late.close()
        await runner.collect(msg_id)
    finally:
        await runner.close()


async def test_pending_input_is_answered_by_a_late_joiner(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    # at once, to a kernel just started: the proxy must not send the request before the
    # kernel can route input_request to it (its stdin connects apart from its shell)
    asker = await open_channels(proxy.url, kernel_id, jupyter_server.token)
    code = "name = input('name? ')\nprint('hello', name)"
    msg_id = await asker.send(
        "shell", "execute_request", {"code": code, **EXECUTE, "allow_stdin": True}
    )
    try:
        while not any(m.msg_type == "input_request" for m in asker.received):
            await asker.recv()
    except asyncio.TimeoutError:
        got = [(m.channel, m.msg_type) for m in asker.received if m.parent_msg_id == msg_id]
        raise AssertionError(f"no input_request; the asker got {got}") from None
    await asker.close()  # the requester is gone, the kernel still waits

    helper = await open_channels(proxy.url, kernel_id, jupyter_server.token)
    try:
        request = None
        while request is None:
            message = await helper.recv(timeout=10)
            if message.msg_type == "input_request":
                request = message
        assert request.content()["prompt"] == "name? "
        await helper.send("stdin", "input_reply", {"value": "ada"}, parent=request.header)
        while "hello ada" not in stream_text(
            [m for m in helper.received if m.parent_msg_id == msg_id]
        ):
            await helper.recv(timeout=10)
    finally:
        await helper.close()


async def test_replay_query_variants(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    runner = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    first_id, _, first_iopub = await runner.execute("print('first')")
    second_id, _, _ = await runner.execute("print('second')")
    await runner.close()

    def seq(message) -> int:  # type: ignore[no-untyped-def]
        return json.loads(message.parts[2])["replay_proxy_seq"]

    async def history(replay: str) -> list:  # type: ignore[type-arg]
        """What a tool gets before live traffic (live traffic follows: cut it off)."""
        boundary = zmq_proxy.writer.last_seq
        tool = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, replay=replay)
        try:
            await tool.drain()
        finally:
            await tool.close()
        seqs = [seq(m) for m in tool.received]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, once
        return [m for m in tool.received if seq(m) <= boundary]

    everything = await history("all")
    assert "first\n" in stream_text(everything) and "second\n" in stream_text(everything)
    # iopub is everyone's; replies stay with the session that asked (the runner's).
    assert [m.msg_type for m in everything if m.parent_msg_id == first_id] == [
        m.msg_type for m in first_iopub
    ]
    assert second_id in {m.parent_msg_id for m in everything}

    idle = next(
        m for m in everything
        if m.parent_msg_id == first_id and m.msg_type == "status"
        and m.content()["execution_state"] == "idle"
    )  # fmt: skip
    since = await history(f"since:{seq(idle)}")
    assert stream_text(since) == "second\n"
    assert all(seq(m) > seq(idle) for m in since)

    # last:2 is the two latest of the log when the tool joins: joining itself may add some
    # (jupyter-server nudges the kernel for the admission probe), so they are read back
    zmq_proxy.writer.flush()
    (boundary,) = (
        zmq_proxy.db()
        .execute(
            "SELECT max(seq) FROM messages WHERE kernel_id = ? AND channel = 'iopub'", (kernel_id,)
        )
        .fetchone()
    )
    tool = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, replay="last:2")
    try:
        await tool.drain()
    finally:
        await tool.close()
    last = [seq(m) for m in tool.received[:2]]
    expected = zmq_proxy.db().execute(
        "SELECT seq FROM messages WHERE kernel_id = ? AND direction = 'from_kernel' "
        "AND channel = 'iopub' AND seq <= ? ORDER BY seq DESC LIMIT 2",
        (kernel_id, last[-1]),
    )
    assert last == sorted(row[0] for row in expected) and last[-1] >= boundary

    parent = await history(f"parent:{first_id}")
    assert {m.parent_msg_id for m in parent} == {first_id}
    assert [m.msg_type for m in parent if m.channel == "iopub"] == [m.msg_type for m in first_iopub]

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, replay="yesterday")
    assert refused.value.status == 400


async def test_a_stalled_client_neither_slows_others_nor_loses_anything(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    """Small bounds everywhere: the stalled client's queue and the log's backlog (past which
    the link stops relaying, so the flood waits in the iopub spool, on disk)."""
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", writer_options={"max_behind": 100}, link="zmq",
        max_client_queue=200, max_client_queue_bytes=64 * 1024, spool_dir=tmp_path,
    )  # fmt: skip
    stalled = await open_channels(running.url, kernel_id, jupyter_server.token)
    reader = await open_channels(running.url, kernel_id, jupyter_server.token)
    lines = 20_000
    try:
        msg_id, reply, iopub = await reader.execute(
            f"for i in range({lines}):\n    print(i, 'x' * 100, flush=True)", timeout=120
        )
        assert reply.content()["status"] == "ok"
        assert len(stream_text(iopub).splitlines()) == lines
        behind = [c for c in running.proxy.relay.kernels[kernel_id].clients.values()]
        assert any(c.times_behind > 0 for c in behind), "the stalled client never fell behind"
        # Now it reads: everything, in order, once.
        while not any(
            m.msg_type == "status" and m.parent_msg_id == msg_id
            and m.content()["execution_state"] == "idle"
            for m in stalled.received
        ):  # fmt: skip
            await stalled.recv(timeout=30)
        printed = stream_text([m for m in stalled.received if m.parent_msg_id == msg_id])
        assert [line.split()[0] for line in printed.splitlines()] == [str(i) for i in range(lines)]
        assert running.proxy.relay.kernels[kernel_id].link.iopub.peak > 0, "nothing waited"
        with running.db() as db:  # and the log has every line, in order
            logged = "".join(
                json.loads(content)["text"]
                for (content,) in db.execute(
                    "SELECT content FROM messages WHERE parent_msg_id = ? AND msg_type = 'stream'"
                    " ORDER BY seq",
                    (msg_id,),
                )
            )
        assert logged == printed
    finally:
        await stalled.close()
        await reader.close()


@pytest.mark.parametrize("link", ["zmq", "websocket"])
async def test_kill_9_and_restart_of_the_proxy_mid_cell(
    jupyter_server: JupyterServer, kernel_id: str, tmp_path, link: str
) -> None:
    import signal

    from .conftest import free_port

    port, db = free_port(), tmp_path / "log.sqlite"
    url = f"http://127.0.0.1:{port}/"
    session = secrets.token_hex(8)
    code = "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.25)"
    process = serve_proxy(jupyter_server, port, db, f"--link={link}")
    try:
        first = await open_channels_when_up(url, kernel_id, jupyter_server.token, session)
        msg_id = await first.send("shell", "execute_request", {"code": code, **EXECUTE})
        while len(lines_of([m for m in first.received if m.parent_msg_id == msg_id])) < 4:
            await first.recv()
        await first.drain(quiet=0.1)
        process.send_signal(signal.SIGKILL)
        process.wait()
        await first.http.close()
        await asyncio.sleep(1.0)  # the cell prints on while no proxy runs
        process = serve_proxy(jupyter_server, port, db, f"--link={link}")
        second = await open_channels_when_up(url, kernel_id, jupyter_server.token, session)
        try:
            reply, _ = await second.collect(msg_id)
            assert reply.content()["status"] == "ok"
            mine = [m for m in second.received if m.parent_msg_id == msg_id]
            before = [m for m in first.received if m.parent_msg_id == msg_id]
            assert lines_of(before) + lines_of(mine) == [str(i) for i in range(20)]
        finally:
            await second.close()
    finally:
        process.kill()
        process.wait()


async def test_a_cell_runs_until_both_its_reply_and_its_idle_are_logged(tmp_path) -> None:
    """What a restarted proxy follows again: the reply can overtake the last outputs, so a
    logged reply alone does not end a cell's execution; its idle status does, with the reply."""
    db = tmp_path / "log.sqlite"
    open_database(db).close()
    writer = LogWriter(lambda: connect(db))
    kernel_id = "k"

    def logged(direction: str, channel: str, msg_type: str, parent: str, content: dict) -> str:
        header = {"msg_id": secrets.token_hex(8), "msg_type": msg_type, "session": "s",
                  "username": "u", "date": "2026-11-25T10:00:00Z", "version": "5.4"}  # fmt: skip
        parent_header = {"msg_id": parent, "msg_type": "execute_request"} if parent else {}
        metadata = {} if parent else {"cellId": "cell-1"}
        parts = [json.dumps(part).encode() for part in (header, parent_header, metadata, content)]
        message = message_from_parts(
            channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=False
        )
        writer.message_relayed(writer.next_seq(), kernel_id, direction, message, None, time.time())
        return header["msg_id"]

    replayer = Replayer(writer, lambda: connect(db))
    try:
        request = logged(TO_KERNEL, "shell", "execute_request", "", {"code": "print(1)"})
        logged(FROM_KERNEL, "iopub", "stream", request, {"name": "stdout", "text": "1\n"})
        logged(FROM_KERNEL, "shell", "execute_reply", request, {"status": "ok"})
        assert writer.flush()
        assert (await replayer.remember(kernel_id)).executions == [request]
        logged(FROM_KERNEL, "iopub", "status", request, {"execution_state": "idle"})
        assert writer.flush()
        assert (await replayer.remember(kernel_id)).executions == []
    finally:
        replayer.close()
        writer.close()


async def test_a_restart_the_log_has_no_message_of_ends_what_ran_for_a_later_proxy(
    tmp_path,
) -> None:
    """A restart asked of jupyter-server's REST API leaves no message in the log. The relay's
    decision is logged in its stead (the log tap hears `kernel_restarted`), so a proxy started
    later does not follow an execution that restart ended, as it would for one still running."""
    db = tmp_path / "log.sqlite"
    open_database(db).close()
    writer = LogWriter(lambda: connect(db))
    replayer = Replayer(writer, lambda: connect(db))
    relay = KernelRelay("k", NoKernel(), [writer], writer)
    tab = Client("c", "k", "s", "v1")
    try:
        relay.attach(tab)
        relay.from_client(tab, made("shell", "execute_request", {"code": "1"}, msg_id="ran"))
        relay.from_kernel(status("busy", "ran"))
        assert writer.flush()
        assert (await replayer.remember("k")).executions == ["ran"]
        relay.restarted()  # (as the pass-through reports a restart jupyter-server accepted)
        assert writer.flush()
        assert (await replayer.remember("k")).executions == []
        relay.from_client(tab, made("shell", "execute_request", {"code": "2"}, msg_id="after"))
        assert writer.flush()
        assert (await replayer.remember("k")).executions == ["after"]
    finally:
        relay.close()
        replayer.close()
        writer.close()


async def test_a_resuming_session_is_told_how_much_it_is_sent_again(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """What a session had but had not acknowledged when it dropped is sent again at its
    resume (at most one acknowledgement round trip); status and metrics count it."""
    session = secrets.token_hex(8)
    first = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, session_id=session)
    msg_id = await first.send("shell", "execute_request", {"code": COUNT_SLOWLY, **EXECUTE})
    while "3" not in lines_of([m for m in first.received if m.parent_msg_id == msg_id]):
        await first.recv()
    first.blip()  # before reading the ping that follows line 3: that line is not acknowledged
    await first.http.close()
    second = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, session_id=session)
    try:
        await second.collect(msg_id)
        again = {m.msg_id for m in first.received} & {m.msg_id for m in second.received}
        status = await (await second.http.get(
            f"{zmq_proxy.url}replay-proxy/api/status", params={"token": jupyter_server.token}
        )).json()  # fmt: skip
        (client,) = status["clients"]
        assert client["resent"] == len(again) >= 1
        assert zmq_proxy.proxy.replayer.resent_messages == len(again)
    finally:
        await second.close()
