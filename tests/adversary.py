"""The adversarial suite's actors: a fuzzer sending generated frames on kernels' channels, and
a well-behaved frontend that must not notice it. Shared by ``tests/test_fuzz.py`` (a few
thousand frames in CI) and ``bench/fuzz.py`` (long runs)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as with_seed

from proxy.codecs import LEGACY, V1_SUBPROTOCOL

from .conftest import KernelChannels, open_channels, stream_text
from .frames import EITHER, INVALID, VALID, Frame, frames


def draw_frames(count: int, seed: int) -> list[Frame]:
    """`count` frames from the generator, reproducibly for a seed."""
    drawn: list[Frame] = []

    @with_seed(seed)
    @settings(
        max_examples=count, database=None, phases=[Phase.generate], deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(frames())
    def collect(frame: Frame) -> None:
        drawn.append(frame)

    collect()
    return drawn


@dataclass
class Tally:
    """What the proxy did with the frames, and what it should not have done."""

    sent: int = 0
    closes: collections.Counter[tuple[str, int | None]] = field(default_factory=collections.Counter)
    relayed: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong: list[str] = field(default_factory=list)  # verdicts that break the rules
    valid_ids: list[str] = field(default_factory=list)  # msg_ids that must be in the log


class _Connection:
    """One fuzzing websocket; reads everything, and tells whether a frame closed it."""

    def __init__(self, channels: KernelChannels) -> None:
        self.channels = channels
        self.ws = channels.ws
        self.pongs: dict[bytes, asyncio.Future[None]] = {}
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        reason = ""
        try:
            while True:
                frame = await self.ws.receive()
                if frame.type == aiohttp.WSMsgType.PING:
                    await self.ws.pong(frame.data)
                elif frame.type == aiohttp.WSMsgType.PONG:
                    waiter = self.pongs.pop(frame.data, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif frame.type in (
                    aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):  # fmt: skip
                    reason = frame.extra if isinstance(frame.extra, str) else ""
                    break
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, reason))

    async def send(self, frame: Frame) -> tuple[int | None, str] | None:
        """Send the frame and a ping behind it: None if the pong came (the frame was taken),
        else the close code and reason."""
        token = secrets.token_bytes(12)
        waiter = self.pongs[token] = asyncio.get_running_loop().create_future()
        try:
            if isinstance(frame.data, str):
                await self.ws.send_str(frame.data)
            else:
                await self.ws.send_bytes(frame.data)
            await self.ws.ping(token)
        except (ConnectionError, RuntimeError):
            pass
        done, _ = await asyncio.wait(
            [waiter, self.closed], timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter in done:
            return None
        if self.closed in done:
            return self.closed.result()
        raise TimeoutError(f"no pong and no close within 30 s after {frame}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channels.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def fuzz(
    url: str, kernels: list[str], token: str, frames: Iterable[Frame], tally: Tally
) -> None:
    """Send frames on the kernels' channels, one connection per protocol at a time, and
    check each verdict: a valid frame is taken, an invalid one closes the connection with
    1007 (1009: too big) and a reason."""
    connections: dict[str, _Connection] = {}
    rng = random.Random(len(kernels))
    try:
        for frame in frames:
            connection = connections.get(frame.protocol)
            if connection is None or connection.closed.done():
                channels = await open_channels(
                    url, rng.choice(kernels), token,
                    protocol=V1_SUBPROTOCOL if frame.protocol == V1_SUBPROTOCOL else None,
                    autoping=False,  # its reader answers pings and sees pongs
                )  # fmt: skip
                connection = connections[frame.protocol] = _Connection(channels)
            tally.sent += 1
            closed = await connection.send(frame)
            if closed is None:
                tally.relayed[frame.kind] += 1
                if frame.expect == INVALID:
                    tally.wrong.append(f"{frame.kind}: taken: {frame.data[:200]!r}")
                elif frame.msg_id is not None:
                    tally.valid_ids.append(frame.msg_id)
                continue
            code, reason = closed
            tally.closes[(frame.kind, code)] += 1
            if frame.expect == VALID:
                tally.wrong.append(f"{frame.kind}: closed {code} {reason}: {frame.data[:200]!r}")
            elif code not in (1007, 1009) or not reason:
                tally.wrong.append(f"{frame.kind}: closed {code} {reason!r}: {frame.data[:200]!r}")
            await connection.close()
    finally:
        for connection in connections.values():
            await connection.close()


@dataclass
class GoodClient:
    """A well-behaved frontend: runs a cell after another and checks every reply and output."""

    executions: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)  # sent and received: all logged

    async def run(self, url: str, kernel_id: str, token: str, stop: asyncio.Event) -> None:
        client = await open_channels(url, kernel_id, token)
        try:
            await client.kernel_info()
            for n in itertools.count():
                if stop.is_set():
                    break
                started = time.perf_counter()
                try:
                    msg_id, reply, iopub = await client.execute(f"print({n} * 2)", timeout=60)
                except (asyncio.TimeoutError, TimeoutError, ConnectionError) as error:
                    self.failures.append(f"{kernel_id}: execution {n}: {error!r}")
                    break
                self.latencies.append((time.perf_counter() - started) * 1000)
                self.executions += 1
                if reply.content().get("status") != "ok":
                    self.failures.append(f"{kernel_id}: execution {n}: {reply.content()}")
                elif stream_text(iopub) != f"{n * 2}\n":
                    self.failures.append(f"{kernel_id}: execution {n}: {stream_text(iopub)!r}")
                self.message_ids += [msg_id, *(m.msg_id for m in client.received)]
                client.received.clear()
        finally:
            await client.close()


__all__ = ["EITHER", "INVALID", "LEGACY", "VALID", "GoodClient", "Tally", "draw_frames", "fuzz"]
