"""Fuzz both wire protocols of the proxy's kernel channels, beside well-behaved frontends.

    python -m bench.fuzz [--frames 100000] [--kernels 3] [--fuzzers 4] [--seed 1]

A `serve` process in front of a stock jupyter-server; on each kernel a frontend runs a cell
after another and checks every reply, while fuzzers send generated frames (``tests/frames.py``:
well-formed requests, wrong types, deep nesting, NaN, bad UTF-8, bad offsets, mutations, random
bytes) over both protocols. Prints frames/s, close codes by kind, verdicts that broke the
rules, the frontends' failures and latency, whether every one of their messages is in the log,
whether every kernel still answers, the proxy's RSS before and after, and the tracebacks and
errors in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from tests.adversary import GoodClient, Tally, draw_frames, fuzz
from tests.conftest import open_channels, start_jupyter_server, start_kernel, stop_jupyter_server

from .relay import ProxyProcess, rss_mb


async def run(args: argparse.Namespace, tmp: Path) -> None:
    server = start_jupyter_server(tmp / "server")
    db = tmp / "fuzz.sqlite"
    proxy = ProxyProcess(server, tmp, db)
    try:
        await proxy.ready(server.token)
        kernels = [await start_kernel(server) for _ in range(args.kernels)]
        print(f"drawing {args.frames:,} frames (seed {args.seed})...", flush=True)
        started = time.perf_counter()
        frames = draw_frames(args.frames, args.seed)
        print(f"    {len(frames):,} frames in {time.perf_counter() - started:.1f} s", flush=True)

        # warm up: each kernel answers through the proxy, and a first round of fuzzing
        for kernel_id in kernels:
            client = await open_channels(proxy.url, kernel_id, server.token)
            await client.execute("pass")
            await client.close()
        warmup = Tally()
        await fuzz(proxy.url, kernels, server.token, draw_frames(500, args.seed + 1), warmup)
        rss_before = rss_mb(proxy.process.pid, children=False)
        readers_before = rss_mb(proxy.process.pid) - rss_before

        stop = asyncio.Event()
        good = [GoodClient() for _ in kernels]
        runs = [
            asyncio.ensure_future(client.run(proxy.url, kernel_id, server.token, stop))
            for client, kernel_id in zip(good, kernels, strict=True)
        ]
        tally = Tally()
        shares = [frames[i :: args.fuzzers] for i in range(args.fuzzers)]
        started = time.perf_counter()
        await asyncio.gather(*(fuzz(proxy.url, kernels, server.token, s, tally) for s in shares))
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*runs)
        rss_after = rss_mb(proxy.process.pid, children=False)
        readers_after = rss_mb(proxy.process.pid) - rss_after

        answered = 0
        for kernel_id in kernels:
            client = await open_channels(proxy.url, kernel_id, server.token)
            try:
                _, reply, _ = await client.execute("print('still here')", timeout=60)
                answered += reply.content()["status"] == "ok"
            except (asyncio.TimeoutError, ConnectionError) as error:
                print(f"    kernel {kernel_id} does not answer: {error!r}")
            finally:
                await client.close()
    finally:
        proxy.stop()
        stop_jupyter_server(server)

    conn = sqlite3.connect(db)
    logged = {row[0] for row in conn.execute("SELECT msg_id FROM messages")}
    conn.close()
    good_ids = [msg_id for client in good for msg_id in client.message_ids]
    missing_good = sum(msg_id not in logged for msg_id in good_ids)
    missing_valid = sum(msg_id not in logged for msg_id in tally.valid_ids)
    proxy_log = (tmp / "proxy.log").read_text(errors="replace")
    tracebacks = proxy_log.count("Traceback (most recent call last)")
    errors = [line for line in proxy_log.splitlines() if line.startswith(("[E", "[C"))]

    print(f"{tally.sent:,} frames in {elapsed:.1f} s = {tally.sent / elapsed:,.0f} frames/s "
          f"over {args.kernels} kernels, {args.fuzzers} fuzzers")  # fmt: skip
    print("closes by kind and code:")
    for (kind, code), count in sorted(tally.closes.items(), key=lambda item: -item[1]):
        print(f"    {count:7,}  {code}  {kind}")
    print("taken (relayed) by kind:")
    for kind, count in tally.relayed.most_common():
        print(f"    {count:7,}  {kind}")
    print(f"verdicts breaking the rules: {len(tally.wrong)}")
    for wrong in tally.wrong[:10]:
        print(f"    {wrong[:300]}")
    latencies = [latency for client in good for latency in client.latencies]
    failures = [failure for client in good for failure in client.failures]
    print(f"well-behaved frontends: {sum(c.executions for c in good):,} executions, "
          f"{len(failures)} failed")  # fmt: skip
    for failure in failures[:10]:
        print(f"    {failure[:300]}")
    if latencies:
        p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
        print(f"    latency p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
              f"max {max(latencies):.1f} ms")  # fmt: skip
    print(f"    their messages missing from the log: {missing_good} of {len(good_ids):,}")
    print(f"valid fuzz frames missing from the log: {missing_valid} of {len(tally.valid_ids):,}")
    print(f"kernels answering an execute afterwards: {answered} of {len(kernels)}")
    print(f"proxy RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after "
          f"({rss_after - rss_before:+.0f} MB); its iopub readers (the standby keeps 30 s of "
          f"each kernel's output): {readers_before:.0f} -> {readers_after:.0f} MB")  # fmt: skip
    print(f"proxy log: {tracebacks} tracebacks, {len(errors)} error lines")
    for line in errors[:10]:
        print(f"    {line[:300]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--kernels", type=int, default=3)
    parser.add_argument("--fuzzers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-fuzz-") as tmp:
        await run(args, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
