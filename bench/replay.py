"""Replay benchmarks.

    python -m bench.replay [--replayed 100000] [--lines 100000] [--flood-mb 1024]

(a) a client reconnecting with a known session receives 100,000 logged messages it missed:
    time until the last one arrived, for stream output (coalesced, as a client that is behind
    gets it) and for messages that cannot be coalesced;
(b) a cell printing N flushed lines watched by a browser-speed client (1 ms per frame): lines
    delivered and time to the last line, against the kernel's own time to print them; direct
    to stock jupyter-server and through the proxy, alternating;
(c) proxy RSS while a stalled client (never reads) watches a flood of output, and a second
    client reads it all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from proxy.codecs import KERNEL_CHANNELS, message_from_parts
from proxy.database import connect, open_database
from proxy.relay import FROM_KERNEL, Client
from proxy.taps.log import LogWriter
from tests.conftest import (
    JupyterServer,
    open_channels,
    start_jupyter_server,
    start_kernel,
    stop_jupyter_server,
)

from .relay import ProxyProcess, rss_mb


def fill_log(db: Path, kernel_id: str, session: str, count: int, coalescable: bool) -> None:
    """`count` iopub messages for the kernel, and a position for `session` before them all."""
    open_database(db).close()
    writer = LogWriter(lambda: connect(db))
    client = Client(secrets.token_hex(8), kernel_id, session, "v1.kernel.websocket.jupyter.org")
    writer.client_joined(client)
    writer.delivery_confirmed(client, writer.last_seq)
    for i in range(count):
        parent = "one-cell" if coalescable else f"cell-{i}"
        header = {"msg_id": f"m{i}", "msg_type": "stream", "session": "k", "username": "u",
                  "date": "2026-11-24T10:00:00.000000Z", "version": "5.4"}  # fmt: skip
        parts = [
            json.dumps(header).encode(),
            json.dumps({"msg_id": parent, "msg_type": "execute_request"}).encode(),
            b"{}",
            json.dumps({"name": "stdout", "text": f"line {i}\n"}).encode(),
        ]
        message = message_from_parts(
            "iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False
        )
        writer.message_relayed(
            writer.next_seq(), kernel_id, FROM_KERNEL, message, None, time.time()
        )
    writer.close(600)


async def bench_reconnect(server: JupyterServer, tmp: Path, count: int) -> None:
    kernel_id = await start_kernel(server)
    for coalescable in (True, False):
        db = tmp / f"replay-{coalescable}.sqlite"
        session = secrets.token_hex(8)
        fill_log(db, kernel_id, session, count, coalescable)
        proxy = ProxyProcess(server, tmp, db)
        try:
            await proxy.ready(server.token)
            started = time.perf_counter()
            client = await open_channels(proxy.url, kernel_id, server.token, session_id=session)
            lines = frames = 0
            while lines < count:
                message = await client.recv(timeout=60)
                client.received.clear()
                frames += 1
                if message.msg_type == "stream":
                    lines += message.content()["text"].count("\n")
            elapsed = time.perf_counter() - started
            await client.close()
        finally:
            proxy.stop()
        kind = "stream lines (coalesced)" if coalescable else "messages of distinct cells"
        print(f"(a) reconnect, {count:,} missed {kind}: {elapsed:.2f} s in {frames:,} frames")


async def watch(base: str, kernel_id: str, token: str, lines: int) -> tuple[float, float, int]:
    """Kernel's own print time, time to the last line at a 1 ms/frame client, lines seen."""
    client = await open_channels(base, kernel_id, token)
    code = (
        "import time\nt0 = time.perf_counter()\n"
        f"for i in range({lines}):\n    print(i, flush=True)\n"
        "print('kernel took', time.perf_counter() - t0, flush=True)"
    )
    try:
        started = time.perf_counter()
        msg_id = await client.send(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": False, "user_expressions": {},
             "allow_stdin": False},
        )  # fmt: skip
        texts: list[str] = []
        last = started
        reply = idle = False
        while not (reply and idle):
            try:
                message = await client.recv(timeout=5 if reply else 300)
            except asyncio.TimeoutError:
                break  # stock jupyter-server may drop even the idle status
            client.received.clear()
            await asyncio.sleep(0.001)  # a browser rendering each frame
            if message.parent_msg_id != msg_id:
                continue
            if message.msg_type == "stream":
                texts.append(message.content()["text"])
                last = time.perf_counter()
            reply = reply or message.msg_type == "execute_reply"
            idle = idle or (
                message.msg_type == "status" and message.content()["execution_state"] == "idle"
            )
        printed, _, took = "".join(texts).partition("kernel took")  # (a write may split it)
        return float(took.split()[0]) if took else 0.0, last - started, printed.count("\n")
    finally:
        await client.close()


async def bench_browser(server: JupyterServer, tmp: Path, lines: int, rounds: int) -> None:
    proxy = ProxyProcess(server, tmp, tmp / "browser.sqlite")
    try:
        await proxy.ready(server.token)
        kernel_id = await start_kernel(server)
        results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "proxied": []}
        for _ in range(rounds):
            for name, base in (("direct", server.url), ("proxied", proxy.url)):
                results[name].append(await watch(base, kernel_id, server.token, lines))
        print(f"(b) {lines:,} flushed lines, a 1 ms/frame client, median of {rounds}:")
        kernel = statistics.median(r[0] for r in results["proxied"])
        print(f"    the kernel printed them in {kernel:.2f} s")
        for name, runs in results.items():
            last = statistics.median(r[1] for r in runs)
            seen = min(r[2] for r in runs)
            print(f"    {name:8} lines {seen:,}/{lines:,}, the last at {last:.2f} s "
                  f"= {last / kernel:.2f}x the kernel's time")  # fmt: skip
    finally:
        proxy.stop()


async def bench_stalled(server: JupyterServer, tmp: Path, megabytes: int) -> None:
    proxy = ProxyProcess(server, tmp, tmp / "stalled.sqlite")
    try:
        await proxy.ready(server.token)
        kernel_id = await start_kernel(server)
        stalled = await open_channels(proxy.url, kernel_id, server.token)  # never reads
        reader = await open_channels(proxy.url, kernel_id, server.token)
        chunk = "x" * 1023
        code = f"for i in range({megabytes * 1024}):\n    print({chunk!r}, flush=True)"
        peak: list[float] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                peak.append(rss_mb(proxy.process.pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.ensure_future(sample())
        started = time.perf_counter()
        await reader.execute(code, timeout=3600)
        elapsed = time.perf_counter() - started
        done.set()
        await sampler
        await stalled.close()
        await reader.close()
        print(f"(c) {megabytes:,} MB flood in {elapsed:.0f} s with a stalled client: "
              f"proxy RSS peak {max(peak):.0f} MB")  # fmt: skip
    finally:
        proxy.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replayed", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood-mb", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-bench-") as tmp:
        server = start_jupyter_server(Path(tmp) / "server")
        try:
            await bench_reconnect(server, Path(tmp), args.replayed)
            await bench_browser(server, Path(tmp), args.lines, args.rounds)
            await bench_stalled(server, Path(tmp), args.flood_mb)
        finally:
            stop_jupyter_server(server)


if __name__ == "__main__":
    asyncio.run(main())
