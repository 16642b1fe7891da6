"""Relay benchmarks: the same workload direct to jupyter-server and through the proxy, alternating.

    python -m bench.relay [--lines 50000] [--roundtrips 2000] [--rounds 3]

(a) a cell printing N flushed lines: time until its execute_reply and every line arrived, with
    jupyter-server's rate limit off so both paths carry every message; then with the default
    config, how many lines each path delivers. Proxy RSS sampled throughout.
(b) sequential execute round trips of `pass`: latency p50/p99 and what the proxy adds.
(c) the log writer alone: messages per second committed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.codecs import KERNEL_CHANNELS, message_from_parts
from proxy.database import connect, open_database
from proxy.relay import FROM_KERNEL
from proxy.taps.log import LogWriter
from tests.conftest import (
    JupyterServer,
    free_port,
    open_channels,
    start_jupyter_server,
    start_kernel,
    stop_jupyter_server,
)


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of a process and (`children`) its children (the proxy's iopub
    readers), in MB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if children else []
    except OSError:  # it just exited
        return 0.0
    rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
    return sum(rss) / 1024 + sum(rss_mb(int(child)) for child in kids)


class ProxyProcess:
    """`jupyter-replay-proxy serve` in front of a server, as a user would run it."""

    def __init__(
        self, server: JupyterServer, tmp: Path, db: Path | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "JUPYTER_TOKEN": server.token}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "proxy", "serve", f"--upstream={server.url}",
                f"--port={self.port}", f"--db={db or tmp / 'bench.sqlite'}",
                f"--ProxyApp.kernel_runtime_dir={server.runtime_dir}", "--log-level=INFO",
                *extra,
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=(tmp / "proxy.log").open("a"),
        )  # fmt: skip

    async def ready(self, token: str) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
            for _ in range(200):
                try:
                    async with http.get(self.url + "replay-proxy/api/status") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("proxy did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def flood(
    base: str, kernel_id: str, token: str, lines: int, token_in_header: bool = False
) -> tuple[float, int]:
    """Seconds until execute_reply and the last line, and the number of lines received.

    The idle status can be lost too (the kernel's PUB drops for a slow subscriber), so after the
    reply, three seconds without a message also end the wait; the time is that of the last
    message received.
    """
    client = await open_channels(base, kernel_id, token, token_in_header=token_in_header)
    try:
        code = f"for i in range({lines}):\n    print(i, flush=True)"
        started = time.perf_counter()
        msg_id = await client.send(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": False, "user_expressions": {},
             "allow_stdin": False},
        )  # fmt: skip
        received, reply, idle, last = 0, False, False, started
        while not (reply and idle):
            try:
                message = await client.recv(timeout=3 if reply else 300)
            except asyncio.TimeoutError:
                if reply:
                    break
                raise RuntimeError(f"{base}: no execute_reply; {received} lines") from None
            client.received.clear()
            if message.parent_msg_id != msg_id:
                continue
            last = time.perf_counter()
            if message.msg_type == "stream":
                received += message.content()["text"].count("\n")
            elif message.msg_type == "execute_reply":
                reply = True
            elif message.msg_type == "status":
                idle = message.content()["execution_state"] == "idle"
        return last - started, received
    finally:
        await client.close()


async def roundtrips(
    base: str, kernel_id: str, token: str, count: int, token_in_header: bool = False
) -> list[float]:
    client = await open_channels(base, kernel_id, token, token_in_header=token_in_header)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            msg_id = await client.send(
                "shell", "execute_request",
                {"code": "pass", "silent": False, "store_history": False,
                 "user_expressions": {}, "allow_stdin": False},
            )  # fmt: skip
            while True:
                message = await client.recv()
                if message.msg_type == "execute_reply" and message.parent_msg_id == msg_id:
                    break
            latencies.append((time.perf_counter() - started) * 1000)
            client.received.clear()
    finally:
        await client.close()
    return latencies


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak.append(rss_mb(pid))
        await asyncio.sleep(0.1)


async def bench_flood(args: argparse.Namespace, tmp: Path) -> None:
    server = start_jupyter_server(
        tmp / "unlimited", "--ZMQChannelsWebsocketConnection.limit_rate=False"
    )
    proxy = ProxyProcess(server, tmp)
    try:
        await proxy.ready(server.token)
        kernel_id = await start_kernel(server)
        await flood(server.url, kernel_id, server.token, 1000)  # warm up both paths
        await flood(proxy.url, kernel_id, server.token, 1000)
        times: dict[str, list[float]] = {"direct": [], "proxied": []}
        lost = {"direct": 0, "proxied": 0}
        rss: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(proxy.process.pid, rss, stop))
        for _ in range(args.rounds):
            for name, base in (("direct", server.url), ("proxied", proxy.url)):
                seconds, received = await flood(base, kernel_id, server.token, args.lines)
                times[name].append(seconds)
                lost[name] = max(lost[name], args.lines - received)
        stop.set()
        await sampler
        direct, proxied = statistics.median(times["direct"]), statistics.median(times["proxied"])
        print(f"(a) {args.lines:,} flushed lines, rate limit off, median of {args.rounds}:")
        print(f"    direct {direct:.2f} s   proxied {proxied:.2f} s   ratio {proxied / direct:.3f}")
        print(
            f"    most lines lost in a run: direct {lost['direct']:,}   proxied {lost['proxied']:,}"
        )
        print(f"    proxy RSS: peak {max(rss):.0f} MB")
    finally:
        proxy.stop()
        stop_jupyter_server(server)

    server = start_jupyter_server(tmp / "stock")
    proxy = ProxyProcess(server, tmp)
    try:
        await proxy.ready(server.token)
        kernel_id = await start_kernel(server)
        counts = {}
        for name, base in (("direct", server.url), ("proxied", proxy.url)):
            _, counts[name] = await flood(base, kernel_id, server.token, args.lines)
        print(f"(a) {args.lines:,} flushed lines, stock rate limit: lines delivered")
        print(f"    direct {counts['direct']:,}   proxied {counts['proxied']:,}")

        results: dict[str, list[float]] = {"direct": [], "proxied": []}
        block = max(args.roundtrips // 10, 1)
        await roundtrips(proxy.url, kernel_id, server.token, 50)  # warm up
        for _ in range(args.roundtrips // block):
            for name, base in (("direct", server.url), ("proxied", proxy.url)):
                results[name] += await roundtrips(base, kernel_id, server.token, block)
        p50 = {k: statistics.median(v) for k, v in results.items()}
        p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in results.items()}
        print(f"(b) {args.roundtrips:,} sequential `pass` round trips each:")
        print(f"    p50 direct {p50['direct']:.2f} ms   proxied {p50['proxied']:.2f} ms   "
              f"added {p50['proxied'] - p50['direct']:+.2f} ms")  # fmt: skip
        print(f"    p99 direct {p99['direct']:.2f} ms   proxied {p99['proxied']:.2f} ms")
    finally:
        proxy.stop()
        stop_jupyter_server(server)


def bench_writer(tmp: Path, count: int = 200_000) -> None:
    path = tmp / "writer.sqlite"
    open_database(path).close()
    writer = LogWriter(lambda: connect(path))
    header = {"msg_id": "", "msg_type": "stream", "session": "s" * 32, "username": "user",
              "date": "2026-11-24T09:00:00.000000Z", "version": "5.4"}  # fmt: skip
    messages = []
    for i in range(count):
        header["msg_id"] = f"{i:032x}"
        parts = [json.dumps(header).encode(), b'{"msg_id": "p"}', b"{}",
                 json.dumps({"name": "stdout", "text": f"{i}\n"}).encode()]  # fmt: skip
        messages.append(
            message_from_parts(
                "iopub", parts, allowed_channels=KERNEL_CHANNELS, validate_body=False
            )
        )
    started = time.perf_counter()
    for message in messages:
        writer.message_relayed(writer.next_seq(), "kernel", FROM_KERNEL, message, None, time.time())
    writer.flush(600)
    elapsed = time.perf_counter() - started
    writer.close()
    rate = count / elapsed
    print(f"(c) log writer alone: {count:,} messages in {elapsed:.2f} s = {rate:,.0f} msg/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--roundtrips", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-bench-") as tmp:
        await bench_flood(args, Path(tmp))
        bench_writer(Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
