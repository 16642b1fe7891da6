"""The log as an audit trail: which messages, which executions (who ran what, when, what came
out), a notebook rebuilt from the log, and figures about the log.

Shared by the command line (``log``, ``transcript``, ``export``, ``stats``) and the HTTP API.
Reads only; retention (deleting) is in ``retention.py``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fold import FOLDED_MESSAGES, NotebookFold, join_text, stdin_echo
from .upstream import is_placeholder_path

if TYPE_CHECKING:
    from nbformat import NotebookNode

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")


class QueryError(ValueError):
    """A filter the log cannot be queried with (bad time, unknown format...)."""


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w``."""
    match = _DURATION.match(text)
    if not match:
        raise QueryError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 30d, 2w)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago (``2h``)."""
    now = now or datetime.now(timezone.utc)
    try:
        return now - parse_duration(text)
    except QueryError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(
            f"not a time: {text!r} (use ISO 8601, or a duration ago like 2h)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    """As the log writes times: UTC, microseconds, +00:00."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def seq_at(conn: sqlite3.Connection, moment: datetime) -> int:
    """A sequence number that splits the log at the moment: every message below it was
    received before, none at or above it.

    Sequence numbers are given in the order messages are received, so a binary search over
    the primary key finds it without an index on times.
    """
    low, high = conn.execute(
        "SELECT COALESCE(MIN(seq), 1), COALESCE(MAX(seq), 0) + 1 FROM messages"
    ).fetchone()
    wanted = iso(moment)
    while low < high:
        middle = (low + high) // 2
        row = conn.execute(
            "SELECT seq, received_at FROM messages WHERE seq >= ? ORDER BY seq LIMIT 1", (middle,)
        ).fetchone()
        if row is None or row[1] >= wanted:
            high = middle
        else:
            low = row[0] + 1
    return low


@dataclass
class Filter:
    """What part of the log to look at. Empty fields do not filter."""

    kernel: str | None = None
    notebook: str | None = None  # a notebook path: the kernels its sessions used
    session: str | None = None  # a frontend's session_id (channels URL) or header session
    user: str | None = None  # the authenticated user, as jupyter-server's /api/me said
    msg_types: Sequence[str] = ()
    channels: Sequence[str] = ()
    parent: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0  # only sequence numbers above this: where the previous page ended
    limit: int | None = None
    visible_kernels: frozenset[str] | None = None  # None: every kernel (authorization)


