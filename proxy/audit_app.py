"""The audit trail on the command line: ``log``, ``transcript``, ``export``, ``stats``, ``prune``.

They read the log database directly (also while the proxy runs: the log is in WAL mode), so they
work without the proxy and after the notebooks are gone.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from traitlets import Bool, Enum, Integer, List, Unicode

from . import audit
from .app import CommandError, DatabaseApp
from .database import SchemaError, open_database
from .retention import Pruner, parse_size

_filter_aliases = {
    "db": "DatabaseApp.db",
    "kernel": "AuditApp.kernel",
    "notebook": "AuditApp.notebook",
    "session": "AuditApp.session",
    "user": "AuditApp.user",
    "since": "AuditApp.since",
    "until": "AuditApp.until",
    "limit": "AuditApp.limit",
    "format": "AuditApp.format",
    "log-level": "Application.log_level",
}


class AuditApp(DatabaseApp):
    """What the reading commands share: the filters."""

    aliases = _filter_aliases

    kernel = Unicode("", config=True, help="Only this kernel (id).")
    notebook = Unicode("", config=True, help="Only kernels this notebook path used.")
    session = Unicode("", config=True, help="Only this frontend session_id (or header session).")
    user = Unicode("", config=True, help="Only this authenticated user.")
    since = Unicode("", config=True, help="From this time: ISO 8601, or a duration ago (2h).")
    until = Unicode("", config=True, help="Before this time: ISO 8601, or a duration ago.")
    limit = Integer(0, config=True, help="At most this many entries (0: all).")
    format = Enum(["text", "json"], "text", config=True, help="Output format.")

    def open(self) -> sqlite3.Connection:
        if not Path(self.db).exists():
            self.fail(f"no log database at {self.db}")
        try:
            conn = open_database(self.db)
        except SchemaError as error:
            self.fail(str(error))
        conn.row_factory = None
        return conn

    def fail(self, message: str) -> NoReturn:
        raise CommandError(message)

    def query(self) -> audit.Filter:
        try:
            return audit.Filter(
                kernel=self.kernel or None, notebook=self.notebook or None,
                session=self.session or None, user=self.user or None,
                since=audit.parse_time(self.since) if self.since else None,
                until=audit.parse_time(self.until) if self.until else None,
                limit=self.limit or None,
            )  # fmt: skip
        except audit.QueryError as error:
            self.fail(str(error))


class LogApp(AuditApp):
    name = "jupyter-replay-proxy-log"
    description = "Show logged kernel messages, oldest first; --follow tails new ones."
    aliases = {
        **_filter_aliases,
        "msg-type": "LogApp.msg_types",
        "channel": "LogApp.channels",
        "parent": "LogApp.parent_msg_id",
        "format": "LogApp.format",
    }
    flags = {"follow": ({"LogApp": {"follow": True}}, "Keep printing messages as they come.")}

    msg_types = List(Unicode(), config=True, help="Only these message types (repeatable).")
    channels = List(Unicode(), config=True, help="Only these channels (repeatable).")
    parent_msg_id = Unicode("", config=True, help="Only messages caused by this msg_id.")
    follow = Bool(False, config=True, help="Keep printing messages as they come.")
    format = Enum(["text", "json"], "text", config=True, help="text (a table) or json (lines).")

    def start(self) -> None:
        conn = self.open()
        query = self.query()
        query.msg_types, query.channels = self.msg_types, self.channels
        query.parent = self.parent_msg_id or None
        if self.format == "text":
            print(f"{'seq':>8}  {'received (UTC)':<26}  {'kernel':<8}  {'channel':<7}  "
                  f"{'dir':<3}  {'msg_type':<22}  {'user':<12}  what")  # fmt: skip
        try:
            for message in self._messages(conn, query):
                print(self._line(message), flush=self.follow)
        except KeyboardInterrupt:
            pass

    def _messages(self, conn: sqlite3.Connection, query: audit.Filter) -> Iterator[dict]:
        page = query.limit if query.limit and not self.follow else 5000
        shown = 0
        while True:
            query.limit = page
            found = audit.messages(conn, query)
            for message in found:
                yield message
                shown += 1
                if self.limit and shown >= self.limit and not self.follow:
                    return
            if found:
                query.after, query.since = found[-1]["seq"], None
            elif not self.follow:
                return
            if len(found) < page:
                if not self.follow:
                    return
                time.sleep(0.5)

    def _line(self, message: dict[str, Any]) -> str:
        if self.format == "json":
            return json.dumps(message, default=str)
        arrow = "->" if message["direction"] == "to_kernel" else "<-"
        return (
            f"{message['seq']:>8}  {message['received_at'][:26]:<26}  "
            f"{message['kernel_id'][:8]:<8}  {message['channel']:<7}  {arrow:<3}  "
            f"{(message['msg_type'] or '?')[:22]:<22}  {(message['user'] or '')[:12]:<12}  "
            f"{audit.summary(message)}"
        )


class TranscriptApp(AuditApp):
    name = "jupyter-replay-proxy-transcript"
    description = (
        "One entry per execution: who ran what code, where, when, how it ended, what came out."
    )
    format = Enum(["text", "json", "markdown"], "text", config=True, help="Output format.")
    aliases = {**_filter_aliases, "format": "TranscriptApp.format"}

    def start(self) -> None:
        conn = self.open()
        found = audit.executions(conn, self.query())
        if self.format == "json":
            for execution in found:
                print(json.dumps(execution.as_json(), default=str))
            return
        lines = (audit.transcript_markdown if self.format == "markdown" else audit.transcript_text)(
            found
        )
        for line in lines:
            print(line)


class ExportApp(AuditApp):
    name = "jupyter-replay-proxy-export"
    description = (
        "Rebuild a notebook (.ipynb) from the log of a kernel, session or notebook path: each "
        "cell with the code and outputs of its last execution."
    )
    aliases = {**_filter_aliases, "output": "ExportApp.output", "o": "ExportApp.output"}

    output = Unicode("", config=True, help="Write the notebook here (default: standard output).")

    def start(self) -> None:
        if not (self.kernel or self.session or self.notebook):
            self.fail("export needs --kernel, --session or --notebook")
        conn = self.open()
        notebook = audit.export_notebook(conn, self.query())
        if not notebook.cells:
            self.fail("no executions in the log match")
        text = audit.ipynb_text(notebook)
        if self.output:
            Path(self.output).write_text(text, encoding="utf-8")
            print(f"{self.output}: {len(notebook.cells)} cells", file=sys.stderr)
        else:
            sys.stdout.write(text + "\n")


class StatsApp(AuditApp):
    name = "jupyter-replay-proxy-stats"
    description = "Figures about the log: messages, executions, kernels, users, size, oldest."
    aliases = {"db": "DatabaseApp.db", "format": "StatsApp.format"}

    def start(self) -> None:
        figures = audit.stats(self.open(), Path(self.db))
        if self.format == "json":
            print(json.dumps(figures))
            return
        if figures["messages"] == 0:
            print(f"{self.db}: the log is empty")
            return
        for name, value in figures.items():
            shown = f"{value:,}" if isinstance(value, int) else value
            print(f"{name.replace('_', ' '):<16} {shown}")


class PruneApp(AuditApp):
    name = "jupyter-replay-proxy-prune"
    description = (
        "Delete the oldest part of the log, by age and/or size, in short transactions (safe "
        "while the proxy runs); freed space goes back to the file system."
    )
    aliases = {
        "db": "DatabaseApp.db",
        "older-than": "PruneApp.older_than",
        "max-size": "PruneApp.max_size",
    }

    older_than = Unicode("", config=True, help="Delete messages older than this (30d, 12h).")
    max_size = Unicode("", config=True, help="Delete the oldest messages until the log fits (2GB).")

    def start(self) -> None:
        if not (self.older_than or self.max_size):
            self.fail("prune needs --older-than and/or --max-size")
        try:
            older_than = audit.parse_duration(self.older_than) if self.older_than else None
            max_size = parse_size(self.max_size) if self.max_size else None
        except ValueError as error:
            self.fail(str(error))
        conn = self.open()
        shown = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - shown[0] > 0.5:
                shown[0] = time.monotonic()
                print(f"\rpruned {done:,} of {total:,} messages", end="", file=sys.stderr)

        result = Pruner(conn, progress=progress).prune(older_than, max_size)
        print(
            f"\rpruned {result.deleted_messages:,} messages and {result.deleted_clients:,} "
            f"connections in {result.seconds:.1f} s; reclaimed {result.reclaimed_bytes:,} bytes; "
            f"longest transaction {result.longest_transaction_s * 1000:.0f} ms "
            f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)",
            file=sys.stderr,
        )
