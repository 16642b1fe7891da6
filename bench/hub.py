"""Under a real JupyterHub: the sidecar (`jupyter-replay-proxy singleuser`) vs the stock
`jupyterhub-singleuser`, both reached through the hub's configurable-http-proxy, alternating.

    python -m bench.hub [--lines 20000] [--roundtrips 1000] [--rounds 3]

(a) sequential execute round trips of `pass`: latency p50/p99 and what the sidecar adds;
(b) a cell printing N flushed lines: time until its reply and every line arrived (the stock
    server's rate limit off, so that both carry every line), and lines delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench.relay import flood, roundtrips
from tests.hub import start_hub, stop_hub


async def start_kernel(url: str, token: str) -> str:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http,
        http.post(url + "api/kernels", json={}) as resp,
    ):
        resp.raise_for_status()
        return (await resp.json())["id"]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--roundtrips", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-bench-hub-") as tmp:
        hub = start_hub(
            Path(tmp), stock_args=("--ZMQChannelsWebsocketConnection.limit_rate=False",)
        )
        try:
            users = {"stock": "stock", "sidecar": "sidecar"}
            await asyncio.gather(*(hub.start_server(user) for user in users.values()))
            targets = {}
            for name, user in users.items():
                token = await hub.token(user)
                url = hub.server_url(user)
                targets[name] = (url, await start_kernel(url, token), token)
            for url, kernel_id, token in targets.values():  # warm up both
                await roundtrips(url, kernel_id, token, 50, token_in_header=True)
                await flood(url, kernel_id, token, 1000, token_in_header=True)

            latencies: dict[str, list[float]] = {name: [] for name in targets}
            block = max(args.roundtrips // 10, 1)
            for _ in range(args.roundtrips // block):
                for name, target in targets.items():
                    latencies[name] += await roundtrips(*target, block, token_in_header=True)
            p50 = {k: statistics.median(v) for k, v in latencies.items()}
            p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in latencies.items()}
            print(f"(a) {args.roundtrips:,} sequential `pass` round trips each, via the hub:")
            print(f"    p50 stock {p50['stock']:.2f} ms   sidecar {p50['sidecar']:.2f} ms   "
                  f"added {p50['sidecar'] - p50['stock']:+.2f} ms")  # fmt: skip
            print(f"    p99 stock {p99['stock']:.2f} ms   sidecar {p99['sidecar']:.2f} ms")

            times: dict[str, list[float]] = {name: [] for name in targets}
            lost = dict.fromkeys(targets, 0)
            for _ in range(args.rounds):
                for name, target in targets.items():
                    seconds, received = await flood(*target, args.lines, token_in_header=True)
                    times[name].append(seconds)
                    lost[name] = max(lost[name], args.lines - received)
            stock, sidecar = statistics.median(times["stock"]), statistics.median(times["sidecar"])
            print(f"(b) {args.lines:,} flushed lines, median of {args.rounds}, via the hub:")
            print(f"    stock {stock:.2f} s ({args.lines / stock:,.0f} lines/s)   sidecar "
                  f"{sidecar:.2f} s ({args.lines / sidecar:,.0f} lines/s)   ratio "
                  f"{sidecar / stock:.3f}")  # fmt: skip
            print(f"    most lines lost in a run: stock {lost['stock']:,}   "
                  f"sidecar {lost['sidecar']:,}")  # fmt: skip
        finally:
            stop_hub(hub)


if __name__ == "__main__":
    asyncio.run(main())
