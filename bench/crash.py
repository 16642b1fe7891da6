"""kill -9 of the proxy at random moments of a flood, the same session coming back each time.

    python -m bench.crash [--lines 10000] [--kills 20] [--pause 0.002] [--runs 1] [--seed 1]
                          [--target proxy|reader]

A `serve` process in front of a stock jupyter-server; a cell prints flushed lines `pause`
seconds apart while the proxy is killed -9 and started again on the same log and port; the
frontend reconnects with its session_id each time. Prints, per run: lines lost at the client,
lines missing from the log, lines the client got twice (per kill: at most one acknowledgement
round trip's worth is the target), and whether the reply and the idle status came. With
`--target reader` the proxy's iopub reader process is killed instead (its standby takes over;
the client stays connected).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from tests.conftest import start_jupyter_server, start_kernel, stop_jupyter_server
from tests.crashes import flood_with_kills, summary


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", choices=("proxy", "reader"), default="proxy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-proxy-crash-") as tmp:
        server = start_jupyter_server(Path(tmp) / "server")
        try:
            for run in range(args.runs):
                kernel_id = await start_kernel(server)
                report = await flood_with_kills(
                    server, kernel_id, Path(tmp) / f"run-{run}.sqlite", args.lines, args.kills,
                    seed=args.seed + run, pause=args.pause, target=args.target,
                )  # fmt: skip
                print(f"run {run + 1}: {summary(report)}", flush=True)
                if report.lost_at_client or report.missing_from_log:
                    print(f"    lost at the client: {report.lost_at_client[:20]}")
                    print(f"    missing from the log: {report.missing_from_log[:20]}")
                logged_twice = len(report.logged) - len(set(report.logged))
                print(f"    lines in the log twice: {logged_twice}; out of order at the "
                      f"client: {report.out_of_order}")  # fmt: skip
        finally:
            stop_jupyter_server(server)


if __name__ == "__main__":
    asyncio.run(main())
