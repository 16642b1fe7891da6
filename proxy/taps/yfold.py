"""The Y fold tap: outputs of executions nobody watches any more, written into the notebook.

The handoff rule: while the client that sent an execute_request is connected, it writes that
execution's outputs into the collaborative document; the proxy does not (a second writer
duplicates them). When the client has closed its websocket on purpose (a close frame: a tab
closed), or has been gone for ``grace`` seconds (a dropped connection may come back), and one
of its executions was unfinished when it left, the proxy takes the execution over: it writes the
cell's outputs as the fold has them (replacing whatever is there: idempotent), keeps them live
until its reply and its idle status, then sets the execution count and the idle state. An
execution never writes into a cell that has been executed again since. An answer to an
input() prompt is echoed into the outputs (``prompt value``, as JupyterLab shows it), so a
proxy-written cell has it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..codecs import Message
from ..fold import OUTPUT_MESSAGES, Edit, NotebookFold, stdin_echo
from ..links import RecentIds
from ..metrics import LatencyHistogram
from ..relay import FROM_KERNEL, Client, KernelMemory, Requester, Tap, in_background
from ..yroom import CollaborationUnavailable, NotebookRoom, set_outputs, youtput

log = logging.getLogger("jupyter_replay_proxy.yfold")

_GONE = ("restarting", "dead")  # statuses after which a kernel answers no earlier request
_ROOM_LINGER = 5.0  # seconds a room stays joined after the last write (the server saves ~1 s on)


@dataclass
class _Execution:
    msg_id: str
    kernel_id: str
    cell_id: str
    client_id: str | None
    session_id: str | None
    finished: bool = False
    reply: dict[str, Any] | None = None
    owner: str = "client"  # "client", "proxy", or "nobody" (superseded, or no notebook)
    room: NotebookRoom | None = None
    restored: bool = False  # followed again after a proxy restart: its reply may never come
    idle: bool = False  # the kernel's idle status for it came: no output of it follows


@dataclass
class _Kernel:
    fold: NotebookFold = field(default_factory=NotebookFold)
    by_cell: dict[str, _Execution] = field(default_factory=dict)  # the latest execution
    executions: dict[str, _Execution] = field(default_factory=dict)  # unfinished or owned
    prompts: dict[str, tuple[_Execution, dict[str, Any]]] = field(default_factory=dict)  # by id


class OutputFolder(Tap):
    """Follows executions; takes over those whose client is gone."""

    def __init__(
        self,
        room_for: Callable[[str], NotebookRoom],
        notebook_of: Callable[[str], str | None],
        grace: float = 5.0,
    ) -> None:
        self.room_for = room_for
        self.notebook_of = notebook_of
        self.grace = grace
        self.kernels: dict[str, _Kernel] = {}
        self._takeovers: dict[str, asyncio.TimerHandle] = {}  # client id → pending takeover
        self.rooms: dict[str, NotebookRoom] = {}
        self._room_users: dict[str, int] = {}
        self._claimed: dict[str, NotebookRoom] = {}  # msg_id → room: the proxy's own requests
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
            if message.channel != "iopub" or message.msg_type not in OUTPUT_MESSAGES:
                return False
            taken = self._taken.get(key)
            return taken is not None and message.parent_msg_id in taken

        return hidden

    def claim(self, msg_id: str, room: NotebookRoom) -> None:
        """The proxy itself is about to send this execute_request (server-side execution): it
        writes the outputs from the start, as the only writer. ``room`` was joined for it."""
        self._claimed[msg_id] = room

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
            if message.msg_type == "execute_request":
                self._requested(kernel_id, message, client)
            elif message.msg_type == "input_reply":
                self._answered(kernel_id, message)
            return
        kernel = self.kernels.get(kernel_id)
        state = None  # of a status message, parsed once
        if kernel is not None and message.msg_type == "status" and message.channel == "iopub":
            content = message.content()
            state = content.get("execution_state") if isinstance(content, dict) else None
            if state in _GONE:
                self.kernel_restarted(kernel_id)
                return
        execution = kernel.executions.get(message.parent_msg_id or "") if kernel else None
        if kernel is None or execution is None:
            return
        if message.channel == "iopub" and message.msg_type in OUTPUT_MESSAGES:
            if kernel.by_cell.get(execution.cell_id) is not execution:
                return  # the cell was executed again: this output is nobody's to show
            content = message.content()
            if isinstance(content, dict):
                kernel.fold.apply(execution.cell_id, message.msg_type, content)
                self._write(kernel, execution)
        elif state == "idle" and not execution.finished:
            # The reply (shell) can overtake the last outputs (iopub); the idle status follows
            # them all, so an execution ends at both (a restored one at idle: its reply went
            # to the proxy that stopped).
            execution.idle = True
            if execution.reply is not None or execution.restored:
                self._finished(kernel, execution)
        elif message.msg_type == "input_request":
            request = message.content()
            if isinstance(request, dict):
                kernel.prompts[message.msg_id] = (execution, request)
        elif message.channel == "shell" and message.msg_type == "execute_reply":
            content = message.content()
            execution.reply = content if isinstance(content, dict) else {}
            if execution.idle:
                self._finished(kernel, execution)

    def kernel_restarted(self, kernel_id: str) -> None:
        """No earlier request will be answered: unfinished executions end as they stand."""
        kernel = self.kernels.get(kernel_id)
        for waiting in [e for e in kernel.executions.values() if not e.finished] if kernel else []:
            self._finished(kernel, waiting)

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
                delay, lambda: in_background(self._take_over(client))
            )

    def kernel_remembered(self, kernel_id: str, memory: KernelMemory) -> None:
        """After a restart of the proxy: cells still running are followed again, their outputs
        so far folded from the log, and taken over once their clients have had the grace period
        to come back (as if they had all just left; the proxy's own requests have no client)."""
        if not memory.unfinished:
            return
        kernel = self.kernels.setdefault(kernel_id, _Kernel())
        # a kernel linked again by this same process: what it follows, it followed all along
        restored = [logged for logged in memory.unfinished if logged.cell_id not in kernel.by_cell]
        if not restored:
            return
        loop = asyncio.get_running_loop()
        for logged in restored:
            client_id = logged.client_id or f"restored-{logged.msg_id}"
            execution = _Execution(
                logged.msg_id, kernel_id, logged.cell_id, client_id, logged.session_id,
                restored=True,
            )  # fmt: skip
            kernel.by_cell[logged.cell_id] = execution
            kernel.executions[logged.msg_id] = execution
            kernel.fold.start(logged.cell_id)
            for msg_type, content in logged.outputs:
                if not isinstance(content, dict):
                    continue
                if msg_type in OUTPUT_MESSAGES:
                    kernel.fold.apply(logged.cell_id, msg_type, content)
                elif msg_type == "status" and content.get("execution_state") == "idle":
                    execution.finished = True  # the reply was lost with the proxy
                    kernel.fold.finish(logged.cell_id, None)
            kernel.fold.take_edits()
            if client_id not in self._takeovers:
                gone = Client(client_id, kernel_id, logged.session_id, "", closed=True)
                self._takeovers[client_id] = loop.call_later(
                    self.grace, lambda gone=gone: in_background(self._take_over(gone))
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

    def _requested(self, kernel_id: str, message: Message, client: Requester | None) -> None:
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
        room = self._claimed.pop(execution.msg_id, None)
        if room is not None:
            execution.owner, execution.room = "proxy", room
            self._rewrite(kernel, execution)

    def _answered(self, kernel_id: str, reply: Message) -> None:
        """Echo the answer to a prompt as JupyterLab does: a stdin stream of prompt and value."""
        kernel = self.kernels.get(kernel_id)
        asked = kernel.prompts.pop(reply.parent_msg_id or "", None) if kernel else None
        if kernel is None or asked is None:
            return
        execution, request = asked
        if kernel.by_cell.get(execution.cell_id) is not execution:
            return
        content = reply.content()
        echo = stdin_echo(request, content if isinstance(content, dict) else {})
        kernel.fold.apply(execution.cell_id, "stream", echo)
        self._write(kernel, execution)

    def _finished(self, kernel: _Kernel, execution: _Execution) -> None:
        execution.finished = True
        current = kernel.by_cell.get(execution.cell_id) is execution
        if current:
            kernel.fold.finish(execution.cell_id, execution.reply)
        if execution.owner == "proxy" and current and execution.room is not None:
            self._write(kernel, execution)
            self._release(execution)
        if execution.owner != "client" or not self._client_pending(execution):
            self._forget(kernel, execution)

    def _forget(self, kernel: _Kernel, execution: _Execution) -> None:
        """Nothing more will be written for this execution: drop it (and its cell's fold)."""
        kernel.executions.pop(execution.msg_id, None)
        for prompt_id in [p for p, (e, _) in kernel.prompts.items() if e is execution]:
            del kernel.prompts[prompt_id]
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
                room = await self.join(path)
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

    async def join(self, path: str) -> NotebookRoom:
        """Join (or share) the room of a notebook; every join is released once."""
        room = self.rooms.get(path)
        if room is None:
            room = self.rooms[path] = self.room_for(path)
            room.on_new_document.append(lambda: in_background(self._rejoined(room)))
            room.start()
        self._room_users[path] = self._room_users.get(path, 0) + 1
        try:
            await room.ready()
        except CollaborationUnavailable:
            self.leave(path)
            raise
        return room

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
            asyncio.get_running_loop().call_later(_ROOM_LINGER, self.leave, room.path)

    def leave(self, path: str) -> None:
        self._room_users[path] = self._room_users.get(path, 1) - 1
        if self._room_users[path] <= 0:
            del self._room_users[path]
            room = self.rooms.pop(path, None)
            if room is not None:
                in_background(room.close())

    async def close(self) -> None:
        for handle in self._takeovers.values():
            handle.cancel()
        for room in list(self.rooms.values()):
            with contextlib.suppress(Exception):
                await room.close()
        self.rooms.clear()


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
