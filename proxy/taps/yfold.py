"""The Y fold tap: outputs of executions nobody watches any more, written into the notebook.

The handoff rule: while the client that sent an execute_request is connected, it writes that
execution's outputs into the collaborative document; the proxy does not (a second writer
duplicates them). When the client has closed its websocket on purpose (a close frame: a tab
closed), or has been gone for ``grace`` seconds (a dropped connection may come back), and one
of its executions was unfinished when it left, the proxy takes the execution over: it writes the
cell's outputs as the fold has them (replacing whatever is there: idempotent), keeps them live
until the execution finishes (as the relay decides: :mod:`proxy.lifecycle`), then sets the
execution count and the idle state. A server-side execution of the proxy's own (a client with
a notebook) is the proxy's to write from the start. An execution never writes into a cell that
has been executed again since. An answer to an input() prompt is echoed into the outputs
(``prompt value``, as JupyterLab shows it), so a proxy-written cell has it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..codecs import Message
from ..fold import FOLDED_MESSAGES, Edit, NotebookFold
from ..lifecycle import LOOKBACK, UNFINISHED_EXECUTIONS
from ..links import RecentIds
from ..metrics import LatencyHistogram
from ..relay import FROM_KERNEL, Client, Requester, Tap
from ..rooms import RoomPool
from ..yroom import CollaborationUnavailable, NotebookRoom, set_outputs, youtput

log = logging.getLogger("jupyter_replay_proxy.yfold")

_LATEST_OF_CELL = """
SELECT max(seq) FROM messages
WHERE kernel_id = :kernel AND msg_type = 'execute_request' AND direction = 'to_kernel'
  AND json_extract(metadata, '$.cellId') = :cell
"""
_SESSION_OF = "SELECT session_id FROM clients WHERE client_id = :client"
_OUTPUTS_OF = """
SELECT msg_type, content FROM messages
WHERE parent_msg_id = :parent AND channel = 'iopub' AND direction = 'from_kernel'
ORDER BY seq
"""


@dataclass
class _Unfinished:
    """A notebook cell's execution the log has as unfinished, with its outputs so far."""

    msg_id: str
    cell_id: str
    client_id: str | None
    session_id: str | None
    outputs: list[tuple[str, Any]]  # (msg_type, content) of its iopub, in order


def _unfinished_cells(conn: sqlite3.Connection, kernel_id: str) -> list[_Unfinished]:
    """The latest execution of each notebook cell of the kernel, if it is unfinished."""
    found = []
    query = {"kernel": kernel_id, "lookback": LOOKBACK}
    for seq, msg_id, client_id, metadata in conn.execute(UNFINISHED_EXECUTIONS, query):
        fields = _json(metadata) if metadata else None
        cell_id = fields.get("cellId") if isinstance(fields, dict) else None
        if not isinstance(cell_id, str):
            continue
        (latest,) = conn.execute(_LATEST_OF_CELL, {"kernel": kernel_id, "cell": cell_id}).fetchone()
        if latest != seq:
            continue  # executed again since (and that one finished)
        session = conn.execute(_SESSION_OF, {"client": client_id}).fetchone()
        outputs = [
            (msg_type, _json(content))
            for msg_type, content in conn.execute(_OUTPUTS_OF, {"parent": msg_id})
        ]
        found.append(_Unfinished(msg_id, cell_id, client_id, session and session[0], outputs))
    return found


@dataclass
class _Execution:
    msg_id: str
    kernel_id: str
    cell_id: str
    client_id: str | None
    session_id: str | None
    finished: bool = False
    owner: str = "client"  # "client", "proxy", or "nobody" (superseded, or no notebook)
    room: NotebookRoom | None = None


@dataclass
class _Kernel:
    fold: NotebookFold = field(default_factory=NotebookFold)
    by_cell: dict[str, _Execution] = field(default_factory=dict)  # the latest execution
    executions: dict[str, _Execution] = field(default_factory=dict)  # unfinished or owned


