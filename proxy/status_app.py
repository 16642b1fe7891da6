"""``jupyter-replay-proxy status``: a running proxy's health, for a person.

It asks the proxy's status endpoint (the same figures as ``/replay-proxy/api/status`` and the
metrics). Without ``--url`` it finds the proxies running on this machine from the files they
keep in the Jupyter runtime dir.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Unicode

from .app import CommandError, StrictApp

_B = ("B", "KB", "MB", "GB", "TB")


def _bytes(count: int) -> str:
    size, unit = float(count), 0
    while size >= 1024 and unit < len(_B) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} {_B[unit]}" if unit else f"{count} B"


def running_proxies() -> list[dict[str, Any]]:
    """The proxies of this user running on this machine, newest first."""
    found = []
    for path in Path(jupyter_runtime_dir()).glob("replay-proxy-*.json"):
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or its process is gone (killed)
        found.append((path.stat().st_mtime, info))
    return [info for _, info in sorted(found, key=lambda entry: -entry[0])]


def describe(status: dict[str, Any]) -> list[str]:
    """The status endpoint's answer as lines for a person."""
    lines = [f"jupyter-replay-proxy {status.get('version', '?')}"]
    upstream = status.get("upstream")
    if upstream:
        state = f"not answering: {upstream['error']}" if upstream.get("error") else "ok"
        lines.append(f"upstream  {upstream['url']} ({state})")
    log = status.get("log")
    if log:
        state = "ok" if log["ok"] else f"FAILING: {log['error']}"
        lines.append(
            f"log       {state}; {log['written']:,} messages written, {log['pending']:,} "
            f"waiting, {log['set_aside']:,} set aside, {log['dropped']:,} dropped"
        )
        if log.get("last_set_aside"):
            lines.append(f"          last set aside: {log['last_set_aside']}")
    outputs = status.get("outputs")
    if outputs:
        if not outputs["enabled"]:
            lines.append("outputs   not written into notebooks (write_outputs is off)")
        elif outputs.get("collaboration_error"):
            lines.append(f"outputs   not written into notebooks: {outputs['collaboration_error']}")
        else:
            lines.append(f"outputs   written into notebooks; {len(outputs['rooms'])} open")
    kernels, clients = status.get("kernels", []), status.get("clients", [])
    lines.append(f"kernels   {len(kernels)}")
    for kernel in kernels:
        waiting, dropped = kernel.get("spool_peak", 0), kernel.get("spool_dropped", 0)
        lines.append(
            f"  {kernel['id']}  {kernel['link']} link, {kernel['clients']} clients"
            + (f", at most {_bytes(waiting)} of output waited on disk" if waiting else "")
            + (", output waits in memory: disk full" if kernel.get("spool_in_memory") else "")
            + (f", {dropped:,} messages dropped (disk full)" if dropped else "")
        )
    lines.append(f"clients   {len(clients)}")
    for client in clients:
        lag = client["sent_seq"] - client["confirmed_seq"]
        lines.append(
            f"  {client['kernel'][:8]}  {client.get('user') or '(unknown)'}  "
            f"{'catching up from the log' if client['behind'] else 'live'}, "
            f"{lag:,} unacknowledged"
        )
    return lines


class StatusApp(StrictApp):
    name = "jupyter-replay-proxy-status"
    description = "The health of a running proxy: its upstream, log, kernels and clients."
    aliases = {"url": "StatusApp.url", "token": "StatusApp.token"}

    url = Unicode(
        "", config=True, help="The proxy's URL (default: the newest proxy on this machine)."
    )
    token = Unicode(
        "", config=True, help="A token jupyter-server accepts (default: $JUPYTER_TOKEN)."
    )

    def start(self) -> None:
        url, token = self.url, self.token or os.environ.get("JUPYTER_TOKEN", "")
        if not url:
            found = running_proxies()
            if not found:
                raise CommandError("no proxy of yours runs on this machine; give its --url", 1)
            url, token = found[0]["url"], token or found[0]["token"]
        print("\n".join(describe(self._status(url, token))))

    def _status(self, url: str, token: str) -> dict[str, Any]:
        async def ask() -> tuple[int, Any]:
            headers = {"Authorization": f"token {token}"} if token else {}
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
                endpoint = url.rstrip("/") + "/replay-proxy/api/status"
                async with http.get(endpoint) as resp:
                    return resp.status, await resp.json(content_type=None)

        try:
            status, body = asyncio.run(ask())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            raise CommandError(f"no proxy answers at {url}: {error or 'timed out'}", 1) from None
        if status != 200:
            raise CommandError(
                f"the proxy at {url} answered {status}: give a token jupyter-server accepts "
                "(--token or $JUPYTER_TOKEN)",
                1,
            )
        return body
