"""The log writer and the schema migrations, on real SQLite files, without sockets."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from proxy.codecs import KERNEL_CHANNELS, message_from_parts
from proxy.database import (
    SchemaError,
    available_migrations,
    connect,
    migrate,
    migrations_dir,
    open_database,
)
from proxy.relay import FROM_KERNEL, Client
from proxy.taps.log import LogWriter

REPO = Path(__file__).resolve().parent.parent


def stream_message(i: int, buffers: tuple[bytes, ...] = ()):  # type: ignore[no-untyped-def]
    header = {"msg_id": f"m{i}", "msg_type": "stream", "session": "s", "username": "u"}
    parts = [
        json.dumps(header).encode(),
        json.dumps({"msg_id": "parent"}).encode(),
        b"{}",
        json.dumps({"name": "stdout", "text": f"line {i}\n"}).encode(),
        *buffers,
    ]
    return message_from_parts("iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False)


def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_rows_are_durable_within_the_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    writer = LogWriter(lambda: connect(path), flush_interval=0.05)
    client = Client("c1", "k1", "session", "v1.kernel.websocket.jupyter.org", username="alice")
    writer.client_joined(client)
    started = time.monotonic()
    for i in range(100):
        writer.message_relayed(writer.next_seq(), "k1", FROM_KERNEL, stream_message(i), None, 0.0)
    reader = sqlite3.connect(path)
    wait_until(lambda: reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 100)
    assert time.monotonic() - started < 1.0
    writer.close()
    rows = reader.execute("SELECT seq, msg_id, parent_msg_id, content FROM messages ORDER BY seq")
    assert [(r[0], r[1], r[2]) for r in rows] == [(i + 1, f"m{i}", "parent") for i in range(100)]


def test_buffers_and_sequence_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    writer = LogWriter(lambda: connect(path))
    writer.message_relayed(
        writer.next_seq(), "k", FROM_KERNEL, stream_message(0, (b"\0\1", b"x")), None, 0
    )
    writer.close()
    again = LogWriter(lambda: connect(path))
    assert again.next_seq() == 2
    again.close()
    rows = sqlite3.connect(path).execute("SELECT seq, idx, data FROM message_buffers").fetchall()
    assert rows == [(1, 0, b"\0\1"), (1, 1, b"x")]


def test_disk_full_is_reported_and_caught_up(tmp_path: Path) -> None:
    """SQLITE_FULL, made real by capping the file's page count on the writer's connection."""
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    connections: list[sqlite3.Connection] = []

    def capped() -> sqlite3.Connection:
        conn = connect(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        connections.append(conn)
        return conn

    writer = LogWriter(capped, flush_interval=0.01, retry_interval=0.05)
    for i in range(2000):
        writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(i), None, 0)
    wait_until(lambda: writer.health().error is not None)
    health = writer.health()
    assert "full" in health.error and health.pending == 2000 and not health.ok
    connections[0].execute("PRAGMA max_page_count = 1073741823")
    assert writer.flush(10)
    assert writer.health().ok and writer.health().written == 2000
    writer.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM messages").fetchone()[0] == 2000


def test_locked_database_is_retried_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")

    def impatient() -> sqlite3.Connection:
        conn = connect(path)
        conn.execute("PRAGMA busy_timeout = 50")
        return conn

    writer = LogWriter(impatient, flush_interval=0.01, retry_interval=0.05)
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(1), None, 0)
    wait_until(lambda: writer.health().error is not None)
    assert "locked" in writer.health().error
    blocker.execute("ROLLBACK")
    assert writer.flush(10)
    writer.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SchemaError, match="cannot use"):
        open_database(path)
    writer = LogWriter(lambda: open_database(path), retry_interval=0.05)
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(1), None, 0)
    assert writer.health().error and writer.health().pending == 1
    writer._stop.set()  # nothing can be written; do not wait for a flush that cannot happen


def test_database_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.sqlite"
    open_database(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_migrations_upgrade_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = connect(path)
    migrate(conn, available_migrations()[:1])
    conn.execute(
        "INSERT INTO messages (seq, kernel_id, channel, direction, received_at, header, "
        "parent_header, metadata, content) VALUES (1, 'k', 'iopub', 'from_kernel', 't', "
        "'{}', '{}', '{}', '{}')"
    )
    conn.close()
    conn = open_database(path)
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in available_migrations()]
    assert conn.execute("SELECT kernel_id FROM messages").fetchall() == [("k",)]
    assert migrate(conn) == []  # idempotent


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    conn = open_database(path)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 'later')")
    conn.close()
    with pytest.raises(SchemaError, match="newer than this proxy knows"):
        open_database(path)


def test_migrate_command(tmp_path: Path) -> None:
    path = tmp_path / "cli.sqlite"
    run = [sys.executable, "-m", "proxy", "migrate", f"--db={path}"]
    first = subprocess.run(run, capture_output=True, text=True, check=True)
    assert "applied migrations 1" in first.stdout
    again = subprocess.run(run, capture_output=True, text=True, check=True)
    assert "up to date" in again.stdout


def test_migrations_ship_inside_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for migration in migrations_dir().glob("*.sql"):
        assert f"proxy/migrations/{migration.name}" in names


def message_with_header(i: int, **fields: object):  # type: ignore[no-untyped-def]
    header = {"msg_id": f"m{i}", "msg_type": "stream", **fields}
    parts = [json.dumps(header).encode(), json.dumps({"msg_id": {"a": 1}}).encode(), b"{}", b"{}"]
    return message_from_parts("iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False)


def test_header_fields_of_any_type_are_logged_as_text(tmp_path: Path) -> None:
    """A kernel's header field that is not a string (any code in the kernel can publish one)
    once stopped every later write: "Error binding parameter: type 'dict' is not supported"."""
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    writer = LogWriter(lambda: connect(path))
    odd = {"session": {"a": 1}, "username": ["x"], "date": 7}
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, message_with_header(0, **odd),
                           None, 0.0)  # fmt: skip
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(1), None, 0.0)
    assert writer.flush(5)
    health = writer.health()
    writer.close()
    assert (health.ok, health.written, health.set_aside) == (True, 2, 0)
    rows = sqlite3.connect(path).execute(
        "SELECT msg_id, parent_msg_id, session, username, msg_date FROM messages ORDER BY seq"
    )
    assert rows.fetchall() == [
        ("m0", '{"a": 1}', '{"a": 1}', '["x"]', "7"),
        ("m1", "parent", "s", "u", None),
    ]


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_is_written(tmp_path: Path) -> None:
    """One row that breaks a constraint (here a sequence number the log already holds) is
    kept in set_aside, counted; the rows around it, before and after, are written."""
    path = tmp_path / "log.sqlite"
    open_database(path).close()
    writer = LogWriter(lambda: connect(path))
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(0), None, 0.0)
    assert writer.flush(5)
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(1), None, 0.0)
    writer.message_relayed(1, "k", FROM_KERNEL, stream_message(2, (b"buffer",)), None, 0.0)
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(3), None, 0.0)
    assert writer.flush(5)
    writer.message_relayed(writer.next_seq(), "k", FROM_KERNEL, stream_message(4), None, 0.0)
    assert writer.flush(5)
    health, durable = writer.health(), writer.durable_seq
    writer.close()
    assert (health.ok, health.written, health.set_aside, health.pending) == (True, 4, 1, 0)
    assert "IntegrityError" in (health.last_set_aside or "")
    assert durable == 4
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT msg_id FROM messages ORDER BY seq")] == [
        "m0", "m1", "m3", "m4",
    ]  # fmt: skip
    kind, seq, reason, row = conn.execute("SELECT kind, seq, reason, row FROM set_aside").fetchone()
    assert (kind, seq) == ("message", 1) and "UNIQUE" in reason and "line 2" in row
    assert conn.execute("SELECT count(*) FROM message_buffers").fetchone()[0] == 0


def test_redaction_of_json_too_deep_to_walk_falls_back_to_text(tmp_path: Path) -> None:
    from proxy.taps.log import Redactor

    deep = '{"a": ' * 5000 + '"password=hunter2"' + "}" * 5000
    redacted = Redactor([r"password=\w+"])(deep)
    assert "hunter2" not in redacted and redacted.startswith('{"a": {"a": ')
