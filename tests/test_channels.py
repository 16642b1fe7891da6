"""Kernel channels through the proxy, against a real jupyter-server and ipykernel."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from yarl import URL

from proxy.codecs import V1_SUBPROTOCOL
from proxy.upstream import is_kernel_id

from .conftest import JupyterServer, KernelChannels, RunningProxy, open_channels, stream_text

PROTOCOLS = [V1_SUBPROTOCOL, None]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["v1", "legacy"])
async def test_execute_through_proxy(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str, protocol: str | None
) -> None:
    client = await open_channels(proxy.url, kernel_id, jupyter_server.token, protocol=protocol)
    try:
        assert client.protocol == (protocol or "legacy")
        _, reply, iopub = await client.execute("print('hello', 6 * 7)")
        assert reply.content()["status"] == "ok"
        assert stream_text(iopub) == "hello 42\n"
        types = [m.msg_type for m in iopub]
        assert types[0] == "status" and types[-1] == "status"
        assert "execute_input" in types
    finally:
        await client.close()


async def test_three_clients_get_own_replies_and_all_iopub(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    clients = [
        await open_channels(proxy.url, kernel_id, jupyter_server.token, protocol=protocol)
        for protocol in (V1_SUBPROTOCOL, None, V1_SUBPROTOCOL)
    ]
    try:
        request_ids = []
        for i, client in enumerate(clients):
            msg_id, reply, _ = await client.execute(f"print('from client {i}')")
            assert reply.content()["status"] == "ok"
            request_ids.append(msg_id)
        for i, client in enumerate(clients):
            # What the kernel sent before a last request's reply (shell) and idle (iopub) has
            # reached the client before them: each channel keeps its order.
            barrier = await client.send("shell", "kernel_info_request", {})
            await client.collect(barrier)
            replies = [
                m for m in client.received if m.channel == "shell" and m.parent_msg_id != barrier
            ]
            assert [m.parent_msg_id for m in replies] == [request_ids[i]]
            printed = stream_text(  # every client's output, and nothing else (the kernel may
                [m for m in client.received if m.parent_msg_id in request_ids]  # warn at start)
            )
            assert printed == "from client 0\nfrom client 1\nfrom client 2\n"
    finally:
        for client in clients:
            await client.close()


async def test_log_rows_for_an_execution(
    proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    client = await open_channels(proxy.url, kernel_id, jupyter_server.token)
    try:
        msg_id, _, iopub = await client.execute("print('logged')")
    finally:
        await client.close()
    db = proxy.db()
    rows = db.execute(
        "SELECT * FROM messages WHERE msg_id = ? OR parent_msg_id = ? ORDER BY seq",
        (msg_id, msg_id),
    ).fetchall()
    request = rows[0]
    assert (request["direction"], request["channel"], request["msg_type"]) == (
        "to_kernel", "shell", "execute_request",
    )  # fmt: skip
    assert json.loads(request["content"])["code"] == "print('logged')"
    assert request["client_id"] is not None
    children = [(r["channel"], r["msg_type"]) for r in rows[1:]]
    assert [m.msg_type for m in iopub] == [t for c, t in children if c == "iopub"]
    assert ("shell", "execute_reply") in children
    assert all(r["direction"] == "from_kernel" for r in rows[1:])
    reply = next(r for r in rows if r["msg_type"] == "execute_reply")
    assert reply["client_id"] == request["client_id"]
    assert all(r["kernel_id"] == kernel_id and r["received_at"] for r in rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    who = db.execute(
        "SELECT username, session_id, protocol, disconnected_at FROM clients WHERE client_id = ?",
        (request["client_id"],),
    ).fetchone()
    assert who["username"]  # as /api/me reports the token's user
    assert who["protocol"] == V1_SUBPROTOCOL
    assert who["disconnected_at"] is not None
    stream = next(r for r in rows if r["msg_type"] == "stream")
    assert json.loads(stream["content"]) == {"name": "stdout", "text": "logged\n"}


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong", "missing"])
async def test_refused_without_valid_credentials(
    zmq_proxy: RunningProxy, kernel_id: str, token: str | None
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channels(zmq_proxy.url, kernel_id, token)
    assert refused.value.status == 403


async def test_unknown_kernel_is_404(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channels(
            zmq_proxy.url, "00000000-0000-0000-0000-000000000000", jupyter_server.token
        )
    assert refused.value.status == 404


async def test_status_endpoint_needs_credentials(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    url = zmq_proxy.url + "replay-proxy/api/status"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 403
        await zmq_proxy.proxy.refresh_kernels()
        async with http.get(url, headers=jupyter_server.headers()) as resp:
            assert resp.status == 200
            status = await resp.json()
    assert status["log"]["ok"] is True
    kernel = next(k for k in status["kernels"] if k["id"] == kernel_id)
    assert (kernel["link"], kernel["clients"], type(kernel["spool_peak"])) == ("zmq", 0, int)
    assert jupyter_server.token not in json.dumps(status)


def _v1(offsets: list[int], body: bytes) -> bytes:
    import struct

    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + body


BAD_FRAMES = {
    "truncated offsets": _v1([56, 61], b"shell")[:20],
    "offsets past the end": _v1([56, 61, 63, 65, 67, 900], b"shell{}{}{}{}"),
    "invalid utf-8": _v1([56, 61, 63, 65, 67, 69], b"shell\xff\xfe{}{}{}"),
    "invalid json": _v1([56, 61, 63, 65, 67, 69], b"shell{]{}{}{}"),
    "missing header fields": _v1([56, 61, 63, 65, 67, 69], b"shell{}{}{}{}"),
    "unknown channel": _v1(
        [56, 61, 91, 93, 95, 97], b"iopub" + b'{"msg_id":"a","msg_type":"b"}' + b"{}{}{}"
    ),
    "text on v1": "{}",
    "nested 50,000 deep": _v1(
        [56, 61, 91, 93, 95, 100_101],
        b"shell" + b'{"msg_id":"a","msg_type":"b"}' + b"{}{}" + b"[" * 50_000 + b"]" * 50_000,
    ),
}
_HEADER = {"msg_id": "culprit-1", "msg_type": "kernel_info_request"}
BAD_LEGACY_FRAMES = {
    "parent msg_id an object": json.dumps(
        {"header": _HEADER, "parent_header": {"msg_id": {"a": 1}}, "channel": "shell"}
    ),
    "header session a list": json.dumps({"header": {**_HEADER, "session": ["s"]}}),
    "NaN in content": '{"header": {"msg_id": "a", "msg_type": "b"}, "content": {"x": NaN}}',
    "nested 50,000 deep": '{"header": {"msg_id": "a", "msg_type": "b"}, "content": '
    + '{"a":' * 50_000
    + "1"
    + "}" * 50_001,
    "not JSON": "{",
}


@pytest.mark.parametrize(
    ("protocol", "frame"),
    [*((V1_SUBPROTOCOL, frame) for frame in BAD_FRAMES.values()),
     *((None, frame) for frame in BAD_LEGACY_FRAMES.values())],
    ids=[*(f"v1: {name}" for name in BAD_FRAMES), *(f"legacy: {n}" for n in BAD_LEGACY_FRAMES)],
)  # fmt: skip
async def test_malformed_frames_close_only_that_client(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str,
    protocol: str | None, frame: bytes | str, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    bystander = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    culprit = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, protocol=protocol)
    try:
        if isinstance(frame, str):
            await culprit.ws.send_str(frame)
        else:
            await culprit.ws.send_bytes(frame)
        closing = await culprit.closing()
        assert closing.data == 1007
        assert closing.extra  # a reason a person can read
        msg_id, _reply, iopub = await bystander.execute("print('still fine')")
        assert stream_text(iopub) == "still fine\n"
    finally:
        await bystander.close()
        await culprit.close()
    assert zmq_proxy.writer.flush(10)
    health = zmq_proxy.writer.health()
    assert (health.ok, health.set_aside, health.pending) == (True, 0, 0)
    logged = zmq_proxy.db().execute("SELECT count(*) FROM messages WHERE parent_msg_id = ?",
                                    (msg_id,)).fetchone()[0]  # fmt: skip
    assert logged >= 5  # its reply and iopub: the log goes on
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no tracebacks


async def test_replies_keep_coming_under_a_burst_of_requests_from_several_clients(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """Sending on the kernel link's sockets while replies arrive could take the readable edge
    of the socket from under its pending receive: replies then waited unread for good, for
    every client of the kernel (found by fuzzing; jupyter_client's Session.send sends on a
    blocking shadow of the asyncio socket)."""
    clients = [await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
               for _ in range(4)]  # fmt: skip

    async def burst(client: KernelChannels) -> None:
        waiting = {await client.send("shell", "kernel_info_request", {}) for _ in range(300)}
        while waiting:
            message = await client.recv(timeout=10)
            if message.channel == "shell":
                waiting.discard(message.parent_msg_id)

    try:
        await asyncio.gather(*map(burst, clients))
    finally:
        for client in clients:
            await client.close()


async def test_oversized_frame_is_refused(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    from .conftest import make_proxy

    small = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", max_frame_size=4096,
    )  # fmt: skip
    client = await open_channels(small.url, kernel_id, jupyter_server.token)
    try:
        await client.send("shell", "execute_request", {"code": "x" * 10_000})
        closing = await client.closing()
        assert closing.data == 1009
    finally:
        await client.close()


async def test_lossless_over_jupyter_servers_rate_limit(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """Stock jupyter-server drops iopub over 1,000 msgs/s; the zmq link carries every line."""
    lines = 20_000
    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        msg_id, reply, iopub = await client.execute(
            f"import sys\nfor i in range({lines}):\n    print(i, flush=True)", timeout=180
        )
    finally:
        await client.close()
    assert reply.content()["status"] == "ok"
    assert stream_text(iopub).split() == [str(i) for i in range(lines)]
    assert "rate exceeded" not in stream_text(iopub)
    logged = (
        zmq_proxy.db()
        .execute(
            "SELECT group_concat(json_extract(content, '$.text'), '') FROM "
            "(SELECT content FROM messages"
            " WHERE parent_msg_id = ? AND msg_type = 'stream' ORDER BY seq)",
            (msg_id,),
        )
        .fetchone()[0]
    )
    assert logged.split() == [str(i) for i in range(lines)]


async def _connections(server: JupyterServer, kernel_id: str) -> int | None:
    """jupyter-server's count of a kernel's connections (None once the kernel is gone)."""
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.get(server.url + f"api/kernels/{kernel_id}") as resp,
    ):
        return (await resp.json())["connections"] if resp.status == 200 else None


async def _until_connections(
    server: JupyterServer, kernel_id: str, count: int | None, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while (now := await _connections(server, kernel_id)) != count:
        assert time.monotonic() < deadline, f"{now} connections, not {count}"
        await asyncio.sleep(0.1)


async def test_jupyter_server_counts_a_kernel_in_use_through_the_proxy_as_connected(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    """The zmq link's presence is a channels connection of jupyter-server's own, held while a
    client is attached or an execution unfinished, as a tab's would be: nobody attached and
    nothing running, the kernel counts no connection, as stock jupyter-server counts it."""
    from .conftest import finished_in_log, make_proxy

    zmq_proxy = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", kernel_poll_interval=3600,
    )  # fmt: skip
    await zmq_proxy.proxy.refresh_kernels()
    kernels = zmq_proxy.proxy.relay.kernels
    for _ in range(150):  # followed: linked, and past the gap fill after its start
        if kernel_id in kernels and kernels[kernel_id].link.joined.is_set():
            break
        await asyncio.sleep(0.1)
    assert kernels[kernel_id].link.joined.is_set()
    await _until_connections(jupyter_server, kernel_id, 0)  # followed, logged, not in use

    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        await _until_connections(jupyter_server, kernel_id, 1)
        msg_id = await client.send(
            "shell", "execute_request",
            {"code": "import time\nfor i in range(3):\n    print(i, flush=True)\n"
                     "    time.sleep(0.5)",
             "silent": False, "store_history": False, "user_expressions": {},
             "allow_stdin": False},
        )  # fmt: skip
        while not stream_text([m for m in client.received if m.parent_msg_id == msg_id]):
            await client.recv()
    finally:
        await client.close()
    assert await _connections(jupyter_server, kernel_id) == 1  # the cell runs on, unwatched
    await finished_in_log(tmp_path / "log.sqlite")
    await _until_connections(jupyter_server, kernel_id, 0)

    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        await _until_connections(jupyter_server, kernel_id, 1)
        await zmq_proxy.server.close()
        await _until_connections(jupyter_server, kernel_id, 0)
    finally:
        await client.close()


async def test_jupyter_servers_culler_culls_a_kernel_nobody_uses_through_the_proxy(
    aiohttp_server, tmp_path
) -> None:
    """With `cull_idle_timeout` set, an idle kernel with no tab open is shut down, and one with
    a tab open (`cull_connected` unset) is not: the same through the proxy."""
    from .conftest import make_proxy, start_jupyter_server, start_kernel, stop_jupyter_server

    server = start_jupyter_server(
        tmp_path, "--MappingKernelManager.cull_idle_timeout=2",
        "--MappingKernelManager.cull_interval=1",
    )  # fmt: skip
    try:
        watched, unwatched = await start_kernel(server), await start_kernel(server)
        running = await make_proxy(
            aiohttp_server, server.url, server.token, server.runtime_dir,
            tmp_path / "log.sqlite", link="zmq", kernel_poll_interval=0.5,
        )  # fmt: skip
        client = await open_channels(running.url, watched, server.token)
        try:
            await client.execute("1")
            await _until_connections(server, unwatched, None, timeout=30)  # culled
            assert await _connections(server, watched) == 1
            _, reply, _ = await client.execute("2")
            assert reply.content()["status"] == "ok"
        finally:
            await client.close()
    finally:
        stop_jupyter_server(server)


async def test_disallowed_message_types_are_dropped_like_jupyter_server_does(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path
) -> None:
    from .conftest import make_proxy

    strict = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq",
        allowed_message_types=frozenset({"kernel_info_request"}),
    )  # fmt: skip
    client = await open_channels(strict.url, kernel_id, jupyter_server.token)
    try:
        await client.send("shell", "execute_request", {"code": "open('/tmp/x', 'w')"})
        info_id = await client.send("shell", "kernel_info_request", {})
        while True:
            message = await client.recv()
            if message.channel == "shell":
                break
        assert message.parent_msg_id == info_id  # no execute_reply came first: it never ran
    finally:
        await client.close()


@pytest.mark.parametrize(
    "replay",
    ["since:99999999999999999999999999", "since:-1", "since:\u00b2", "last:0",
     "last:100000000", "parent:", "bogus"],
)  # fmt: skip
async def test_replay_is_validated_after_admission_with_bounds(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str, replay: str
) -> None:
    anonymous = f"{zmq_proxy.url}api/kernels/{kernel_id}/channels"
    async with aiohttp.ClientSession() as http:
        for token, status in ((None, 403), (jupyter_server.token, 400)):
            params = {"replay": replay, **({"token": token} if token else {})}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(anonymous, params=params)
            assert refused.value.status == status, refused.value.message


async def test_an_overlong_session_id_is_refused(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token, session_id="s" * 256)
    assert refused.value.status == 400


async def test_kernel_ids_are_plain_path_segments(
    zmq_proxy: RunningProxy, jupyter_server: JupyterServer, kernel_id: str
) -> None:
    """aiohttp decodes %2F in a path segment: "x/../../contents/f" once reached the contents
    API with the proxy's own token (an anonymous caller learned which files exist) and linked
    a phantom kernel; "A/../B" logged kernel B's messages under that id."""
    (jupyter_server.root_dir / "upstream.log").write_text("secret file")
    traversal = "x%2F..%2F..%2Fcontents%2Fupstream.log"
    async with aiohttp.ClientSession() as http:
        for path, token, status in (
            (traversal, None, 404), ("no-such%2F..%2Ffile", None, 404),
            (f"A%2F..%2F{kernel_id}", jupyter_server.token, 404),
            ("00000000-0000-0000-0000-000000000000", None, 403),  # a well-formed id: 403
        ):  # fmt: skip
            url = URL(f"{zmq_proxy.url}api/kernels/{path}/channels", encoded=True)
            if token:
                url = url.update_query(token=token)
            started = time.monotonic()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert (refused.value.status, path) == (status, path)
            assert time.monotonic() - started < 2
    assert all(is_kernel_id(k) for k in zmq_proxy.proxy.relay.kernels)  # no phantom kernel
    client = await open_channels(zmq_proxy.url, kernel_id, jupyter_server.token)
    try:
        await client.execute("pass")
    finally:
        await client.close()
    kernels = {row[0] for row in zmq_proxy.db().execute("SELECT kernel_id FROM messages")}
    assert kernel_id in kernels and all(is_kernel_id(k) for k in kernels)
