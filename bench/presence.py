"""What a flood costs jupyter-server itself: its own CPU time while a cell prints N flushed lines,
measured from its process, for three ways of watching the kernel, alternating, in one run.

    python -m bench.presence [--lines 20000] [--rounds 3]

(a) nobody on a websocket, no proxy: a zmq client of the kernel's own (jupyter-server still
    follows the kernel's iopub itself, for its activity and execution_state): its floor;
(b) a client on jupyter-server's channels websocket, direct, no proxy (its rate limit off);
(c) a client through the proxy (`serve`, zmq link, started for this run): jupyter-server relays
    every iopub message to the proxy's presence websocket, which keeps the kernel counted as
    connected.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient

from bench.relay import ProxyProcess, flood
from tests.conftest import start_jupyter_server, start_kernel, stop_jupyter_server


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def zmq_flood(client: AsyncKernelClient, lines: int) -> None:
    """The flood with no websocket at all: until its reply, then a moment for the server."""
    msg_id = client.execute(f"for i in range({lines}):\n    print(i, flush=True)")
    while True:
        reply = await client.get_shell_msg(timeout=300)
        if reply["parent_header"].get("msg_id") == msg_id:
            break


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-bench-") as tmp:
        server = start_jupyter_server(
            Path(tmp), "--ZMQChannelsWebsocketConnection.limit_rate=False"
        )
        client = AsyncKernelClient()
        try:
            kernel_id = await start_kernel(server)
            client.load_connection_file(server.runtime_dir / f"kernel-{kernel_id}.json")
            client.start_channels()
            await client.wait_for_ready(timeout=60)

            async def measured(run: Awaitable[object]) -> tuple[float, float]:
                """CPU seconds jupyter-server spent, and the flood's wall time."""
                await asyncio.sleep(2)  # what the last one left to do, done
                before, started = cpu_seconds(server.process.pid), time.perf_counter()
                await run
                await asyncio.sleep(1)  # the server's own share of the tail
                return cpu_seconds(server.process.pid) - before, time.perf_counter() - started

            cores: dict[str, list[tuple[float, float]]] = {
                "no websocket": [], "direct websocket": [], "through the proxy": []
            }  # fmt: skip
            for _ in range(args.rounds):
                cores["no websocket"].append(await measured(zmq_flood(client, args.lines)))
                cores["direct websocket"].append(
                    await measured(flood(server.url, kernel_id, server.token, args.lines))
                )
                proxy = ProxyProcess(server, Path(tmp))
                try:
                    await proxy.ready(server.token)
                    cores["through the proxy"].append(
                        await measured(flood(proxy.url, kernel_id, server.token, args.lines))
                    )
                finally:
                    proxy.stop()
            print(f"jupyter-server's own CPU while {args.lines:,} flushed lines go out, "
                  f"median of {args.rounds}:")  # fmt: skip
            for way, runs in cores.items():
                spent = statistics.median(cpu for cpu, _ in runs)
                core = statistics.median(cpu / wall for cpu, wall in runs)
                print(f"    {way:<18} {spent:.2f} s of CPU, {core:.2f} of a core")
        finally:
            client.stop_channels()
            stop_jupyter_server(server)


if __name__ == "__main__":
    asyncio.run(main())
