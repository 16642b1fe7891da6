"""Server-side execution: ``POST /api/kernels/{id}/execute``, outside jupyter-server.

Accepts JupyterLab's ``NotebookCellServerExecutor`` body ``{"cell_id", "document_id"}`` (the
source is read from the notebook's Y document) and jupyter-server-nbmodel's ``{"code",
"metadata": {"cell_id", ...}}``, and follows nbmodel's way to track a request:
``202`` + ``Location: .../requests/{uid}``; ``GET`` it → ``202`` pending, ``300`` waiting for
input (``POST /api/kernels/{id}/input {"input"}`` answers), ``200`` with the result; ``DELETE``
it cancels a queued request or interrupts a running one. Executions of a kernel run one at a
time, in order. The proxy sends each through its own link to the kernel, as a client named
after the caller (so the audit trail says who ran it), and is the only writer of its outputs.
An input() prompt goes to every frontend of the kernel too (addressed to each, with the cell's
id), so a browser shows it in the cell; whoever answers first answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from jupyter_client.session import Session

from .codecs import KERNEL_CHANNELS, Message, message_from_parts, readdressed
from .fold import FOLDED_MESSAGES, NotebookFold
from .relay import FROM_KERNEL, Client, Relay, Requester, Tap
from .rooms import RoomPool
from .upstream import Upstream, credential_headers, is_kernel_id, json_error
from .yroom import CollaborationUnavailable, NotebookRoom

log = logging.getLogger("jupyter_replay_proxy.execution")

INTERNAL = "replay-proxy-internal"  # the protocol name of the proxy's own clients


@dataclass
class _Job:
    uid: str
    kernel_id: str
    cell_id: str | None
    code: str | None
    path: str | None
    username: str | None
    state: str = "queued"  # queued, running, done, cancelled
    result: dict[str, Any] | None = None
    request_id: str | None = None  # its execute_request's msg_id, once sent
    client: Client | None = None
    #: its reply (None: the kernel restarted or died first), once the execution finished
    finished: asyncio.Future[Message | None] | None = None
    outputs: NotebookFold = field(default_factory=NotebookFold)  # what it printed, folded
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ServerExecutor(Tap):
    """Queues and runs server-side executions, one queue per kernel. Also a relay tap."""

    def __init__(
        self,
        relay: Relay,
        upstream: Upstream,
        rooms: RoomPool,
        notebook_of: Callable[[str], Awaitable[str | None]],
        backlog: Any,
        last_seq: Callable[[], int],
    ) -> None:
        self.relay = relay
        self.upstream = upstream
        self.rooms = rooms
        self.notebook_of = notebook_of
        self.backlog = backlog
        self.last_seq = last_seq
        self.jobs: dict[str, _Job] = {}
        self._running: dict[str, _Job] = {}  # by the msg_id of its execute_request
        self._queues: dict[str, asyncio.Queue[_Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()  # ok, error, failed...

    def add_routes(self, app: web.Application, base: str) -> None:
        self.base = base
        app.router.add_post(base + "api/kernels/{kernel_id}/execute", self.execute)
        app.router.add_get(base + "api/kernels/{kernel_id}/requests/{uid}", self.request_state)
        app.router.add_delete(base + "api/kernels/{kernel_id}/requests/{uid}", self.cancel)
        app.router.add_post(base + "api/kernels/{kernel_id}/input", self.answer_input)

    async def close(self) -> None:
        for worker in self._workers.values():
            worker.cancel()
        for worker in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    # --- handlers ----------------------------------------------------------------------------

    async def execute(self, request: web.Request) -> web.Response:
        kernel_id = request.match_info["kernel_id"]
        username = await self._authorize(request, kernel_id)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as error:
            raise json_error(400, f"bad request body: {error}") from None
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        cell_id = body.get("cell_id") or metadata.get("cell_id")
        code = body.get("code")
        if not isinstance(code, str | None) or not isinstance(cell_id, str | None):
            raise json_error(400, "code and cell_id must be strings")
        if code is None and cell_id is None:
            raise json_error(400, "give cell_id (and document_id), or code")
        path = metadata.get("document_path") or await self.notebook_of(kernel_id)
        if cell_id is not None and path is None:
            raise json_error(400, f"kernel {kernel_id} has no notebook session to write into")
        job = _Job(uuid.uuid4().hex, kernel_id, cell_id, code, path, username)
        self.jobs[job.uid] = job
        self._queue(kernel_id).put_nowait(job)
        location = self.base + f"api/kernels/{kernel_id}/requests/{job.uid}"
        return web.json_response(
            {"uid": job.uid, "status": "queued"}, status=202, headers={"Location": location}
        )

    async def request_state(self, request: web.Request) -> web.Response:
        job = await self._job(request)
        if job.state in ("done", "cancelled"):
            return web.json_response(job.result)
        waiting = self._waiting(job.kernel_id)
        if waiting is not None and waiting[0] is job:
            location = self.base + f"api/kernels/{job.kernel_id}/input"
            return web.json_response(
                {"status": "input", "input_request": waiting[1].content()},
                status=300,
                headers={"Location": location},
            )
        return web.json_response({"status": job.state}, status=202)

    async def cancel(self, request: web.Request) -> web.Response:
        job = await self._job(request)
        if job.state == "queued":
            job.state = "cancelled"
            job.result = {"status": "cancelled"}
            self.outcomes["cancelled"] += 1
            job.done.set()
        elif job.state == "running":
            url = self.upstream.api(f"api/kernels/{job.kernel_id}/interrupt")
            headers = credential_headers(request.headers)
            query = {k: v for k, v in request.query.items() if k == "token"}
            async with self.upstream.http.post(url.with_query(query), headers=headers) as resp:
                if resp.status >= 400:
                    raise json_error(resp.status, "jupyter-server refused the interrupt")
        return web.json_response({"status": job.state})

    async def answer_input(self, request: web.Request) -> web.Response:
        kernel_id = request.match_info["kernel_id"]
        await self._authorize(request, kernel_id)
        try:
            answer = (await request.json())["input"]
            if not isinstance(answer, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise json_error(400, 'the body must be {"input": "<text>"}') from None
        waiting = self._waiting(kernel_id)
        if waiting is None or waiting[0].client is None:
            raise json_error(400, "no execution of this kernel is waiting for input")
        job, prompt = waiting
        reply = _message(
            "stdin", "input_reply", {"value": answer}, job.username, parent=prompt.header
        )
        relay = await self.relay.kernel(kernel_id)
        relay.from_client(job.client, reply)
        return web.json_response({"status": "sent"})

    async def _job(self, request: web.Request) -> _Job:
        kernel_id = request.match_info["kernel_id"]
        await self._authorize(request, kernel_id)
        job = self.jobs.get(request.match_info["uid"])
        if job is None or job.kernel_id != kernel_id:
            raise json_error(404, "no such request")
        return job

    async def _authorize(self, request: web.Request, kernel_id: str) -> str | None:
        """Only who jupyter-server would let run code on the kernel (its channels), named as
        /api/me names them."""
        if not is_kernel_id(kernel_id):
            raise json_error(404, "not a kernel id")
        status = await self.upstream.admit(request, kernel_id)
        if status != 101:
            raise json_error(
                status if status in (401, 403, 404) else 403, "refused by jupyter-server"
            )
        _, identity = await self.upstream.identity(request)
        return (identity or {}).get("username")

    # --- relay events: the executions it runs ---------------------------------------------------

    def message_relayed(
        self,
        seq: int,
        kernel_id: str,
        direction: str,
        message: Message,
        client: Requester | None,
        received_at: float,
    ) -> None:
        """Fold what a running execution prints; show its input() prompt to every frontend."""
        if direction != FROM_KERNEL:
            if message.msg_type == "input_reply":
                for job in self._running.values():
                    if job.kernel_id == kernel_id:
                        content = message.content()
                        if isinstance(content, dict):
                            job.outputs.answered(message.parent_msg_id or "", content)
            return
        job = self._running.get(message.parent_msg_id or "")
        if job is None:
            return
        content = message.content()
        if message.channel == "iopub" and message.msg_type in FOLDED_MESSAGES:
            if isinstance(content, dict):
                job.outputs.apply(job.uid, message.msg_type, content)
        elif message.msg_type == "input_request" and isinstance(content, dict):
            job.outputs.asked(job.uid, message.msg_id, content)
            relay = self.relay.kernels.get(kernel_id)
            for other in list(relay.clients.values()) if relay is not None else []:
                if other.protocol != INTERNAL:
                    self._ask(other, job, message)

    def execution_finished(self, kernel_id: str, msg_id: str, reply: Message | None) -> None:
        job = self._running.pop(msg_id, None)
        if job is not None and job.finished is not None and not job.finished.done():
            job.finished.set_result(reply)

    # --- input() prompts for frontends ----------------------------------------------------------

    def _waiting(self, kernel_id: str) -> tuple[_Job, Message] | None:
        """The server-side execution of the kernel waiting for input, with its prompt. The
        relay keeps the kernel's unanswered input_request; whoever answers (a frontend, or POST
        input), the relay forgets it."""
        relay = self.relay.kernels.get(kernel_id)
        prompt = relay.pending_input if relay is not None else None
        if prompt is None:
            return None
        for job in self.jobs.values():
            if job.state == "running" and job.request_id == prompt.parent_msg_id:
                return job, prompt
        return None

    def client_joined(self, client: Client) -> None:
        """A frontend that joins while an execution waits for input is asked too."""
        waiting = self._waiting(client.kernel_id) if client.protocol != INTERNAL else None
        if waiting is not None:
            self._ask(client, *waiting)

    def _ask(self, client: Client, job: _Job, prompt: Message) -> None:
        """Show `client` the prompt as if it had sent the request: stock JupyterLab hands such a
        message to its frontend plugins (this proxy serves one that renders it in the cell)."""
        metadata = {"cellId": job.cell_id} if job.cell_id else {}
        client.deliver(readdressed(prompt, client.session_id or "", metadata))

    # --- running -------------------------------------------------------------------------------

    def _queue(self, kernel_id: str) -> asyncio.Queue[_Job]:
        queue = self._queues.get(kernel_id)
        if queue is None:
            queue = self._queues[kernel_id] = asyncio.Queue()
            self._workers[kernel_id] = asyncio.ensure_future(self._work(kernel_id, queue))
        return queue

    async def _work(self, kernel_id: str, queue: asyncio.Queue[_Job]) -> None:
        while True:
            job = await queue.get()
            if job.state == "cancelled":
                continue
            job.state = "running"
            try:
                job.result = await self._run(job)
                self.outcomes[str(job.result.get("status"))] += 1
            except (CollaborationUnavailable, LookupError, RuntimeError) as error:
                log.warning("Server-side execution %s failed: %s", job.uid, error)
                job.result = {"status": "error", "ename": type(error).__name__,
                              "evalue": str(error), "traceback": []}  # fmt: skip
                self.outcomes["failed"] += 1
            job.state = "done"
            job.done.set()
            self._forget_old_jobs()

    def _forget_old_jobs(self, keep: int = 1000) -> None:
        """Results are kept for whoever polls them, but not forever."""
        done = [uid for uid, job in self.jobs.items() if job.state in ("done", "cancelled")]
        for uid in done[: max(0, len(done) - keep)]:
            del self.jobs[uid]

    async def _run(self, job: _Job) -> dict[str, Any]:
        room = None
        code = job.code
        if job.cell_id is not None:
            assert job.path is not None
            room = await self.rooms.join(job.path)
            ycell = room.cell(job.cell_id)
            if ycell is None:
                self.rooms.leave(job.path)
                raise LookupError(f"no cell {job.cell_id} in {job.path}")
            if code is None:
                code = str(ycell["source"])
        try:
            return await self._send(job, code or "", room)
        finally:
            if room is not None:
                self.rooms.leave(room.path)

    async def _send(self, job: _Job, code: str, room: NotebookRoom | None) -> dict[str, Any]:
        """Run the code as a client of the proxy's own, named after the caller, writing into
        the notebook (`room`, joined) as the only writer; the result once it finished."""
        relay = await self.relay.kernel(job.kernel_id)
        client = job.client = Client(
            uuid.uuid4().hex, job.kernel_id, f"replay-proxy-execute-{job.uid}", INTERNAL,
            username=job.username, notebook_path=room.path if room is not None else None,
        )  # fmt: skip
        metadata = {"cellId": job.cell_id} if job.cell_id else {}
        request = _message(
            "shell", "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": True, "stop_on_error": True},
            job.username, metadata=metadata,
        )  # fmt: skip
        job.request_id = request.msg_id
        job.finished = asyncio.get_running_loop().create_future()
        job.outputs.start(job.uid)
        self._running[request.msg_id] = job
        relay.attach(client)
        client.sent_seq = self.last_seq()

        async def ignore(message: Message) -> None:
            """What the relay sends its client: followed as a tap (above) instead."""

        async def confirm(seq: int) -> None:
            relay.confirm_delivery(client, seq)

        pump = asyncio.ensure_future(client.pump(ignore, confirm, self.backlog, self.last_seq))
        try:
            relay.from_client(client, request)
            reply = await job.finished
        finally:
            self._running.pop(request.msg_id, None)
            relay.detach(client)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if reply is None:
            raise RuntimeError("the kernel restarted or died before it answered")
        content = reply.content()
        job.outputs.finish(job.uid, content)
        result = {
            "status": content.get("status"),
            "execution_count": content.get("execution_count"),
            "outputs": job.outputs.cell(job.uid).outputs,
        }
        if room is not None:  # done means done in the notebook too: whoever opens it next
            with contextlib.suppress(asyncio.TimeoutError):  # sees these outputs
                await asyncio.wait_for(room.synced.wait(), 10)
                await asyncio.wait_for(room.sent(), 10)
        if content.get("status") == "error":
            result.update({k: content.get(k) for k in ("ename", "evalue", "traceback")})
        return result


def _message(
    channel: str,
    msg_type: str,
    content: dict[str, Any],
    username: str | None,
    *,
    metadata: dict[str, Any] | None = None,
    parent: dict[str, Any] | None = None,
) -> Message:
    """A message of the proxy's own, shaped as a frontend's (the kernel link signs it)."""
    session = Session(key=b"unused: the link signs", username=username or "replay-proxy")
    msg = session.msg(msg_type, content, parent=parent, metadata=metadata or {})
    parts = [session.pack(msg[key]) for key in ("header", "parent_header", "metadata", "content")]
    return message_from_parts(channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True)
