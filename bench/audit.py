"""Audit benchmarks.

    python -m bench.audit [--messages 1000000] [--kernels 100]

(a) transcript of one kernel among N logged messages (executions shaped as ipykernel logs
    them: request, busy, execute_input, five stream lines, reply, idle), median of 7;
(b) pruning the older half of that log while a client runs `pass` round trips through the
    proxy: round-trip latency before and during the prune, for `prune` run as a command beside
    the proxy, and for the proxy's own periodic retention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from proxy import audit
from proxy.database import connect, open_database
from tests.conftest import start_jupyter_server, start_kernel, stop_jupyter_server

from .relay import ProxyProcess, roundtrips

_PER_EXECUTION = 10


def fill(db: Path, messages: int, kernels: list[str], span: timedelta) -> None:
    """`messages` rows over `span` up to now, executions taking turns among the kernels."""
    open_database(db).close()
    conn = connect(db)
    start = datetime.now(timezone.utc) - span
    step = span / messages
    conn.execute("BEGIN")
    rows = []
    seq = 0
    for execution in range(messages // _PER_EXECUTION):
        kernel = kernels[execution % len(kernels)]
        request = f"req-{execution}"
        kinds = [
            ("shell", "to_kernel", "execute_request", {"code": f"print({execution})"}),
            ("iopub", "from_kernel", "status", {"execution_state": "busy"}),
            ("iopub", "from_kernel", "execute_input", {"code": "...", "execution_count": 1}),
            *[("iopub", "from_kernel", "stream", {"name": "stdout", "text": f"{i}\n"})
              for i in range(5)],
            ("shell", "from_kernel", "execute_reply", {"status": "ok", "execution_count": 1}),
            ("iopub", "from_kernel", "status", {"execution_state": "idle"}),
        ]  # fmt: skip
        for channel, direction, msg_type, content in kinds:
            seq += 1
            msg_id = request if msg_type == "execute_request" else f"m{seq}"
            rows.append((
                seq, kernel, channel, direction, msg_id,
                None if msg_type == "execute_request" else request, msg_type,
                audit.iso(start + step * seq),
                json.dumps({"msg_id": msg_id, "msg_type": msg_type}),
                json.dumps({"msg_id": request}), "{}", json.dumps(content),
            ))  # fmt: skip
        if len(rows) >= 50_000:
            _insert(conn, rows)
            rows = []
    _insert(conn, rows)
    conn.execute("COMMIT")
    conn.close()


def _insert(conn, rows: list[tuple]) -> None:  # type: ignore[no-untyped-def]
    conn.executemany(
        """
        INSERT INTO messages (seq, kernel_id, channel, direction, msg_id, parent_msg_id,
            msg_type, received_at, header, parent_header, metadata, content)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """,
        rows,
    )


def bench_transcript(db: Path, kernel: str) -> None:
    conn = connect(db)
    times, found = [], []
    for _ in range(7):
        started = time.perf_counter()
        found = audit.executions(conn, audit.Filter(kernel=kernel))
        times.append((time.perf_counter() - started) * 1000)
    page = []
    for _ in range(7):
        started = time.perf_counter()
        audit.executions(conn, audit.Filter(kernel=kernel, limit=100))
        page.append((time.perf_counter() - started) * 1000)
    print(
        f"(a) transcript of one kernel ({len(found):,} executions): "
        f"median {statistics.median(times):.1f} ms (min {min(times):.1f}); "
        f"first page of 100: median {statistics.median(page):.1f} ms"
    )


async def bench_prune(db: Path, tmp: Path, in_proxy: bool) -> None:
    server = start_jupyter_server(tmp / ("server-in" if in_proxy else "server-cli"))
    try:
        kernel_id = await start_kernel(server)
        proxy = ProxyProcess(server, tmp, db)
        await proxy.ready(server.token)
        baseline = await roundtrips(proxy.url, kernel_id, server.token, 300)
        before = _count(db)
        started = time.perf_counter()
        pruning = None
        if in_proxy:  # the same proxy again, now with retention: it prunes as it starts
            proxy.stop()
            proxy = ProxyProcess(server, tmp, db, ("--ProxyApp.retention_older_than=1h",))
            await proxy.ready(server.token)
        else:
            pruning = subprocess.Popen(
                [sys.executable, "-m", "proxy", "prune", f"--db={db}", "--older-than=1h"],
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        during: list[float] = []
        while _count(db) > before * 0.55 or (pruning is not None and pruning.poll() is None):
            during += await roundtrips(proxy.url, kernel_id, server.token, 50)
        seconds = time.perf_counter() - started
        proxy.stop()
        how = "periodic retention in the proxy" if in_proxy else "`prune` beside the proxy"
        detail = pruning.stderr.read().strip().splitlines()[-1] if pruning else ""
        print(
            f"(b) {how}: {before - _count(db):,} of {before:,} messages deleted in ~{seconds:.1f} s"
            f"; round trip before p50 {statistics.median(baseline):.2f} ms, max "
            f"{max(baseline):.1f} ms; during p50 {statistics.median(during):.2f} ms, max "
            f"{max(during):.1f} ms ({len(during)} round trips){'; ' + detail if detail else ''}"
        )
    finally:
        stop_jupyter_server(server)


def _count(db: Path) -> int:
    conn = connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--kernels", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as name:
        tmp = Path(name)
        kernels = [f"kernel-{i:03d}" for i in range(args.kernels)]
        for in_proxy in (False, True):
            db = tmp / f"audit-{in_proxy}.sqlite"
            started = time.perf_counter()
            fill(db, args.messages, kernels, timedelta(hours=2))
            print(f"filled {args.messages:,} messages in {time.perf_counter() - started:.1f} s")
            if not in_proxy:
                bench_transcript(db, kernels[7])
            await bench_prune(db, tmp, in_proxy)


if __name__ == "__main__":
    asyncio.run(main())