class OutputFolder(Tap):
    """Follows executions; takes over those whose client is gone."""

    def __init__(
        self,
        rooms: RoomPool,
        notebook_of: Callable[[str], str | None],
        read_log: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        grace: float = 5.0,
    ) -> None:
        self.rooms = rooms
        self.notebook_of = notebook_of
        self.read_log = read_log
        self.grace = grace
        self.kernels: dict[str, _Kernel] = {}
        self._takeovers: dict[str, asyncio.TimerHandle] = {}  # client id → pending takeover
        rooms.on_fresh_document.append(self._rejoined)
        # (kernel, session) → executions of that session the proxy took over: its outputs are
        # the proxy's to write, so a returning client of the session is not sent them
        self._taken: dict[tuple[str, str | None], RecentIds] = {}
        self.handoffs = 0  # executions taken over
        self.write_latency = LatencyHistogram()  # of writes into Y documents

    def hides_from(self, client: Client) -> Callable[[Message], bool]:
        """Which messages the client must not get: outputs of its session's executions the
        proxy took over (it would write them into the notebook a second time)."""
        key = (client.kernel_id, client.session_id)

        def hidden(message: Message) -> bool:
            if message.channel != "iopub" or message.msg_type not in FOLDED_MESSAGES:
                return False
            taken = self._taken.get(key)
            return taken is not None and message.parent_msg_id in taken

        return hidden

    # --- relay events --------------------------------------------------------------------------

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Requester | None,
        received_at: float,
    ) -> None:
        if direction != FROM_KERNEL:
            if message.msg_type == "input_reply":
                self._answered(kernel_id, message)
            return
        kernel = self.kernels.get(kernel_id)
        execution = kernel.executions.get(message.parent_msg_id or "") if kernel else None
        if kernel is None or execution is None or execution.finished:
            return
        if message.channel == "iopub" and message.msg_type in FOLDED_MESSAGES:
            if kernel.by_cell.get(execution.cell_id) is not execution:
                return  # the cell was executed again: this output is nobody's to show
            content = message.content()
            if isinstance(content, dict):
                kernel.fold.apply(execution.cell_id, message.msg_type, content)
                self._write(kernel, execution)
        elif message.msg_type == "input_request":
            request = message.content()
            if isinstance(request, dict) and kernel.by_cell.get(execution.cell_id) is execution:
                kernel.fold.asked(execution.cell_id, message.msg_id, request)

    def execution_finished(self, kernel_id: str, msg_id: str, reply: Message | None) -> None:
        kernel = self.kernels.get(kernel_id)
        execution = kernel.executions.get(msg_id) if kernel else None
        if kernel is None or execution is None or execution.finished:
            return
        content = reply.content() if reply is not None else None
        self._finished(kernel, execution, content if isinstance(content, dict) else None)

    def client_left(self, client: Client) -> None:
        if any(
            e.client_id == client.client_id and not e.finished
            for kernel in self.kernels.values()
            for e in kernel.executions.values()
        ):
            # a frontend that said goodbye is not coming back: no grace to wait out
            delay = 0.0 if client.said_goodbye else self.grace
            loop = asyncio.get_running_loop()
            self._takeovers[client.client_id] = loop.call_later(
                delay, lambda: self.rooms.background.run(self._take_over(client))
            )

    async def restore(self, kernel_id: str) -> None:
        """After a restart of the proxy: cells still running are followed again, their outputs
        so far folded from the log, and taken over once their clients have had the grace period
        to come back (as if they had all just left; the proxy's own requests have no client)."""
        unfinished = await self.read_log(lambda conn: _unfinished_cells(conn, kernel_id))
        kernel = self.kernels.setdefault(kernel_id, _Kernel())
        # a kernel linked again by this same process: what it follows, it followed all along
        restored = [logged for logged in unfinished if logged.cell_id not in kernel.by_cell]
        if not restored:
            return
        loop = asyncio.get_running_loop()
        for logged in restored:
            client_id = logged.client_id or f"restored-{logged.msg_id}"
            execution = _Execution(
                logged.msg_id, kernel_id, logged.cell_id, client_id, logged.session_id
            )
            kernel.by_cell[logged.cell_id] = execution
            kernel.executions[logged.msg_id] = execution
            kernel.fold.start(logged.cell_id)
            for msg_type, content in logged.outputs:
                if msg_type in FOLDED_MESSAGES and isinstance(content, dict):
                    kernel.fold.apply(logged.cell_id, msg_type, content)
            kernel.fold.take_edits()
            if client_id not in self._takeovers:
                gone = Client(client_id, kernel_id, logged.session_id, "", closed=True)
                self._takeovers[client_id] = loop.call_later(
                    self.grace, lambda gone=gone: self.rooms.background.run(self._take_over(gone))
                )
        log.info("Kernel %s: %d cell(s) still running when the proxy stopped",
                 kernel_id, len(restored))  # fmt: skip

    def client_joined(self, client: Client) -> None:
        """The same session back within the grace period: it writes its outputs again."""
        for client_id, handle in list(self._takeovers.items()):
            sender = self._sender_session(client_id)
            if sender is not None and sender == (client.kernel_id, client.session_id):
                handle.cancel()
                del self._takeovers[client_id]
                for kernel in self.kernels.values():
                    for execution in kernel.executions.values():
                        if execution.client_id == client_id:
                            execution.client_id = client.client_id

    # --- executions ------------------------------------------------------------------------------

    def execution_requested(
        self, kernel_id: str, message: Message, client: Requester | None
    ) -> None:
        metadata = _json(message.parts[2])
        cell_id = metadata.get("cellId") if isinstance(metadata, dict) else None
        if not isinstance(cell_id, str):
            return  # no cell to write into: the log has it all
        kernel = self.kernels.setdefault(kernel_id, _Kernel())
        previous = kernel.by_cell.get(cell_id)
        if previous is not None and previous.owner == "proxy":
            previous.owner = "nobody"  # executed again: the new execution owns the cell
            self._release(previous)
        execution = _Execution(
            message.msg_id, kernel_id, cell_id,
            client.client_id if client else None, client.session_id if client else None,
        )  # fmt: skip
        kernel.by_cell[cell_id] = execution
        kernel.executions[execution.msg_id] = execution
        kernel.fold.start(cell_id)
        kernel.fold.take_edits()
        notebook = client.notebook_path if isinstance(client, Client) else None
        room = self.rooms.share(notebook) if notebook is not None else None
        if room is not None:  # the proxy's own execution (server-side), in a room its executor
            execution.owner, execution.room = "proxy", room  # joined: the only writer
            self._rewrite(kernel, execution)

    def _answered(self, kernel_id: str, reply: Message) -> None:
        """The answer to a prompt is echoed into the cell's outputs, as JupyterLab shows it."""
        kernel = self.kernels.get(kernel_id)
        content = reply.content()
        cell_id = (
            kernel.fold.answered(reply.parent_msg_id or "", content)
            if kernel is not None and isinstance(content, dict)
            else None
        )
        execution = kernel.by_cell.get(cell_id) if kernel is not None and cell_id else None
        if kernel is not None and execution is not None:
            self._write(kernel, execution)

    def _finished(
        self, kernel: _Kernel, execution: _Execution, reply: dict[str, Any] | None
    ) -> None:
        execution.finished = True
        current = kernel.by_cell.get(execution.cell_id) is execution
        if current:
            kernel.fold.finish(execution.cell_id, reply)
        if execution.owner == "proxy" and current and execution.room is not None:
            self._write(kernel, execution)
            self._release(execution)
        if execution.owner != "client" or not self._client_pending(execution):
            self._forget(kernel, execution)

    def _forget(self, kernel: _Kernel, execution: _Execution) -> None:
        """Nothing more will be written for this execution: drop it (and its cell's fold)."""
        kernel.executions.pop(execution.msg_id, None)
        if kernel.by_cell.get(execution.cell_id) is execution:
            del kernel.by_cell[execution.cell_id]
            kernel.fold.forget(execution.cell_id)

    def _client_pending(self, execution: _Execution) -> bool:
        """Its client is gone and a takeover is waiting for the grace period to end."""
        return execution.client_id in self._takeovers

    def _sender_session(self, client_id: str) -> tuple[str, str | None] | None:
        for kernel in self.kernels.values():
            for execution in kernel.executions.values():
                if execution.client_id == client_id:
                    return execution.kernel_id, execution.session_id
        return None

    # --- takeover --------------------------------------------------------------------------------

    async def _take_over(self, client: Client) -> None:
        self._takeovers.pop(client.client_id, None)
        kernel = self.kernels.get(client.kernel_id)
        if kernel is None:
            return
        mine = [e for e in kernel.executions.values() if e.client_id == client.client_id]
        for execution in mine:
            if kernel.by_cell.get(execution.cell_id) is not execution:
                kernel.executions.pop(execution.msg_id, None)
                continue
            path = self.notebook_of(execution.kernel_id)
            if path is None:
                log.info("Kernel %s has no notebook: %s stays in the log only",
                         execution.kernel_id, execution.msg_id)  # fmt: skip
                execution.owner = "nobody"
                self._finished_if_done(kernel, execution)
                continue
            try:
                room = await self.rooms.join(path)
            except CollaborationUnavailable as error:
                log.warning("Cannot write outputs into %s: %s", path, error)
                execution.owner = "nobody"
                self._finished_if_done(kernel, execution)
                continue
            execution.owner, execution.room = "proxy", room
            self.handoffs += 1
            key = (execution.kernel_id, execution.session_id)
            # a session returns within hours, not thousands of executions
            self._taken.setdefault(key, RecentIds(1000)).first_time(execution.msg_id)
            log.info("Writing the outputs of %s into %s (its client left)",
                     execution.msg_id, path)  # fmt: skip
            self._rewrite(kernel, execution)
            if execution.finished:
                self._release(execution)
                self._finished_if_done(kernel, execution)

    def _finished_if_done(self, kernel: _Kernel, execution: _Execution) -> None:
        if execution.finished:
            self._forget(kernel, execution)

    def _rewrite(self, kernel: _Kernel, execution: _Execution) -> None:
        """Make the cell show what the fold has, whatever it showed before."""
        assert execution.room is not None
        ycell = execution.room.cell(execution.cell_id)
        kernel.fold.take_edits()
        if ycell is None:
            execution.owner = "nobody"  # the cell was deleted
            return
        state = kernel.fold.cell(execution.cell_id)
        started = time.perf_counter()
        with execution.room.doc.transaction():
            set_outputs(ycell, state.outputs)
            ycell["execution_count"] = state.execution_count
            ycell["execution_state"] = "idle" if execution.finished else "running"
        self.write_latency.observe(time.perf_counter() - started)

    def _write(self, kernel: _Kernel, execution: _Execution) -> None:
        edits = kernel.fold.take_edits()
        if execution.owner != "proxy" or execution.room is None:
            return
        ycell = execution.room.cell(execution.cell_id)
        if ycell is None:
            execution.owner = "nobody"
            return
        started = time.perf_counter()
        try:
            with execution.room.doc.transaction():
                for edit in edits:
                    if edit.cell == execution.cell_id:
                        _apply(ycell, edit)
                if execution.finished:
                    state = kernel.fold.cell(execution.cell_id)
                    ycell["execution_count"] = state.execution_count
                    ycell["execution_state"] = "idle"
        except (IndexError, KeyError, TypeError, ValueError):  # someone else changed outputs
            self._rewrite(kernel, execution)
            return
        self.write_latency.observe(time.perf_counter() - started)

    # --- rooms -----------------------------------------------------------------------------------

    async def _rejoined(self, room: NotebookRoom) -> None:
        """The room was joined again with a fresh document (upstream restart, dropped
        connection): write every cell the proxy owns there anew, from the fold."""
        await room.synced.wait()
        for kernel in self.kernels.values():
            for execution in list(kernel.executions.values()):
                if execution.room is room and execution.owner == "proxy":
                    self._rewrite(kernel, execution)

    def _release(self, execution: _Execution) -> None:
        room, execution.room = execution.room, None
        if room is not None:
            self.rooms.leave_later(room.path)

    def close(self) -> None:
        for handle in self._takeovers.values():
            handle.cancel()


def _apply(ycell: Any, edit: Edit) -> None:
    """One fold edit on a Y cell's outputs; Y Text offsets are in UTF-8 bytes."""
    youtputs = ycell["outputs"]
    if edit.kind == "clear":
        youtputs.clear()
    elif edit.kind == "add":
        assert edit.output is not None
        youtputs.append(youtput(edit.output))
    elif edit.kind == "set":
        assert edit.output is not None
        del youtputs[edit.index]
        youtputs.insert(edit.index, youtput(edit.output))
    else:
        ytext = youtputs[edit.index]["text"]
        end = len(ytext)
        start = end - len(edit.replaced.encode())
        if start < end:
            del ytext[start:end]
        ytext.insert(start, edit.text)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
