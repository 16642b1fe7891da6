"""The audit trail over logs that real executions produced: queries, transcripts, export,
stats, retention, privacy, the HTTP API and the command line."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import nbformat
import pytest

from proxy import audit
from proxy.database import connect, open_database
from proxy.fold import OUTPUT_MESSAGES
from proxy.retention import Policy, Pruner
from proxy.taps.log import Redactor

from .conftest import (
    JupyterServer,
    KernelChannels,
    RunningProxy,
    make_proxy,
    open_channels,
    start_jupyter_server,
    start_kernel,
    stop_jupyter_server,
)

NOTEBOOK = "audited.ipynb"
CELLS = [  # (cell id, code): run in this order, then cell-s (a secret) and cell-i (input())
    ("cell-a", "print('hello')\n1 + 1"),
    ("cell-b", "from IPython.display import clear_output\n"
               "for i in range(3):\n    clear_output(wait=True)\n    print(f'step {i}')"),
    ("cell-c", "1 / 0"),
    ("cell-d", "handle = display('v1', display_id=True)"),
    ("cell-e", "handle.update('v2')\nprint('updated')"),
    ("cell-a", "print('again')"),
]  # fmt: skip


@dataclass
class Audited:
    proxy: RunningProxy
    kernel_id: str
    msg_ids: list[str]
    user: str

    def conn(self) -> sqlite3.Connection:
        self.proxy.writer.flush()
        return connect(self.proxy.db_path)


async def _open_notebook(proxy_url: str, server: JupyterServer, kernel_id: str) -> None:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as http,
        http.post(proxy_url + "api/sessions", json={
            "path": NOTEBOOK, "type": "notebook", "name": NOTEBOOK, "kernel": {"id": kernel_id},
        }) as resp,
    ):  # fmt: skip
        assert resp.status == 201, await resp.text()


@pytest.fixture
async def audited(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path: Path
) -> Audited:
    """A notebook's worth of executions, logged by the proxy (with a redaction pattern)."""
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", writer_options={"redactor": Redactor([r"hunter\d"])},
        link="zmq",
    )  # fmt: skip
    await _open_notebook(running.url, jupyter_server, kernel_id)
    await running.proxy.refresh_kernels()
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    msg_ids = []
    try:
        await client.kernel_info()
        for cell_id, code in CELLS:
            msg_id, _, _ = await client.execute(code, metadata={"cellId": cell_id})
            msg_ids.append(msg_id)
        await client.execute("secret = 'hunter2'; print(secret)", metadata={"cellId": "cell-s"})
        await _answer_input(client)
    finally:
        await client.close()
    running.writer.flush()
    # a token has no user name of its own: jupyter-server names each connection anew
    (user,) = connect(running.db_path).execute("SELECT DISTINCT username FROM clients").fetchone()
    yield Audited(running, kernel_id, msg_ids, user)


async def _answer_input(client: KernelChannels) -> None:
    """A cell asking for input, answered as a frontend does."""
    msg_id = await client.send(
        "shell", "execute_request",
        {"code": "name = input('name? ')\nprint('hi', name)", "silent": False,
         "store_history": True, "user_expressions": {}, "allow_stdin": True},
        {"cellId": "cell-i"},
    )  # fmt: skip
    while True:
        prompt = await client.recv()
        if prompt.msg_type == "input_request":
            break
    await client.send("stdin", "input_reply", {"value": "Ada"}, parent=prompt.header)
    reply, _ = await client.collect(msg_id)
    assert reply.content()["status"] == "ok"


ECHOED = [
    {"output_type": "stream", "name": "stdin", "text": "name?  Ada\n"},
    {"output_type": "stream", "name": "stdout", "text": "hi Ada\n"},
]


