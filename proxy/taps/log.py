"""The log tap: every relayed message into SQLite; the relay's own loop never waits on disk.

The relay appends rows to an in-memory queue (a deque append: no lock taken, no I/O); a writer
thread commits them as soon as they come, whatever came during the previous commit in one
transaction (group commit). A client is sent a kernel message only once it is committed
(:meth:`LogWriter.until_durable`), so whatever a client got survives ``kill -9``. When the
database fails (disk full, locked, corrupt) the writer keeps the rows, reports the error, and
retries, and clients are not held back meanwhile; committed rows are never touched again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..codecs import Message
from ..relay import Client, Requester, Tap

log = logging.getLogger("jupyter_replay_proxy.log")

_INSERT_MESSAGE = """
INSERT INTO messages (
    seq, kernel_id, channel, direction, msg_id, parent_msg_id, msg_type, session, username,
    client_id, msg_date, received_at, header, parent_header, metadata, content, buffer_count
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_BUFFER = "INSERT INTO message_buffers (seq, idx, data, omitted_size) VALUES (?, ?, ?, ?)"
_NOTEBOOK_SEEN = """
INSERT INTO kernel_notebooks (kernel_id, path, session_type, first_seen_at, last_seen_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (kernel_id, path) DO UPDATE SET last_seen_at = excluded.last_seen_at
"""
REDACTED = "[redacted]"
_INSERT_CLIENT = """
INSERT INTO clients (
    client_id, kernel_id, session_id, username, identity, protocol, remote, connected_at
) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
_CLIENT_LEFT = "UPDATE clients SET disconnected_at = ? WHERE client_id = ?"
_SET_ASIDE = """
INSERT INTO set_aside (set_aside_at, kind, seq, kernel_id, reason, row) VALUES (?, ?, ?, ?, ?, ?)
"""
_KERNEL_EVENT = """
INSERT INTO kernel_events (kernel_id, event, after_seq, happened_at) VALUES (?, ?, ?, ?)
"""
_DELIVERED = """
INSERT INTO deliveries (kernel_id, session_id, seq, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (kernel_id, session_id)
DO UPDATE SET seq = max(seq, excluded.seq), updated_at = excluded.updated_at
"""


class _IsoClock:
    """UTC ISO 8601 times for many timestamps of the same second, formatted once a second.
    Not thread-safe: each writer thread has its own."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, timestamp: float) -> str:
        second = int(timestamp)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        return f"{self._prefix}.{int((timestamp - second) * 1e6):06d}+00:00"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class Redactor:
    """Replaces what the configured patterns match in the strings of a message's content and
    metadata before they are written (the log, and so what is replayed from it, keeps only the
    redacted text). Raises ValueError for a pattern that is not a regular expression."""

    def __init__(self, patterns: Sequence[str]) -> None:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:  # say which one is bad
                raise ValueError(
                    f"redact pattern {pattern!r} is not a regular expression: {error}"
                ) from None
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def __call__(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or ("\\" not in text and not pattern.search(text)):
            return text  # without escapes the JSON text holds its strings as they are
        try:
            value = json.loads(text)
            redacted = self._strings(value)
            return text if redacted == value else json.dumps(redacted, ensure_ascii=False)
        except (ValueError, RecursionError):  # not JSON, or too deep to walk: as text
            return pattern.sub(REDACTED, text)

    def _strings(self, value: Any) -> Any:
        if isinstance(value, str):
            assert self._pattern is not None
            return self._pattern.sub(REDACTED, value)
        if isinstance(value, list):
            return [self._strings(item) for item in value]
        if isinstance(value, dict):
            return {key: self._strings(item) for key, item in value.items()}
        return value


@dataclass
class LogHealth:
    """What the status endpoint shows about the log."""

    ok: bool
    error: str | None
    written: int
    pending: int
    dropped: int
    set_aside: int  # rows the database refused, kept in its set_aside table
    last_set_aside: str | None


class LogWriter(Tap):
    """Batches log rows to SQLite on a thread of its own. Also a relay tap."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        flush_interval: float = 0.05,
        max_pending: int = 2_000_000,
        max_behind: int = 2_000,
        retry_interval: float = 1.0,
        redactor: Redactor | None = None,
        max_buffer_size: int | None = None,
    ) -> None:
        self._connect = connect
        self._redact = redactor or Redactor(())
        self._iso = _IsoClock()  # (the writer thread's)
        self.max_buffer_size = max_buffer_size
        self._conn: sqlite3.Connection | None = None
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.max_behind = max_behind
        self.retry_interval = retry_interval
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()
        self._unwritten: list[tuple[str, Any]] = []  # writer thread's batch, kept on failure
        self._enqueued = 0  # rows ever enqueued; compared with _committed by flush()
        self._committed = 0
        self._committed_changed = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()  # rows are waiting
        self.durable_seq = 0  # every message up to this seq is committed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._durable_changed = asyncio.Event()
        self.error: str | None = None
        self.written = 0
        self.dropped = 0
        self.set_aside = 0
        self.last_set_aside: str | None = None
        self.errors = 0  # failed attempts to write (each retry counts)
        self._next_seq = 1
        self._open()
        self._thread = threading.Thread(target=self._run, name="replay-proxy-log", daemon=True)
        self._thread.start()

    # --- relay side (event loop thread) ----------------------------------------------------

    def next_seq(self) -> int:
        """Allocate the sequence number of the next relayed message."""
        seq = self._next_seq
        self._next_seq = seq + 1
        return seq

    @property
    def last_seq(self) -> int:
        """The sequence number of the last message relayed so far."""
        return self._next_seq - 1

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Requester | None,
        received_at: float,
    ) -> None:
        # Only what the row needs: not the message, whose cached frames would double the
        # memory a backlog takes when the database falls behind a flood.
        header = message.header
        self._enqueue(
            "m",
            (
                seq, kernel_id, direction, message.channel, message.parts, header.get("msg_id"),
                message.parent_header.get("msg_id"), header.get("msg_type"),
                header.get("session"), header.get("username"), header.get("date"),
                client.client_id if client else None, received_at,
            ),
        )  # fmt: skip

    def client_joined(self, client: Client) -> None:
        self._enqueue("c", client)

    def client_left(self, client: Client) -> None:
        self._enqueue("l", (client.client_id, time.time()))

    def notebook_seen(self, kernel_id: str, path: str, session_type: str | None) -> None:
        """jupyter-server has a session of this notebook (console, file) on the kernel."""
        self._enqueue("n", (kernel_id, path, session_type, time.time()))

    def delivery_confirmed(self, client: Client, seq: int) -> None:
        if client.session_id is not None:
            self._enqueue("d", (client.kernel_id, client.session_id, seq, time.time()))

    def kernel_restarted(self, kernel_id: str) -> None:
        """Logged as the relay decided it: a restart asked of jupyter-server's REST API leaves
        no message of its own in the log."""
        self._enqueue("k", (kernel_id, "restarted", self.last_seq, time.time()))

    def kernel_dead(self, kernel_id: str) -> None:
        self._enqueue("k", (kernel_id, "dead", self.last_seq, time.time()))

    def _enqueue(self, kind: str, item: Any) -> None:
        if len(self._pending) + len(self._unwritten) >= self.max_pending:
            self.dropped += 1  # only while the database has been failing for a long time
            return
        self._pending.append((kind, item))
        self._enqueued += 1
        if not self._wake.is_set():
            self._wake.set()

    async def until_durable(self, seq: int) -> None:
        """Wait until the message `seq` is committed. While the database fails nothing waits:
        the relay goes on (the rows are kept and retried)."""
        self._loop = asyncio.get_running_loop()
        while seq > self.durable_seq and self.error is None:
            await self._durable_changed.wait()

    async def until_caught_up(self) -> None:
        """Wait while `max_behind` rows or more wait for the database: kernel links stop
        reading meanwhile, so a flood waits in their spools (on disk), not here in memory.
        While the database fails nothing waits (rows are kept, up to `max_pending`)."""
        self._loop = asyncio.get_running_loop()
        while len(self._pending) + len(self._unwritten) >= self.max_behind and self.error is None:
            await self._durable_changed.wait()

    def _durable_advanced(self) -> None:
        """On the event loop: wake whoever waits for a commit."""
        changed, self._durable_changed = self._durable_changed, asyncio.Event()
        changed.set()

    def _tell_waiters(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(self._durable_advanced)

    def health(self) -> LogHealth:
        return LogHealth(
            ok=self.error is None,
            error=self.error,
            written=self.written,
            pending=len(self._pending) + len(self._unwritten),
            dropped=self.dropped,
            set_aside=self.set_aside,
            last_set_aside=self.last_set_aside,
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything enqueued so far is committed (shutdown and tests)."""
        target = self._enqueued
        deadline = time.monotonic() + timeout
        with self._committed_changed:
            while self._committed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._committed_changed.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- writer thread ---------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._conn = self._connect()
            row = self._conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
            self._next_seq = max(self._next_seq, row[0] + 1)
            self.durable_seq = max(self.durable_seq, row[0])
        except Exception as error:  # corrupt, unreadable, schema newer than us...
            self._conn = None
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.errors += 1
        message = f"{type(error).__name__}: {error}"
        if message != self.error:
            log.error("Cannot write the message log: %s; messages are kept and retried", message)
        self.error = message
        self._tell_waiters()  # they stop waiting for commits that cannot come

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            while self._pending or self._unwritten:
                if self._conn is None:
                    self._open()
                try:
                    written = self._conn is not None and self._write_batch()
                except Exception as error:  # a bug here must not end the log: retried
                    log.exception("The log writer failed")
                    self._fail(error)
                    written = False
                if not written:
                    self._stop.wait(self.retry_interval)
                    break

    def _write_batch(self) -> bool:
        assert self._conn is not None
        pending = self._pending
        self._unwritten.extend(pending.popleft() for _ in range(len(pending)))
        batch = self._unwritten
        rows, unbuildable = self._rows(batch)
        try:
            try:
                refused = self._commit(rows, unbuildable, one_by_one=False)
            except _ROW_ERRORS:  # a row SQLite will not take: the rest goes in without it
                refused = self._commit(rows, unbuildable, one_by_one=True)
        except sqlite3.Error as error:
            self._fail(error)
            if isinstance(error, sqlite3.DatabaseError) and "malformed" in str(error):
                self._conn.close()
                self._conn = None
            return False
        self._unwritten = []
        self._note_set_aside(refused)
        refused_messages = sum(1 for (kind, _, _, _), _ in refused if kind == "message")
        self.written += len(rows["message"]) - refused_messages
        last = next((item[0] for kind, item in reversed(batch) if kind == "m"), None)
        if last is not None:  # written or set aside: nobody waits for it any more
            self.durable_seq = last
            self._tell_waiters()
        if self.error is not None:
            log.info("The message log is writable again; %d rows caught up", len(batch))
            self.error = None
        with self._committed_changed:
            self._committed += len(batch)
            self._committed_changed.notify_all()
        return True

    def _rows(self, batch: list[tuple[str, Any]]) -> tuple[_Rows, list[_Refused]]:
        """The rows of each statement, each with where it came from (for setting it aside);
        and what could not even be made a row."""
        rows: _Rows = {name: [] for name, _ in _STATEMENTS}
        unbuildable: list[_Refused] = []
        redact, limit, iso = self._redact, self.max_buffer_size, self._iso
        for kind, item in batch:
            try:
                if kind == "m":
                    (
                        seq, kernel_id, direction, channel, parts, msg_id, parent_id, msg_type,
                        session, username, date, client_id, received_at,
                    ) = item  # fmt: skip
                    origin = ("message", seq, kernel_id, item)
                    message = (
                        seq, kernel_id, channel, direction, _string(msg_id), _string(parent_id),
                        _string(msg_type), _string(session), _string(username), client_id,
                        _string(date), iso(received_at), _text(parts[0]), _text(parts[1]),
                        redact(_text(parts[2])), redact(_text(parts[3])), len(parts) - 4,
                    )  # fmt: skip
                    buffers = [
                        (seq, i, b"", len(b)) if limit is not None and len(b) > limit
                        else (seq, i, bytes(b), None)
                        for i, b in enumerate(parts[4:])
                    ]  # fmt: skip
                    rows["message"].append((message, origin))
                    rows["buffer"] += [(b, ("buffer", seq, kernel_id, b)) for b in buffers]
                elif kind == "c":
                    client = (
                        item.client_id, item.kernel_id, _string(item.session_id),
                        _string(item.username), item.identity_json, item.protocol,
                        _string(item.remote), iso(item.connected_at),
                    )  # fmt: skip
                    rows["client"].append((client, ("client", None, item.kernel_id, client)))
                elif kind == "l":
                    client_id, at = item
                    rows["client_left"].append(
                        ((iso(at), client_id), ("client_left", None, None, item))
                    )
                elif kind == "n":
                    kernel_id, path, session_type, at = item
                    notebook = (kernel_id, path, _string(session_type), iso(at), iso(at))
                    rows["notebook"].append((notebook, ("notebook", None, kernel_id, item)))
                elif kind == "k":
                    kernel_id, event, after_seq, at = item
                    happened = (kernel_id, event, after_seq, iso(at))
                    rows["kernel_event"].append((happened, ("kernel_event", None, kernel_id, item)))
                else:
                    kernel_id, session_id, seq, at = item
                    delivery = (kernel_id, session_id, seq, iso(at))
                    rows["delivery"].append((delivery, ("delivery", None, kernel_id, item)))
            except Exception as error:  # any value the writer cannot shape into a row
                unbuildable.append(((kind, None, None, item), error))
        return rows, unbuildable

    def _commit(
        self, rows: _Rows, unbuildable: list[_Refused], *, one_by_one: bool
    ) -> list[_Refused]:
        """Write the rows in one transaction; what was refused goes to `set_aside`. With
        `one_by_one`, each row is written on its own and a refused row does not stop the
        rest (nor are a refused message's buffers written)."""
        assert self._conn is not None
        conn = self._conn
        refused = list(unbuildable)
        refused_messages: set[int] = set()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name, statement in _STATEMENTS:
                if not one_by_one:
                    conn.executemany(statement, [row for row, _ in rows[name]])
                    continue
                for row, origin in rows[name]:
                    if name == "buffer" and row[0] in refused_messages:
                        continue
                    try:
                        conn.execute(statement, row)
                    except _ROW_ERRORS as error:
                        refused.append((origin, error))
                        if name == "message":
                            refused_messages.add(row[0])
            for (kind, seq, kernel_id, row), error in refused:
                with contextlib.suppress(*_ROW_ERRORS):  # then it is only counted
                    conn.execute(
                        _SET_ASIDE,
                        (self._iso(time.time()), kind, seq, _string(kernel_id),
                         f"{type(error).__name__}: {error}", _as_json(row)),
                    )  # fmt: skip
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite already rolled back after e.g. SQLITE_FULL
                conn.execute("ROLLBACK")
            raise
        return refused

    def _note_set_aside(self, refused: list[_Refused]) -> None:
        for (kind, seq, kernel_id, _), error in refused:
            self.set_aside += 1
            self.last_set_aside = f"{kind} {seq or ''}: {type(error).__name__}: {error}"
            log.error(
                "Log row set aside (%s %s of kernel %s): %s: %s",
                kind, seq or "", kernel_id, type(error).__name__, error,
            )  # fmt: skip


#: The statements of a batch in the order they run: clients before the messages naming them,
#: messages before their buffers.
_STATEMENTS = (
    ("client", _INSERT_CLIENT), ("message", _INSERT_MESSAGE), ("buffer", _INSERT_BUFFER),
    ("client_left", _CLIENT_LEFT), ("delivery", _DELIVERED), ("notebook", _NOTEBOOK_SEEN),
    ("kernel_event", _KERNEL_EVENT),
)  # fmt: skip
#: What the sqlite3 module raises for one row it cannot write (not for a database that
#: cannot be written: that is an OperationalError or a DatabaseError, and the batch waits).
_ROW_ERRORS = (
    sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError,
    OverflowError, TypeError, ValueError,
)  # fmt: skip
_Origin = tuple[str, Any, Any, Any]  # kind, seq, kernel_id, the row or item
_Refused = tuple[_Origin, BaseException]
_Rows = dict[str, list[tuple[tuple[Any, ...], _Origin]]]


def _string(value: Any) -> str | None:
    """A header field as the log keeps it: text (a value of another type as its JSON)."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _as_json(row: Any) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode("utf-8", "replace")
        return repr(value)

    try:
        return json.dumps(row, default=plain)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(repr(row)[:100_000])
