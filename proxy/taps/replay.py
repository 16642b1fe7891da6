"""The replay tap: the log as the memory jupyter-server lacks.

It keeps where each frontend session stands in each kernel's log (what the session
acknowledged), decides where a joining client starts (resume after its last acknowledged
message, a history a tool asked for with ``replay=``, or the kernel's current state), serves the
history a client that fell behind reads, and restores what a kernel's relay must remember after
a proxy restart. Reads run on a thread of their own; the relay never waits on them.
"""

from __future__ import annotations

import asyncio
import collections
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..codecs import Message
from ..lifecycle import LOOKBACK, UNFINISHED_EXECUTIONS
from ..relay import Client, Departed, KernelMemory, Tap
from .log import LogWriter

_HISTORY = """
SELECT m.seq, m.channel, m.msg_id, m.msg_type, m.parent_msg_id,
       m.header, m.parent_header, m.metadata, m.content, m.buffer_count
FROM messages AS m
LEFT JOIN clients AS c ON c.client_id = m.client_id
WHERE m.kernel_id = :kernel
  AND m.seq > :after AND (:upto IS NULL OR m.seq <= :upto)
  AND m.direction = 'from_kernel'
  AND (m.channel = 'iopub' OR c.session_id = :session)
  AND (:parent IS NULL OR m.parent_msg_id = :parent)
ORDER BY m.seq
LIMIT :limit
"""
_RECENT_IOPUB = """
SELECT msg_id FROM messages
WHERE kernel_id = :kernel AND channel = 'iopub' AND direction = 'from_kernel'
ORDER BY seq DESC
LIMIT :limit
"""
#: What a resuming session gets again: its kernel's messages it was sent but did not confirm.
_RESENT = """
SELECT count(*) FROM messages
WHERE kernel_id = :kernel AND seq > :after AND seq <= :through AND direction = 'from_kernel'
"""

_NTH_LAST = """
SELECT m.seq
FROM messages AS m
LEFT JOIN clients AS c ON c.client_id = m.client_id
WHERE m.kernel_id = :kernel AND m.direction = 'from_kernel'
  AND (m.channel = 'iopub' OR c.session_id = :session)
ORDER BY m.seq DESC
LIMIT 1 OFFSET :offset
"""
_UNANSWERED_REQUESTS = """
SELECT m.msg_id, m.client_id, c.session_id
FROM messages AS m
LEFT JOIN clients AS c ON c.client_id = m.client_id
WHERE m.kernel_id = :kernel AND m.direction = 'to_kernel' AND m.channel IN ('shell', 'control')
  AND m.seq > (SELECT coalesce(max(seq), 0) FROM messages) - :lookback
  AND NOT EXISTS (
      SELECT 1 FROM messages AS r
      WHERE r.parent_msg_id = m.msg_id AND r.direction = 'from_kernel'
        AND r.msg_type LIKE '%\\_reply' ESCAPE '\\'
  )
"""
_LAST_OF_TYPE = """
SELECT seq, channel, msg_id, msg_type, parent_msg_id,
       header, parent_header, metadata, content, buffer_count
FROM messages
WHERE kernel_id = :kernel AND msg_type = :msg_type
ORDER BY seq DESC
LIMIT 1
"""
_EXECUTION_STATE = """
SELECT seq, channel, msg_id, msg_type, parent_msg_id,
       header, parent_header, metadata, content, buffer_count
FROM messages
WHERE kernel_id = :kernel AND msg_type = 'status'
  AND coalesce(json_extract(parent_header, '$.msg_type'), 'execute_request') = 'execute_request'
ORDER BY seq DESC
LIMIT 1
"""
_HAS_CHILD = """
SELECT 1 FROM messages WHERE parent_msg_id = :parent AND msg_type = :msg_type LIMIT 1
"""


@dataclass(frozen=True)
class ReplayRequest:
    """What a tool asked for with the channels URL's ``replay`` parameter."""

    after: int = 0
    last: int | None = None
    parent: str | None = None


#: Sessions whose delivery position is kept in memory (the most recently active ones).
MAX_REMEMBERED_POSITIONS = 10_000
#: Sequence numbers are SQLite integers.
MAX_SEQ = 2**63 - 1
#: jupyter-server makes a websocket's session_id the zmq identity of its sockets: at most 255
#: bytes. The proxy keeps each session's position under it.
MAX_SESSION_ID = 255
MAX_REPLAY_LAST = 10_000_000
_NUMBER = re.compile(r"[0-9]{1,19}")