async def test_transcript_says_who_ran_what_where_and_what_came_out(audited: Audited) -> None:
    found = audit.executions(audited.conn(), audit.Filter(kernel=audited.kernel_id))
    assert [e.msg_id for e in found[: len(CELLS)]] == audited.msg_ids
    first, progress, failing, shown, update, again = found[: len(CELLS)]
    assert first.code == CELLS[0][1] and first.cell_id == "cell-a"
    assert first.user == audited.user and first.notebook_path == NOTEBOOK
    assert first.status == "ok" and first.duration_s is not None and first.duration_s >= 0
    assert first.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "hello\n"},
        {"output_type": "execute_result", "data": {"text/plain": "2"}, "metadata": {},
         "execution_count": first.execution_count},
    ]  # fmt: skip
    assert progress.outputs == [{"output_type": "stream", "name": "stdout", "text": "step 2\n"}]
    assert failing.status == "error" and failing.outputs[0]["ename"] == "ZeroDivisionError"
    assert shown.outputs[0]["data"]["text/plain"] == "'v2'"  # updated by a later execution
    assert update.outputs == [{"output_type": "stream", "name": "stdout", "text": "updated\n"}]
    counts = [e.execution_count for e in found]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert again.finished_at > again.requested_at and again.started_at > again.requested_at

    answered = next(e for e in found if e.cell_id == "cell-i")
    assert answered.outputs == ECHOED  # the answer to input() as the frontend echoed it

    text = "\n".join(audit.transcript_text(found))
    assert "name?  Ada" in text
    assert "ZeroDivisionError" in text and "> 1 / 0" in text and audited.user in text
    markdown = "\n".join(audit.transcript_markdown(found))
    assert "```python\n1 / 0\n```" in markdown and f"### In [{failing.execution_count}]" in markdown


async def test_export_rebuilds_the_notebook_with_each_cells_last_execution(
    audited: Audited,
) -> None:
    notebook = audit.export_notebook(audited.conn(), audit.Filter(notebook=NOTEBOOK))
    nbformat.validate(notebook)
    ids = [cell["id"] for cell in notebook.cells]
    assert ids == ["cell-a", "cell-b", "cell-c", "cell-d", "cell-e", "cell-s", "cell-i"]
    assert notebook.cells[-1].outputs == [nbformat.from_dict(output) for output in ECHOED]
    cell_a = notebook.cells[0]
    assert cell_a.source == "print('again')"
    assert cell_a.outputs == [nbformat.from_dict(
        {"output_type": "stream", "name": "stdout", "text": "again\n"}
    )]  # fmt: skip
    assert notebook.cells[3].outputs[0]["data"]["text/plain"] == "'v2'"
    assert notebook.metadata["language_info"]["name"] == "python"
    by_session = audit.export_notebook(audited.conn(), audit.Filter(kernel=audited.kernel_id))
    assert [cell["id"] for cell in by_session.cells] == ids


