"""kill -9 at random moments of a flood, of the proxy (the same frontend session coming back
each time) or of its iopub reader process: what the frontend received, and what the log holds.
Shared by ``tests/test_crash.py`` (a few kills in CI) and ``bench/crash.py`` (twenty)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import secrets
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.codecs import Message

from .conftest import (
    JupyterServer,
    KernelChannels,
    free_port,
    open_channels_when_up,
    serve_proxy,
)


@dataclass
class CrashReport:
    lines: int
    kills: int
    received: list[int] = field(default_factory=list)  # every line, in the order received
    duplicates_per_kill: list[int] = field(default_factory=list)
    logged: list[int] = field(default_factory=list)
    reply_status: str | None = None
    failovers: int | None = None  # (target "reader") the standby took over so many times
    idle: bool = False
    seconds: float = 0.0

    @property
    def lost_at_client(self) -> list[int]:
        return sorted(set(range(self.lines)) - set(self.received))

    @property
    def missing_from_log(self) -> list[int]:
        return sorted(set(range(self.lines)) - set(self.logged))

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    @property
    def out_of_order(self) -> bool:
        first_seen = list(dict.fromkeys(self.received))
        return first_seen != sorted(first_seen)


def _lines(client: KernelChannels, msg_id: str) -> list[int]:
    found = []
    for message in client.received:
        if message.parent_msg_id == msg_id and message.msg_type == "stream":
            found += [int(line) for line in message.content()["text"].split()]
    return found


async def flood_with_kills(
    server: JupyterServer, kernel_id: str, db: Path, lines: int, kills: int, seed: int,
    pause: float = 0.002, target: str = "proxy",
) -> CrashReport:  # fmt: skip
    """A cell printing `lines` flushed lines `pause` seconds apart; the proxy killed -9
    `kills` times at random moments and started again on the same log and port, the client
    reconnecting with its session each time. `target="reader"`: the proxy's iopub reader
    process is killed instead (at moments at least a second apart, time for its new standby
    to subscribe), the client staying connected."""
    rng = random.Random(seed)
    report = CrashReport(lines, kills)
    port, session = free_port(), secrets.token_hex(8)
    url = f"http://127.0.0.1:{port}/"
    code = (
        f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n    time.sleep({pause})"
    )
    expected = lines * (pause + 0.0002)
    if target == "reader":
        spacing = 0.9 * expected / kills
        moments = [(i + rng.uniform(0.2, 0.8)) * spacing for i in range(kills)]
    else:
        moments = sorted(rng.uniform(0.05, 0.9) * expected for _ in range(kills))
    begun = time.monotonic()
    process = serve_proxy(server, port, db)
    client = await open_channels_when_up(url, kernel_id, server.token, session)
    try:
        msg_id = await client.send(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False},
        )  # fmt: skip
        while not _lines(client, msg_id):  # the kills fall while the cell prints
            await client.recv(timeout=60)
        started = time.monotonic()
        ending = _Ending()
        for moment in moments:
            while time.monotonic() - started < moment:
                with contextlib.suppress(asyncio.TimeoutError):
                    message = await client.recv(
                        timeout=max(0.001, moment - (time.monotonic() - started))
                    )
                    ending.note(message, msg_id)
            if target == "reader":
                os.kill(await _reader_pid(client, url, server.token), signal.SIGKILL)
                continue
            report.received += _lines(client, msg_id)
            process.send_signal(signal.SIGKILL)
            process.wait()
            await client.http.close()
            await asyncio.sleep(rng.uniform(0, 0.3))  # the cell prints on meanwhile
            process = serve_proxy(server, port, db)
            client = await open_channels_when_up(url, kernel_id, server.token, session)
            await _read_for(client, msg_id, 0.5, ending, until_done=False)
            again, seen = _lines(client, msg_id), set(report.received)
            report.duplicates_per_kill.append(sum(line in seen for line in again))
            report.received += again
            client.received.clear()
        await _read_for(client, msg_id, 120, ending, until_done=True)
        report.received += _lines(client, msg_id)
        if target == "reader":
            response = await client.http.get(
                f"{url}replay-proxy/api/status", params={"token": server.token}
            )
            report.failovers = (await response.json())["spool"]["failovers"]
        if ending.reply is not None:
            report.reply_status = ending.reply.content()["status"]
        report.idle = ending.idle
        report.seconds = time.monotonic() - begun
        await client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    conn = sqlite3.connect(db)
    for (text,) in conn.execute(
        "SELECT json_extract(content, '$.text') FROM messages "
        "WHERE parent_msg_id = ? AND msg_type = 'stream' ORDER BY seq",
        (msg_id,),
    ):
        report.logged += [int(line) for line in text.split()]
    conn.close()
    return report


async def _reader_pid(client: KernelChannels, url: str, token: str) -> int:
    """The pid of the proxy's iopub reader (the primary), from its status."""
    response = await client.http.get(f"{url}replay-proxy/api/status", params={"token": token})
    return int((await response.json())["spool"]["reader_pid"])


@dataclass
class _Ending:
    """Whether the execution's reply and its idle status came (over several connections)."""

    reply: Message | None = None
    idle: bool = False

    def note(self, message: Message, msg_id: str) -> None:
        if message.parent_msg_id != msg_id:
            return
        if message.msg_type == "execute_reply":
            self.reply = message
        elif message.msg_type == "status" and message.content()["execution_state"] == "idle":
            self.idle = True


async def _read_for(
    client: KernelChannels, msg_id: str, seconds: float, ending: _Ending, until_done: bool
) -> None:
    """Read for `seconds`, or (`until_done`) until the reply and the idle status came."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not (until_done and ending.reply is not None and ending.idle):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        try:
            ending.note(await client.recv(timeout=left), msg_id)
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
            return


def summary(report: CrashReport) -> str:
    counts = collections.Counter(report.received)
    failovers = f" ({report.failovers} failovers)" if report.failovers is not None else ""
    return (
        f"{report.lines:,} lines, {report.kills} kills{failovers} in {report.seconds:.1f} s: "
        f"lost at the client {len(report.lost_at_client)}, missing from the log "
        f"{len(report.missing_from_log)}, duplicates {report.duplicates} "
        f"(per kill {report.duplicates_per_kill}, most of one line "
        f"{max(counts.values(), default=0)}), reply {report.reply_status}, "
        f"{'idle' if report.idle else 'no idle status'}"
    )
