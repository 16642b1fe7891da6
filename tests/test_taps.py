"""The Y fold tap and the server-side executor, fed messages through a relay with no kernel
behind it, and notebook rooms kept in memory: no sockets, no server, no timers deciding."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from proxy.codecs import Message
from proxy.execution import INTERNAL, ServerExecutor, _Job
from proxy.relay import Background, Client, KernelRelay, Relay
from proxy.rooms import RoomPool
from proxy.taps.yfold import OutputFolder
from proxy.upstream import Upstream
from proxy.yroom import NotebookRoom

from .test_lifecycle import NoKernel, Numbered, made

KERNEL = "kernel"


class MemoryRoom(NotebookRoom):
    """A notebook room whose document lives here only: one code cell per id, synced at once."""

    cells = ("cell-1",)

    def __init__(self, path: str) -> None:
        super().__init__(cast(Upstream, None), path)

    def start(self) -> None:
        for cell_id in self.cells:
            self.notebook.append_cell(
                {"cell_type": "code", "id": cell_id, "source": "print('x')", "metadata": {},
                 "outputs": [], "execution_count": None}
            )  # fmt: skip
        self.synced.set()

    async def sent(self) -> None:
        """Nothing to send anywhere."""


class Committed:
    """A log that has everything committed: nobody is ever behind."""

    async def history(self, *args: Any) -> list[Message]:
        return []

    async def settle(self) -> None:
        pass

    async def durable(self, seq: int) -> None:
        pass


def cell(room: NotebookRoom) -> dict[str, Any]:
    ycell = room.cell("cell-1")
    assert ycell is not None
    return ycell.to_py()


def text(room: NotebookRoom) -> str:
    return "".join(o["text"] for o in cell(room)["outputs"] if o["output_type"] == "stream")


async def until(check: Callable[[], bool]) -> None:
    """Let the event loop run what was scheduled (no timer decides) until `check` holds."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def request(msg_id: str) -> Message:
    """A notebook cell's execute_request, as JupyterLab sends it."""
    return made(
        "shell", "execute_request", {"code": "print('x')"}, msg_id=msg_id,
        metadata={"cellId": "cell-1"},
    )  # fmt: skip


def stream(parent: str, line: str) -> Message:
    return made("iopub", "stream", {"name": "stdout", "text": line}, parent)


def finish(relay: KernelRelay, parent: str, count: int) -> None:
    relay.from_kernel(made("shell", "execute_reply", {"status": "ok", "execution_count": count},
                           parent))  # fmt: skip
    relay.from_kernel(made("iopub", "status", {"execution_state": "idle"}, parent))


def folded(grace: float) -> tuple[KernelRelay, OutputFolder, RoomPool]:
    rooms = RoomPool(MemoryRoom, Background())

    async def nothing_logged(work: Any) -> Any:
        return []

    folder = OutputFolder(rooms, lambda kernel_id: "notebook.ipynb", nothing_logged, grace)
    return KernelRelay(KERNEL, NoKernel(), [folder], Numbered()), folder, rooms


async def test_a_client_that_said_goodbye_is_taken_over_at_once() -> None:
    relay, folder, rooms = folded(grace=3600)
    client = Client("tab", KERNEL, "session", "v1")
    relay.attach(client)
    relay.from_client(client, request("run"))
    relay.from_kernel(stream("run", "before\n"))
    client.said_goodbye = True  # its websocket closed with a close frame
    relay.detach(client)
    await until(lambda: folder.handoffs == 1)
    room = rooms.rooms["notebook.ipynb"]
    assert text(room) == "before\n" and cell(room)["execution_state"] == "running"
    relay.from_kernel(stream("run", "after\n"))
    finish(relay, "run", 3)
    assert text(room) == "before\nafter\n"
    assert cell(room)["execution_count"] == 3 and cell(room)["execution_state"] == "idle"
    relay.close()
    folder.close()
    await rooms.close()


async def test_a_dropped_client_that_comes_back_keeps_writing_its_outputs() -> None:
    relay, folder, rooms = folded(grace=3600)
    client = Client("tab", KERNEL, "session", "v1")
    relay.attach(client)
    relay.from_client(client, request("run"))
    relay.detach(client)  # no close frame: it may reconnect within the grace period
    await until(lambda: bool(folder._takeovers))
    back = Client("tab-again", KERNEL, "session", "v1")
    relay.attach(back)  # the same session: the handoff is called off
    assert not folder._takeovers
    relay.from_kernel(stream("run", "x\n"))
    finish(relay, "run", 1)
    assert folder.handoffs == 0 and not rooms.rooms
    relay.close()
    folder.close()


async def test_the_executor_answers_with_what_the_cell_printed_and_its_prompt_answered() -> None:
    """A server-side execution: the executor's own client sends the cell; a frontend of the
    kernel is shown its input() prompt; the answer is echoed; the result and the notebook
    have the same outputs, written by the proxy only."""
    background = Background()
    rooms = RoomPool(MemoryRoom, background)

    async def nothing_logged(work: Any) -> Any:
        return []

    folder = OutputFolder(rooms, lambda kernel_id: "notebook.ipynb", nothing_logged, 3600)
    taps: list[Any] = [folder]
    relay = Relay(lambda *args: NoKernel(), taps, Numbered(), background)
    executor = ServerExecutor(
        relay, cast(Upstream, None), rooms, lambda kernel_id: "notebook.ipynb", Committed(),
        lambda: 0,
    )  # fmt: skip
    taps.append(executor)
    kernel = await relay.kernel(KERNEL)
    watching = Client("watching", KERNEL, "tab", "v1")
    kernel.attach(watching)
    job = _Job("job", KERNEL, "cell-1", None, "notebook.ipynb", "ada")
    running = asyncio.ensure_future(executor._run(job))
    await until(lambda: job.request_id is not None)
    sent = job.request_id
    assert sent is not None
    kernel.from_kernel(stream(sent, "asking\n"))
    prompt = made("stdin", "input_request", {"prompt": "name?", "password": False}, sent)
    kernel.from_kernel(prompt)
    shown = [m for m in watching._queue if m.msg_type == "input_request"]
    assert len(shown) == 1 and shown[0].parent_header["session"] == "tab"  # as if it had asked
    answer = made("stdin", "input_reply", {"value": "ada"}, prompt.msg_id, msg_id="answer")
    assert job.client is not None and job.client.protocol == INTERNAL
    kernel.from_client(job.client, answer)
    kernel.from_kernel(stream(sent, "hi ada\n"))
    finish(kernel, sent, 5)
    result = await running
    assert result["status"] == "ok" and result["execution_count"] == 5
    printed = [o["text"] for o in result["outputs"]]
    assert printed == ["asking\n", "name? ada\n", "hi ada\n"]
    written = cell(rooms.rooms["notebook.ipynb"])
    assert [o["text"] for o in written["outputs"]] == printed
    assert written["execution_count"] == 5
    await relay.close()
    folder.close()
    await rooms.close()