async def test_message_filters(audited: Audited) -> None:
    conn = audited.conn()
    caused = audit.messages(conn, audit.Filter(parent=audited.msg_ids[2]))
    assert {m["msg_type"] for m in caused} >= {"execute_reply", "error", "status", "execute_input"}
    shell = audit.messages(
        conn,
        audit.Filter(kernel=audited.kernel_id, channels=["shell"], msg_types=["execute_reply"]),
    )
    assert len(shell) == len(CELLS) + 2 and all(m["user"] == audited.user for m in shell)
    everything = audit.messages(conn, audit.Filter(kernel=audited.kernel_id))
    middle = datetime.fromisoformat(everything[len(everything) // 2]["received_at"])
    before = audit.messages(conn, audit.Filter(until=middle))
    after = audit.messages(conn, audit.Filter(since=middle))
    assert [m["seq"] for m in before + after] == [m["seq"] for m in everything]
    assert all(m["received_at"] < everything[len(everything) // 2]["received_at"] for m in before)
    page = audit.messages(conn, audit.Filter(after=everything[9]["seq"], limit=5))
    assert [m["seq"] for m in page] == [m["seq"] for m in everything[10:15]]
    assert audit.messages(conn, audit.Filter(user="nobody")) == []


async def test_redaction_applies_before_writing(audited: Audited) -> None:
    conn = audited.conn()
    dump = "\n".join(conn.iterdump())
    assert "hunter2" not in dump
    secret = audit.executions(conn, audit.Filter(kernel=audited.kernel_id))[-2]
    assert secret.code == "secret = '[redacted]'; print(secret)"
    assert secret.outputs[0]["text"] == "[redacted]\n"


async def test_stats(audited: Audited) -> None:
    figures = audit.stats(audited.conn(), audited.proxy.db_path)
    assert figures["executions"] == len(CELLS) + 2 and figures["kernels"] == 1
    assert figures["users"] == 1 and figures["notebooks"] == 1
    assert figures["messages"] > 5 * len(CELLS) and figures["oldest"] <= figures["newest"]
    assert figures["database_bytes"] > 0


async def test_http_api_authorized_by_jupyter_server(
    audited: Audited, jupyter_server: JupyterServer
) -> None:
    base = audited.proxy.url + "replay-proxy/api/"
    async with aiohttp.ClientSession() as http:
        for path in ("audit/messages", "audit/executions", "audit/stats", "openapi.json"):
            async with http.get(base + path, params={"token": "wrong"}) as resp:
                assert resp.status == 403, path
            async with http.get(base + path) as resp:
                assert resp.status == 403, path
        http.headers.update(jupyter_server.headers())
        async with http.get(base + "openapi.json") as resp:
            document = await resp.json()
        assert set(document["paths"]) == {
            "/replay-proxy/api/audit/" + name for name in ("messages", "executions", "export",
                                                          "stats")
        }  # fmt: skip
        seqs, after = [], 0
        while after is not None:
            params = {"kernel": audited.kernel_id, "limit": "7", "after": str(after)}
            async with http.get(base + "audit/messages", params=params) as resp:
                page = await resp.json()
            seqs += [m["seq"] for m in page["items"]]
            after = page["next_after"]
        logged = audit.messages(audited.conn(), audit.Filter(kernel=audited.kernel_id))
        assert seqs == [m["seq"] for m in logged]
        async with http.get(base + "audit/executions", params={"user": audited.user}) as resp:
            executions = (await resp.json())["items"]
        assert [e["msg_id"] for e in executions[: len(CELLS)]] == audited.msg_ids
        assert executions[2]["outputs"][0]["ename"] == "ZeroDivisionError"
        async with http.get(base + "audit/export", params={"notebook": NOTEBOOK}) as resp:
            assert resp.status == 200
            exported = nbformat.reads(await resp.text(), as_version=4)
        assert len(exported.cells) == 7
        async with http.get(base + "audit/messages", params={"since": "yesterday"}) as resp:
            assert resp.status == 400 and "not a time" in (await resp.json())["message"]
        async with http.get(base + "audit/export") as resp:
            assert resp.status == 400


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120
    )


async def test_command_line(audited: Audited, tmp_path: Path) -> None:
    audited.proxy.writer.flush()
    db = str(audited.proxy.db_path)
    transcript = _cli("transcript", f"--db={db}", f"--notebook={NOTEBOOK}", "--format=markdown")
    assert transcript.returncode == 0, transcript.stderr
    assert "```python\n1 / 0\n```" in transcript.stdout
    as_json = _cli("transcript", f"--db={db}", "--format=json", "--limit=2")
    assert [json.loads(line)["msg_id"] for line in as_json.stdout.splitlines()] == (
        audited.msg_ids[:2]
    )
    table = _cli("log", f"--db={db}", "--msg-type=execute_request", f"--kernel={audited.kernel_id}")
    assert table.returncode == 0 and table.stdout.count("execute_request") == len(CELLS) + 2
    out = tmp_path / "rebuilt.ipynb"
    exported = _cli("export", f"--db={db}", f"--kernel={audited.kernel_id}", f"--output={out}")
    assert exported.returncode == 0, exported.stderr
    nbformat.validate(nbformat.read(out, as_version=4))
    stats = json.loads(_cli("stats", f"--db={db}", "--format=json").stdout)
    assert stats["executions"] == len(CELLS) + 2
    bad = _cli("log", f"--db={db}", "--since=not-a-time")
    assert bad.returncode == 2 and "not a time" in bad.stderr
    missing = _cli("stats", f"--db={tmp_path / 'absent.sqlite'}")
    assert missing.returncode == 2 and "no log database" in missing.stderr


async def test_log_follow_prints_new_messages(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path: Path
) -> None:
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq",
    )  # fmt: skip
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "log", f"--db={running.db_path}", "--follow",
        "--msg-type=stream", "--format=json", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        await client.execute("print('followed')")
        assert follower.stdout is not None
        line = await asyncio.wait_for(follower.stdout.readline(), 30)
        assert json.loads(line)["content"]["text"] == "followed\n"
    finally:
        follower.terminate()
        await follower.wait()
        await client.close()


def _synthetic_log(path: Path, count: int, start: datetime) -> None:
    """Rows shaped like logged ones, one a second, for retention at volume."""
    conn = open_database(path)
    conn.execute("BEGIN")
    conn.executemany(
        """
        INSERT INTO messages (seq, kernel_id, channel, direction, msg_id, msg_type, received_at,
            header, parent_header, metadata, content, buffer_count)
        VALUES (?, 'k', 'iopub', 'from_kernel', ?, 'stream', ?, '{}', '{}', '{}', ?, 1)
        """,
        (
            (seq, f"m{seq}", audit.iso(start + timedelta(seconds=seq)), '{"text": "..."}')
            for seq in range(1, count + 1)
        ),
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO message_buffers (seq, idx, data) VALUES (?, 0, ?)",
        ((seq, b"b" * 100) for seq in range(1, count + 1)),
    )
    conn.execute("COMMIT")
    conn.close()


def test_prune_by_age_in_short_transactions(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    start = datetime.now(timezone.utc) - timedelta(seconds=50_000)
    _synthetic_log(path, 50_000, start)
    conn = connect(path)
    seen = []
    result = Pruner(conn, progress=lambda done, total: seen.append((done, total))).prune(
        older_than=timedelta(seconds=20_000)
    )
    remaining = conn.execute("SELECT MIN(seq), COUNT(*) FROM messages").fetchone()
    assert 29_900 < result.deleted_messages < 30_100
    assert remaining[0] == result.deleted_messages + 1 and remaining[1] == 50_000 - remaining[0] + 1
    assert conn.execute("SELECT MIN(seq) FROM message_buffers").fetchone()[0] == remaining[0]
    assert seen[-1][0] == seen[-1][1] == result.deleted_messages and len(seen) > 1
    assert result.reclaimed_bytes > 0 and conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_prune_to_a_size(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    _synthetic_log(path, 30_000, datetime.now(timezone.utc))
    before = path.stat().st_size
    conn = connect(path)
    result = Pruner(conn).prune(max_size=before // 3)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert result.deleted_messages > 15_000
    assert path.stat().st_size <= before // 3 + 64 * 1024
    newest = conn.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
    assert newest == 30_000  # the newest are kept


def test_prune_command_line_and_bad_sizes(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    _synthetic_log(path, 5_000, datetime.now(timezone.utc) - timedelta(days=2))
    done = _cli("prune", f"--db={path}", "--older-than=1d")
    assert done.returncode == 0, done.stderr
    assert "pruned 5,000 messages" in done.stderr
    assert connect(path).execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    for bad in (["--older-than=soon"], ["--max-size=lots"], []):
        refused = _cli("prune", f"--db={path}", *bad)
        assert refused.returncode == 2 and refused.stderr


async def test_big_buffers_are_left_out_when_configured(
    aiohttp_server, jupyter_server: JupyterServer, kernel_id: str, tmp_path: Path
) -> None:
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", writer_options={"max_buffer_size": 1000}, link="zmq",
    )  # fmt: skip
    client = await open_channels(running.url, kernel_id, jupyter_server.token)
    try:
        await client.execute(
            "from ipykernel.comm import Comm\n"
            "Comm(target_name='t', data={}, buffers=[b'small', b'x' * 5000])"
        )
    finally:
        await client.close()
    conn = running.db()
    rows = conn.execute(
        """
        SELECT b.idx, length(b.data), b.omitted_size FROM message_buffers AS b
        JOIN messages AS m USING (seq) WHERE m.msg_type = 'comm_open' ORDER BY b.idx
        """
    ).fetchall()
    assert [tuple(row) for row in rows] == [(0, 5, None), (1, 0, 5000)]


async def test_jupyter_servers_authorizer_decides_who_reads_the_audit_trail_and_status(
    aiohttp_server, tmp_path: Path
) -> None:
    """A deployment whose authorizer keeps guests away from kernels keeps them away from the
    log of those kernels too, although the proxy itself could read it."""
    server = start_jupyter_server(
        tmp_path / "server",
        "--ServerApp.authorizer_class=tests.authorizers.GuestsMayNotTouchKernels",
    )
    try:
        kernel = await start_kernel(server)
        running = await make_proxy(
            aiohttp_server, server.url, server.token, server.runtime_dir,
            tmp_path / "log.sqlite", link="zmq",
        )  # fmt: skip
        client = await open_channels(running.url, kernel, server.token)
        try:
            await client.execute("print('for members only')")
        finally:
            await client.close()
        running.writer.flush()
        url = running.url + "replay-proxy/api/audit/executions"
        async with aiohttp.ClientSession(headers=server.headers()) as http:
            async with http.get(url) as resp:
                assert resp.status == 200
                assert (await resp.json())["items"][0]["code"] == "print('for members only')"
            async with http.get(url, headers={"X-Test-Role": "guest"}) as resp:
                assert resp.status == 403
                assert "for members only" not in await resp.text()
            status = running.url + "replay-proxy/api/status"
            async with http.get(status) as resp:
                assert resp.status == 200
                assert [k["id"] for k in (await resp.json())["kernels"]] == [kernel]
            async with http.get(status, headers={"X-Test-Role": "guest"}) as resp:
                assert resp.status == 403  # kernels and users are not the guest's to see
                assert kernel not in await resp.text()
            guest_channels = running.url + f"api/kernels/{kernel}/channels"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(guest_channels, headers={"X-Test-Role": "guest"})
            assert refused.value.status == 403
    finally:
        stop_jupyter_server(server)


async def test_the_proxy_applies_its_retention_policy(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    _synthetic_log(path, 2_000, datetime.now(timezone.utc) - timedelta(seconds=4_000))
    policy = Policy(older_than=timedelta(seconds=3_000), max_size=None, interval=3600)
    applying = asyncio.ensure_future(policy.apply_periodically(lambda: connect(path)))
    try:
        for _ in range(100):
            left = connect(path).execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            if left < 2_000:
                break
            await asyncio.sleep(0.05)
    finally:
        applying.cancel()
    assert 900 < left < 1_100


def test_the_outputs_view_lists_the_output_types_the_fold_folds(tmp_path: Path) -> None:
    """A migration is SQL fixed for good, so the `outputs` view names its message types itself:
    it must name exactly those the fold (and the audit's transcript) treat as outputs."""
    database = open_database(tmp_path / "log.sqlite")
    try:
        (view,) = database.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'outputs'"
        ).fetchone()
    finally:
        database.close()
    listed = set(re.findall(r"'(\w+)'", view.split(" IN ", 1)[1]))
    assert listed == OUTPUT_MESSAGES
