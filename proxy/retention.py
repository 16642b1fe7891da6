"""Retention: deleting the oldest part of the log, by age or by size, while the proxy relays.

Deletion goes in short transactions (each well under the log writer's flush interval) so the
writer is never kept waiting long; freed pages are handed back to the file system
incrementally when the database was created with ``auto_vacuum = INCREMENTAL`` (every log the
proxy creates is), else reused by later writes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .audit import iso, seq_at

log = logging.getLogger("jupyter_replay_proxy.retention")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)

Progress = Callable[[int, int], None]  # (messages deleted so far, messages to delete)


def parse_size(text: str) -> int:
    """``500MB``, ``2GiB``, ``1.5G``, ``1000000`` (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 500MB, 2GiB)")
    power = " KMGT".index(match[2].upper() or " ")
    return int(float(match[1]) * (1024 if match[3] else 1000) ** power)


@dataclass
class PruneResult:
    deleted_messages: int
    deleted_clients: int
    reclaimed_bytes: int
    seconds: float
    longest_transaction_s: float


class Pruner:
    """Deletes the oldest messages in batches sized to keep each transaction short."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        transaction_budget: float = 0.02,
        progress: Progress | None = None,
    ) -> None:
        self.conn = conn
        self.transaction_budget = transaction_budget
        self.progress = progress or (lambda done, total: None)
        self.batch = 500
        self.longest = 0.0

    def prune(
        self, older_than: timedelta | None = None, max_size: int | None = None
    ) -> PruneResult:
        started = time.monotonic()
        deleted = 0
        if older_than is not None:
            cutoff = datetime.now(timezone.utc) - older_than
            deleted += self._delete_below(seq_at(self.conn, cutoff))
            self._write("DELETE FROM deliveries WHERE updated_at < ?", (iso(cutoff),))
        if max_size is not None:
            deleted += self._shrink_to(max_size)
        clients = self._forget_clients()
        reclaimed = self._reclaim()
        return PruneResult(deleted, clients, reclaimed, time.monotonic() - started, self.longest)

    def _delete_below(self, end: int) -> int:
        """Delete every message with a sequence number below ``end``."""
        first = self.conn.execute("SELECT MIN(seq) FROM messages").fetchone()[0]
        if first is None or first >= end:
            return 0
        total = self.conn.execute("SELECT COUNT(*) FROM messages WHERE seq < ?", (end,)).fetchone()[
            0
        ]
        deleted = 0
        low = first
        while low < end:
            high = min(low + self.batch, end)
            deleted += self._delete_range(low, high)
            low = high
            self.progress(deleted, total)
        return deleted

    def _shrink_to(self, max_size: int) -> int:
        """Delete the oldest messages until the pages in use fit in ``max_size`` bytes."""
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        total = self.conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        deleted = 0
        first = self.conn.execute("SELECT MIN(seq) FROM messages").fetchone()[0]
        while first is not None:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
            if (pages - free) * page_size <= max_size:
                break
            high = first + self.batch
            deleted += self._delete_range(first, high)
            self.progress(deleted, total)
            first = self.conn.execute(
                "SELECT MIN(seq) FROM messages WHERE seq >= ?", (high,)
            ).fetchone()[0]
        return deleted

    def _delete_range(self, low: int, high: int) -> int:
        started = time.monotonic()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM message_buffers WHERE seq >= ? AND seq < ?", (low, high))
            count = self.conn.execute(
                "DELETE FROM messages WHERE seq >= ? AND seq < ?", (low, high)
            ).rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self._took(time.monotonic() - started)
        return count

    def _took(self, seconds: float) -> None:
        """Fit the next batch to the budget for one transaction."""
        self.longest = max(self.longest, seconds)
        if seconds > self.transaction_budget:
            self.batch = max(50, int(self.batch * 0.5))
        elif seconds < self.transaction_budget / 2:
            self.batch = min(20_000, int(self.batch * 1.5))

    def _forget_clients(self) -> int:
        """Connections that ended before the oldest message left can have no message left."""
        oldest = self.conn.execute(
            "SELECT received_at FROM messages ORDER BY seq LIMIT 1"
        ).fetchone()
        if oldest is None:
            return self._write("DELETE FROM clients WHERE disconnected_at IS NOT NULL", ())
        return self._write(
            "DELETE FROM clients WHERE disconnected_at IS NOT NULL AND disconnected_at < ?",
            (oldest[0],),
        )

    def _write(self, sql: str, params: tuple) -> int:
        started = time.monotonic()
        count = self.conn.execute(sql, params).rowcount
        self._took(time.monotonic() - started)
        return count

    def _reclaim(self) -> int:
        """Give freed pages back, a slice at a time, when the file allows it."""
        if self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: incremental
            return 0
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        start, pages = free, 1000
        while free:
            started = time.monotonic()
            # executescript steps the pragma to its end; execute() would free a single page
            self.conn.executescript(f"PRAGMA incremental_vacuum({min(free, pages)});")
            took = time.monotonic() - started
            self.longest = max(self.longest, took)
            pages = max(100, int(pages * (0.5 if took > self.transaction_budget else 1.25)))
            left = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
            if left >= free:
                break  # nothing more can be handed back now
            free = left
        return (start - free) * page_size


@dataclass(frozen=True)
class Policy:
    """What the running proxy keeps: configured by ``retention_*`` options."""

    older_than: timedelta | None
    max_size: int | None
    interval: float

    @property
    def active(self) -> bool:
        return self.older_than is not None or self.max_size is not None

    async def apply_periodically(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Prune now and every ``interval`` seconds, on a thread (the relay never waits)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                result = await loop.run_in_executor(None, self._apply, connect)
            except sqlite3.Error as error:
                log.error("Retention could not prune the message log: %s", error)
            else:
                if result.deleted_messages:
                    log.info(
                        "Retention pruned %d messages (%d bytes reclaimed) in %.1f s",
                        result.deleted_messages, result.reclaimed_bytes, result.seconds,
                    )  # fmt: skip
            await asyncio.sleep(self.interval)

    def _apply(self, connect: Callable[[], sqlite3.Connection]) -> PruneResult:
        conn = connect()
        try:
            return Pruner(conn).prune(self.older_than, self.max_size)
        finally:
            conn.close()