def parse_replay(value: str) -> ReplayRequest:
    """``all``, ``since:<seq>``, ``last:<n>`` or ``parent:<msg_id>``; ValueError otherwise."""
    kind, _, argument = value.partition(":")
    if kind == "all" and not argument:
        return ReplayRequest()
    if kind == "since" and _NUMBER.fullmatch(argument) and int(argument) <= MAX_SEQ:
        return ReplayRequest(after=int(argument))
    if kind == "last" and _NUMBER.fullmatch(argument) and 0 < int(argument) <= MAX_REPLAY_LAST:
        return ReplayRequest(last=int(argument))
    if kind == "parent" and 0 < len(argument) <= MAX_SESSION_ID:
        return ReplayRequest(parent=argument)
    raise ValueError(
        f"replay must be all, since:<seq> (seq < 2^63), last:<n> (n <= {MAX_REPLAY_LAST:,}) "
        f"or parent:<msg_id>, not {value[:80]!r}"
    )


def channel_options(query: Mapping[str, str]) -> tuple[str | None, ReplayRequest | None]:
    """The session_id and replay request of a channels URL (ValueError if out of bounds).
    An empty session_id is no session, as in jupyter-server."""
    session_id = query.get("session_id") or None
    if session_id is not None and len(session_id.encode()) > MAX_SESSION_ID:
        raise ValueError(f"session_id is longer than {MAX_SESSION_ID} bytes")
    replay = parse_replay(query["replay"]) if "replay" in query else None
    return session_id, replay


def _message(row: tuple[Any, ...], buffers: list[bytes]) -> Message:
    """A logged message, rebuilt without parsing its JSON (the columns hold what routing needs)."""
    seq, channel, msg_id, msg_type, parent_id, header, parent, metadata, content, _ = row
    parts = [header.encode(), parent.encode(), metadata.encode(), content.encode(), *buffers]
    return Message(
        channel,
        parts,
        {"msg_id": msg_id, "msg_type": msg_type},
        {"msg_id": parent_id} if parent_id else {},
        seq,
    )


def _remember(
    sessions: collections.OrderedDict[tuple[str, str], int], key: tuple[str, str], seq: int
) -> None:
    """Keep a session's sequence number, the most recently used `MAX_REMEMBERED_POSITIONS`."""
    sessions[key] = seq
    sessions.move_to_end(key)
    if len(sessions) > MAX_REMEMBERED_POSITIONS:
        sessions.popitem(last=False)


