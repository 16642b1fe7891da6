"""The proxy as a Y client of jupyter-collaboration's notebook rooms (pycrdt, jupyter_ydoc).

One ``NotebookRoom`` per notebook the proxy writes into: a document session (PUT), the room
websocket with y-websocket framing, the sync protocol, local changes sent as updates. After an
upstream restart the old session is refused: it asks for a new one and starts from a fresh
document (merging the old one into the reloaded notebook would duplicate its cells).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from jupyter_ydoc import YNotebook
from pycrdt import (
    Array,
    Doc,
    Map,
    Text,
    TransactionEvent,
    YMessageType,
    YSyncMessageType,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    merge_updates,
)

from .upstream import Backoff, Upstream

log = logging.getLogger("jupyter_replay_proxy.yroom")

_SEND_INTERVAL = 0.02  # seconds of local changes merged into one update message


class CollaborationUnavailable(RuntimeError):
    """The upstream has no jupyter-collaboration (or cannot open this document)."""


class NotebookRoom:
    """A live copy of one notebook's Y document, kept in sync with jupyter-collaboration."""

    def __init__(self, upstream: Upstream, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.doc = Doc()
        self.notebook = YNotebook(self.doc)
        self.synced = asyncio.Event()
        self.error: str | None = None
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._applying_remote = False
        self._task: asyncio.Task[None] | None = None
        self.on_new_document: list[Callable[[], None]] = []

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait for the first full sync, or raise what kept it from happening."""
        try:
            await asyncio.wait_for(self.synced.wait(), timeout)
        except asyncio.TimeoutError:
            raise CollaborationUnavailable(
                self.error or f"no sync of {self.path} within {timeout} s"
            ) from None

    # --- cells -------------------------------------------------------------------------------

    def cell(self, cell_id: str) -> Map | None:
        for ycell in self.notebook.ycells:
            if ycell.get("id") == cell_id:
                return ycell
        return None

    # --- connection ----------------------------------------------------------------------------

    async def _session(self) -> dict[str, Any]:
        url = self.upstream.api("api/collaboration/session/" + quote(self.path))
        async with self.upstream.http.put(
            url, json={"format": "json", "type": "notebook"}, headers=self.upstream.own_headers()
        ) as resp:
            if resp.status == 404 and "does not exist" not in await resp.text():
                raise CollaborationUnavailable(
                    "the upstream jupyter-server has no jupyter-collaboration: outputs of "
                    "executions are logged but not written into notebooks"
                )
            resp.raise_for_status()
            return await resp.json()

    async def _run(self) -> None:
        backoff = Backoff()
        first = True
        while True:
            try:
                session = await self._session()
                room = f"json:notebook:{session['fileId']}"
                url = self.upstream.api("api/collaboration/room/" + room).with_query(
                    sessionId=session["sessionId"]
                )
                async with self.upstream.http.ws_connect(
                    url, headers=self.upstream.own_headers(), max_msg_size=0, heartbeat=30
                ) as ws:
                    if not first:
                        self._fresh_document()
                    first = False
                    await self._converse(ws)
                log.info("The room of %s closed (%s); joining it again", self.path, ws.close_code)
                backoff.succeeded()
            except CollaborationUnavailable as error:
                self._fail(str(error))
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as error:
                self._fail(f"cannot reach the room of {self.path}: {error}")
            self.synced.clear()
            await backoff.wait()

    def _fail(self, message: str) -> None:
        if message != self.error:
            log.warning("%s", message)
        self.error = message

    def _fresh_document(self) -> None:
        self.doc = Doc()
        self.notebook = YNotebook(self.doc)
        self._outgoing = asyncio.Queue()
        self.synced.clear()
        for callback in self.on_new_document:
            callback()

    async def _converse(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        subscription = self.doc.observe(self._local_change)
        sender = asyncio.ensure_future(self._send(ws))
        try:
            await ws.send_bytes(create_sync_message(self.doc))
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY and frame.data:
                    await self._receive(ws, frame.data)
        finally:
            sender.cancel()
            self.doc.unobserve(subscription)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        if data[0] != YMessageType.SYNC:
            return  # awareness: the proxy shows no cursor
        self._applying_remote = True
        try:
            reply = handle_sync_message(data[1:], self.doc)
        finally:
            self._applying_remote = False
        if reply is not None:
            await ws.send_bytes(reply)
        if data[1] == YSyncMessageType.SYNC_STEP2:
            self.error = None
            self.synced.set()

    def _local_change(self, event: TransactionEvent) -> None:
        if not self._applying_remote:
            self._outgoing.put_nowait(event.update)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send local changes, those of one interval merged into one update: a cell printing
        as fast as it can makes thousands of changes a second, and jupyter-collaboration's
        room loses updates that come in faster than it applies them."""
        outgoing = self._outgoing  # this document's: a fresh one gets a queue of its own
        while True:
            updates = [await outgoing.get()]
            await asyncio.sleep(_SEND_INTERVAL)
            while not outgoing.empty():
                updates.append(outgoing.get_nowait())
            merged = updates[0] if len(updates) == 1 else merge_updates(*updates)
            await ws.send_bytes(create_update_message(merged))
            for _ in updates:
                outgoing.task_done()

    async def sent(self) -> None:
        """Return once every local change made so far has been sent to jupyter-collaboration."""
        await self._outgoing.join()


async def collaboration_problem(upstream: Upstream) -> str | None:
    """Why outputs cannot be written into notebooks upstream, or None when they can."""
    url = upstream.api("api/collaboration/session/replay-proxy-probe.ipynb")
    try:
        async with upstream.http.put(
            url, json={"format": "json", "type": "notebook"}, headers=upstream.own_headers()
        ) as resp:
            if resp.status in (200, 201) or "does not exist" in await resp.text():
                return None
            if resp.status in (401, 403):
                return (
                    f"cannot ask {upstream} for jupyter-collaboration: it refused the proxy's "
                    f"token ({resp.status})"
                )
    except aiohttp.ClientError as error:
        return f"cannot ask {upstream} for jupyter-collaboration: {error}"
    return (
        f"{upstream} has no jupyter-collaboration: outputs of executions whose client left are "
        "logged and replayed, but not written into notebooks"
    )


def youtput(output: dict[str, Any]) -> Map:
    """An nbformat output as jupyter_ydoc shapes it: a stream's text is a Y Text (appendable)."""
    shaped = dict(output)
    if shaped.get("output_type") == "stream":
        shaped["text"] = Text(shaped.get("text", ""))
    return Map(shaped)


def set_outputs(ycell: Map, outputs: list[dict[str, Any]]) -> None:
    youtputs = ycell.get("outputs")
    if not isinstance(youtputs, Array):
        ycell["outputs"] = youtputs = Array()
    youtputs.clear()
    youtputs.extend([youtput(output) for output in outputs])