class _Where:
    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return ("WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


def _common(conn: sqlite3.Connection, where: _Where, query: Filter, alias: str) -> None:
    """The conditions messages and executions share; bounds in time become bounds in seq."""
    if query.kernel:
        where.add(f"{alias}.kernel_id = ?", query.kernel)
    if query.notebook:
        where.add(
            f"{alias}.kernel_id IN (SELECT kernel_id FROM kernel_notebooks WHERE path = ?)",
            query.notebook,
        )
    if query.visible_kernels is not None:
        marks = ", ".join("?" * len(query.visible_kernels))
        where.add(f"{alias}.kernel_id IN ({marks})", *sorted(query.visible_kernels))
    after = query.after
    if query.since:
        after = max(after, seq_at(conn, query.since) - 1)
    if after:
        where.add(f"{alias}.seq > ?", after)
    if query.until:
        where.add(f"{alias}.seq < ?", seq_at(conn, query.until))


def _page(query: Filter) -> str:
    return f"LIMIT {int(query.limit)}" if query.limit else ""


# --- messages ------------------------------------------------------------------------------------


def messages(conn: sqlite3.Connection, query: Filter) -> list[dict[str, Any]]:
    """Logged messages matching the filter, oldest first, content and metadata as JSON."""
    where = _Where()
    _common(conn, where, query, "m")
    if query.session:
        where.add("(m.session = ? OR c.session_id = ?)", query.session, query.session)
    if query.user:
        where.add("c.username = ?", query.user)
    if query.msg_types:
        where.add(f"m.msg_type IN ({', '.join('?' * len(query.msg_types))})", *query.msg_types)
    if query.channels:
        where.add(f"m.channel IN ({', '.join('?' * len(query.channels))})", *query.channels)
    if query.parent:
        where.add("m.parent_msg_id = ?", query.parent)
    rows = conn.execute(
        f"""
        SELECT
            m.seq, m.received_at, m.kernel_id, m.channel, m.direction, m.msg_type, m.msg_id,
            m.parent_msg_id, m.session, c.username AS user, m.client_id, m.msg_date,
            m.metadata, m.content, m.buffer_count
        FROM messages AS m
        LEFT JOIN clients AS c ON c.client_id = m.client_id
        {where.sql()}
        ORDER BY m.seq
        {_page(query)}
        """,
        where.params,
    )
    names = [column[0] for column in rows.description]
    found = []
    for row in rows:
        message = dict(zip(names, row, strict=True))
        message["metadata"] = _json(message["metadata"])
        message["content"] = _json(message["content"])
        found.append(message)
    return found


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # logged as received, even when it was not JSON


def summary(message: dict[str, Any], width: int = 60) -> str:
    """One line saying what a message was about."""
    content = message["content"] if isinstance(message["content"], dict) else {}
    kind = message["msg_type"]
    if kind in ("execute_request", "execute_input"):
        text = content.get("code", "")
    elif kind == "stream":
        text = f"{content.get('name')}: {join_text(content.get('text', ''))}"
    elif kind == "status":
        text = content.get("execution_state", "")
    elif kind == "error":
        text = f"{content.get('ename')}: {content.get('evalue')}"
    elif kind in ("execute_reply", "complete_reply", "inspect_reply", "kernel_info_reply"):
        text = content.get("status", "")
    elif kind in ("display_data", "execute_result", "update_display_data"):
        text = ", ".join(content.get("data", {}))
    elif kind in ("input_request", "input_reply"):
        text = content.get("prompt", "") if kind == "input_request" else "(answered)"
    else:
        text = ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- executions ----------------------------------------------------------------------------------


@dataclass
class Execution:
    """One execute_request and what came of it."""

    seq: int
    kernel_id: str
    msg_id: str
    notebook_path: str | None
    cell_id: str | None
    user: str | None
    client_session: str | None
    session: str | None
    code: str
    requested_at: str
    started_at: str | None
    finished_at: str | None
    status: str | None  # ok, error, aborted; None while unfinished
    execution_count: int | None
    duration_s: float | None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outputs"] = [summarise_output(output) for output in self.outputs]
        return data


def executions(conn: sqlite3.Connection, query: Filter) -> list[Execution]:
    """Executions matching the filter, oldest first, each with its outputs folded."""
    found = _execution_rows(conn, query)
    notebook = _fold(conn, found, lambda execution: execution.msg_id)
    for execution in found:
        execution.outputs = notebook.cell(execution.msg_id).outputs
    return found


def _execution_rows(conn: sqlite3.Connection, query: Filter) -> list[Execution]:
    where = _Where()
    _common(conn, where, query, "e")
    if query.session:
        where.add("(e.client_session = ? OR e.session = ?)", query.session, query.session)
    if query.user:
        where.add("e.user = ?", query.user)
    rows = conn.execute(
        f"""
        SELECT
            seq, kernel_id, msg_id, notebook_path, cell_id, user, client_session, session,
            code, requested_at, started_at, finished_at, status, execution_count, duration_s
        FROM executions AS e
        {where.sql()}
        ORDER BY e.seq
        {_page(query)}
        """,
        where.params,
    )
    found = [Execution(*row) for row in rows]
    for execution in found:
        if not isinstance(execution.code, str):
            execution.code = ""
    return found


def _fold(
    conn: sqlite3.Connection, found: list[Execution], cell_of: Callable[[Execution], str]
) -> NotebookFold:
    """Fold the executions' iopub in the order it was received. An execution starts (and
    clears its cell) when requested; output of an execution whose cell was executed again
    since is not shown, as a frontend drops it."""
    notebook = NotebookFold()
    by_msg_id = {execution.msg_id: execution for execution in found}
    folded_types = ", ".join(f"'{kind}'" for kind in sorted(FOLDED_MESSAGES))
    events: list[tuple[int, Execution, str | None, str | None]] = [
        (execution.seq, execution, None, None) for execution in found
    ]
    ids = list(by_msg_id)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = conn.execute(
            f"""
            SELECT seq, parent_msg_id, msg_type, content FROM messages
            WHERE parent_msg_id IN ({", ".join("?" * len(chunk))})
                AND channel = 'iopub' AND msg_type IN ({folded_types})
            """,
            chunk,
        )
        events.extend(
            (seq, by_msg_id[parent], kind, content) for seq, parent, kind, content in rows
        )
        answers = conn.execute(
            f"""
            SELECT reply.seq, prompt.parent_msg_id, prompt.content, reply.content
            FROM messages AS prompt
            JOIN messages AS reply
                ON reply.parent_msg_id = prompt.msg_id AND reply.msg_type = 'input_reply'
            WHERE prompt.parent_msg_id IN ({", ".join("?" * len(chunk))})
                AND prompt.msg_type = 'input_request'
            """,
            chunk,
        )
        for seq, parent, request, reply in answers:  # as the frontend echoes them
            asked, answered = _json(request), _json(reply)
            echo = stdin_echo(
                asked if isinstance(asked, dict) else {},
                answered if isinstance(answered, dict) else {},
            )
            events.append((seq, by_msg_id[parent], "stream", json.dumps(echo)))
    events.sort(key=lambda event: event[0])
    latest: dict[str, str] = {}  # cell → msg_id of the execution that owns it
    for _seq, execution, msg_type, content in events:
        cell = cell_of(execution)
        if msg_type is None:
            notebook.start(cell)
            latest[cell] = execution.msg_id
        elif latest.get(cell) == execution.msg_id:
            parsed = _json(content or "")
            if isinstance(parsed, dict):
                notebook.apply(cell, msg_type, parsed)
    for execution in found:
        cell = cell_of(execution)
        if latest.get(cell) == execution.msg_id:
            notebook.finish(cell, {"execution_count": execution.execution_count})
    return notebook


def summarise_output(output: dict[str, Any], text_limit: int = 2000) -> dict[str, Any]:
    """Text shown as text; rich data by mime type and size."""
    kind = output["output_type"]
    if kind == "stream":
        return {"type": "stream", "name": output["name"], "text": _clip(output["text"], text_limit)}
    if kind == "error":
        return {
            "type": "error", "ename": output["ename"], "evalue": output["evalue"],
            "traceback": [_ANSI.sub("", line) for line in output["traceback"]],
        }  # fmt: skip
    data = output.get("data", {})
    shown: dict[str, Any] = {"type": kind}
    if "text/plain" in data:
        shown["text"] = _clip(join_text(data["text/plain"]), text_limit)
    shown["data"] = {mime: _size(value) for mime, value in data.items()}
    return shown


def _size(value: Any) -> int:
    return len(value if isinstance(value, str) else json.dumps(value))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


# --- transcripts ---------------------------------------------------------------------------------


def transcript_text(found: Sequence[Execution]) -> Iterator[str]:
    return transcript_lines(execution.as_json() for execution in found)


def transcript_lines(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Executions as the audit API gives them (:meth:`Execution.as_json`), as text."""
    for item in items:
        count, duration = item["execution_count"], item["duration_s"]
        yield (
            f"[{count if count is not None else ' '}] "
            f"{item['requested_at']}  {item['user'] or '(unknown user)'}  "
            f"{item['notebook_path'] or item['kernel_id']}"
            f"{'#' + item['cell_id'] if item['cell_id'] else ''}  "
            f"{item['status'] or 'unfinished'}"
            f"{f' in {duration:.3f} s' if duration is not None else ''}"
        )
        yield from ("  > " + line for line in item["code"].splitlines() or [""])
        for shown in item["outputs"]:
            yield from ("    " + line for line in _output_lines(shown))
        yield ""


def transcript_markdown(found: Sequence[Execution]) -> Iterator[str]:
    for execution in found:
        where = execution.notebook_path or f"kernel {execution.kernel_id}"
        count = execution.execution_count if execution.execution_count is not None else " "
        yield f"### In [{count}]: {where}"
        yield ""
        yield (
            f"- **who**: {execution.user or 'unknown'}  \n- **when**: {execution.requested_at}  "
            f"\n- **status**: {execution.status or 'unfinished'}"
            + (f", {execution.duration_s:.3f} s" if execution.duration_s is not None else "")
            + (f"  \n- **cell**: `{execution.cell_id}`" if execution.cell_id else "")
        )
        yield ""
        yield from _fenced(execution.code, "python")
        for output in execution.outputs:
            yield from _fenced("\n".join(_output_lines(summarise_output(output))), "")
        yield ""


def _fenced(text: str, language: str) -> Iterator[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    yield fence + language
    yield from text.rstrip("\n").splitlines()
    yield fence
    yield ""


def _output_lines(shown: dict[str, Any]) -> list[str]:
    if shown["type"] == "stream":
        lines = shown["text"].rstrip("\n").splitlines()
        return [
            f"[{shown['name']}] {line}" if shown["name"] == "stderr" else line for line in lines
        ]
    if shown["type"] == "error":
        return [line for entry in shown["traceback"] for line in entry.splitlines()] or [
            f"{shown['ename']}: {shown['evalue']}"
        ]
    lines = shown.get("text", "").splitlines()
    rich = [
        f"<{mime}, {size:,} bytes>" for mime, size in shown["data"].items() if mime != "text/plain"
    ]
    return lines + rich


# --- export --------------------------------------------------------------------------------------


def export_notebook(conn: sqlite3.Connection, query: Filter) -> NotebookNode:
    """A notebook rebuilt from the log: a code cell per cell the executions ran in (an
    execution without a cell id is a cell of its own), in the order first run, each with the
    source, count and outputs of its last execution, folded as a frontend would show them."""
    import nbformat  # here, not at the top: it costs every proxy ~20 MB and a second to start

    found = _execution_rows(conn, Filter(**{**asdict(query), "limit": None}))
    notebook = _fold(conn, found, _cell_key)
    last: dict[str, Execution] = {}
    for execution in found:
        last[_cell_key(execution)] = execution  # dicts keep the order keys were first set
    exported = nbformat.v4.new_notebook()
    for key, execution in last.items():
        cell = nbformat.v4.new_code_cell(
            source=execution.code,
            execution_count=execution.execution_count,
            outputs=[nbformat.from_dict(output) for output in notebook.cell(key).outputs],
        )
        if execution.cell_id and _CELL_ID.match(execution.cell_id):
            cell["id"] = execution.cell_id
        exported.cells.append(cell)
    language = _language_info(conn, {execution.kernel_id for execution in found})
    if language:
        exported.metadata["language_info"] = language
    nbformat.validate(exported)
    return exported


def ipynb_text(notebook: NotebookNode) -> str:
    """An exported notebook as the text of an .ipynb file."""
    import nbformat  # (see export_notebook)

    return nbformat.writes(notebook)


def _cell_key(execution: Execution) -> str:
    return execution.cell_id or execution.msg_id


def _language_info(conn: sqlite3.Connection, kernels: set[str]) -> dict[str, Any] | None:
    for kernel_id in sorted(kernels):
        row = conn.execute(
            """
            SELECT content FROM messages
            WHERE kernel_id = ? AND msg_type = 'kernel_info_reply'
            ORDER BY seq DESC
            LIMIT 1
            """,
            (kernel_id,),
        ).fetchone()
        info = _json(row[0]).get("language_info") if row else None
        if isinstance(info, dict) and "name" in info:
            return info
    return None


# --- stats ---------------------------------------------------------------------------------------


def stats(conn: sqlite3.Connection, path: Path | None = None) -> dict[str, Any]:
    """Figures about the whole log."""
    first, last, count = conn.execute(
        "SELECT MIN(seq), MAX(seq), COUNT(*) FROM messages"
    ).fetchone()
    oldest = newest = None
    if first is not None:
        oldest = conn.execute(
            "SELECT received_at FROM messages WHERE seq = ?", (first,)
        ).fetchone()[0]
        newest = conn.execute("SELECT received_at FROM messages WHERE seq = ?", (last,)).fetchone()[
            0
        ]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = None
    if path is not None and path.exists():
        size = path.stat().st_size + sum(
            side.stat().st_size for side in (Path(f"{path}-wal"),) if side.exists()
        )
    return {
        "messages": count,
        "executions": conn.execute(
            "SELECT COUNT(*) FROM messages WHERE msg_type = 'execute_request'"
        ).fetchone()[0],
        "kernels": conn.execute("SELECT COUNT(DISTINCT kernel_id) FROM messages").fetchone()[0],
        "users": conn.execute(
            "SELECT COUNT(DISTINCT username) FROM clients WHERE username IS NOT NULL"
        ).fetchone()[0],
        "clients": conn.execute("SELECT COUNT(*) FROM clients").fetchone()[0],
        "notebooks": len(
            {
                path
                for (path,) in conn.execute(
                    "SELECT DISTINCT path FROM kernel_notebooks WHERE session_type = 'notebook'"
                )
                if not is_placeholder_path(path)  # (logged by proxies before 0.2)
            }
        ),
        "oldest": oldest,
        "newest": newest,
        "first_seq": first,
        "last_seq": last,
        "database_bytes": size if size is not None else pages * page_size,
        "free_bytes": free * page_size,
    }