class Replayer(Tap):
    """Delivery positions, history and restored kernel memory, read from the log."""

    def __init__(
        self,
        writer: LogWriter,
        connect: Callable[[], sqlite3.Connection],
        window: float = 24 * 3600,
        lookback: int = LOOKBACK,
    ) -> None:
        self.writer = writer
        self._connect = connect
        self.window = window
        self.lookback = lookback
        # the latest positions, also those not committed yet; the log has them all (a session
        # whose position was forgotten here is read from it)
        self.positions: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        # how far each session was sent when its client left: what of that is sent again when
        # it resumes is counted (not across a restart of the proxy: it did not log that far)
        self.sent: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self.resent_messages = 0
        self.replays: collections.Counter[str] = collections.Counter()  # resume, history
        self.replayed_messages = 0  # sent from the log
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="replay-proxy-reader")
        self._conn: sqlite3.Connection | None = None

    # --- tap -------------------------------------------------------------------------------

    def delivery_confirmed(self, client: Client, seq: int) -> None:
        if client.session_id is not None:
            key = (client.kernel_id, client.session_id)
            _remember(self.positions, key, max(seq, self.positions.get(key, 0)))

    def client_left(self, client: Client) -> None:
        if client.session_id is not None and client.sent_seq > client.confirmed_seq:
            _remember(self.sent, (client.kernel_id, client.session_id), client.sent_seq)

    # --- reading, on the reader thread -----------------------------------------------------

    async def read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `work` on the log, on the reader thread (shared by the taps that restore their
        memory from the log)."""

        def run() -> Any:
            if self._conn is None:
                self._conn = self._connect()
            return work(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    @staticmethod
    def _with_buffers(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Message]:
        messages = []
        for row in rows:
            buffers = []
            if row[-1]:
                buffers = [
                    data
                    for (data,) in conn.execute(
                        "SELECT data FROM message_buffers WHERE seq = ? ORDER BY idx", (row[0],)
                    )
                ]
            messages.append(_message(row, buffers))
        return messages

    async def history(
        self, client: Client, after: int, upto: int | None, limit: int | None, parent: str | None
    ) -> list[Message]:
        query = {
            "kernel": client.kernel_id, "session": client.session_id, "after": after,
            "upto": upto, "parent": parent, "limit": -1 if limit is None else limit,
        }  # fmt: skip

        def work(conn: sqlite3.Connection) -> list[Message]:
            return self._with_buffers(conn, conn.execute(_HISTORY, query).fetchall())

        found: list[Message] = await self.read(work)
        self.replayed_messages += len(found)
        return found

    async def recently_logged(self, kernel_id: str, limit: int) -> set[str]:
        """The msg_ids of a kernel's last `limit` iopub messages in the log."""

        def work(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(_RECENT_IOPUB, {"kernel": kernel_id, "limit": limit})
            return {msg_id for (msg_id,) in rows}

        found: set[str] = await self.read(work)
        return found

    async def settle(self) -> None:
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, self.writer.flush, 5.0):
            pass  # a log that is far behind (or failing): the client waits, it loses nothing

    async def durable(self, seq: int) -> None:
        await self.writer.until_durable(seq)

    async def _position(self, kernel_id: str, session_id: str) -> int | None:
        known = self.positions.get((kernel_id, session_id))
        if known is not None:
            return known

        def work(conn: sqlite3.Connection) -> tuple[int, str] | None:
            return conn.execute(
                "SELECT seq, updated_at FROM deliveries WHERE kernel_id = ? AND session_id = ?",
                (kernel_id, session_id),
            ).fetchone()

        row = await self.read(work)
        if row is None:
            return None
        seq, updated_at = row
        age = time.time() - datetime.fromisoformat(updated_at).timestamp()
        return seq if age <= self.window else None

    async def starting_point(self, client: Client, replay: ReplayRequest | None) -> bool:
        """Set where `client` starts in its kernel's log. False: no history, start live."""
        if replay is not None:
            after = replay.after
            if replay.last is not None:
                query = {
                    "kernel": client.kernel_id, "session": client.session_id,
                    "offset": replay.last - 1,
                }  # fmt: skip
                row = await self.read(lambda conn: conn.execute(_NTH_LAST, query).fetchone())
                after = row[0] - 1 if row else 0
            client.sent_seq, client.behind, client.replay_parent = after, True, replay.parent
            self.replays["history"] += 1
            return True
        if client.session_id is None:
            return False
        position = await self._position(client.kernel_id, client.session_id)
        if position is None:
            return False
        client.sent_seq, client.behind = position, True
        self.replays["resume"] += 1
        sent = self.sent.pop((client.kernel_id, client.session_id), 0)
        if sent > position:
            query = {"kernel": client.kernel_id, "after": position, "through": sent}
            row = await self.read(lambda conn: conn.execute(_RESENT, query).fetchone())
            client.resent = row[0]
            self.resent_messages += client.resent
        return True

    async def remember(self, kernel_id: str) -> KernelMemory:
        """What the kernel's relay knew before the proxy (re)started, from the log."""

        def work(conn: sqlite3.Connection) -> KernelMemory:
            memory = KernelMemory()
            query = {"kernel": kernel_id, "lookback": self.lookback}
            for msg_id, client_id, session_id in conn.execute(_UNANSWERED_REQUESTS, query):
                memory.requesters[msg_id] = Departed(client_id or "", kernel_id, session_id)
            status = conn.execute(_EXECUTION_STATE, {"kernel": kernel_id})
            memory.last_status = next(iter(self._with_buffers(conn, status.fetchall())), None)
            pending = conn.execute(
                _LAST_OF_TYPE, {"kernel": kernel_id, "msg_type": "input_request"}
            ).fetchone()
            if pending is not None:
                _, _, msg_id, _, parent_id, *_ = pending
                answered = conn.execute(
                    _HAS_CHILD, {"parent": msg_id, "msg_type": "input_reply"}
                ).fetchone()
                finished = conn.execute(
                    _HAS_CHILD, {"parent": parent_id, "msg_type": "execute_reply"}
                ).fetchone()
                if not answered and not finished:
                    memory.pending_input = _message(pending, [])
            memory.executions = [row[1] for row in conn.execute(UNFINISHED_EXECUTIONS, query)]
            return memory

        return await self.read(work)

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._reader.submit(shut).result()
        self._reader.shutdown()
