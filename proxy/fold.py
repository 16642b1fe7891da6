"""The output fold: iopub messages of executions → notebook cell outputs, as JupyterLab shows them.

Pure: no sockets, no database, no Y document. ``NotebookFold`` folds the executions of one
notebook (display ids reach across its cells); ``CellOutputs`` holds one cell's outputs in
nbformat's shape. Every change is also reported as an ``Edit`` so that a writer of a
collaborative document can apply it without rewriting what did not change (a stream line is an
append, not a new text).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

#: The iopub messages that change a cell's outputs (the audit view ``outputs`` names the same).
OUTPUT_MESSAGES = frozenset(
    {"stream", "display_data", "update_display_data", "execute_result", "error", "clear_output"}
)
#: What the fold takes: the outputs, and execute_input for the cell's execution count.
FOLDED_MESSAGES = OUTPUT_MESSAGES | {"execute_input"}

_CONTROL = re.compile(r"([\r\n\x08])")


class _Terminal:
    """A stream's last line as a terminal shows it: ``\r`` returns to the start of the line
    (what follows overwrites, a longer old line keeps its tail), ``\b`` erases the character
    before the cursor, ``\n`` ends the line. The cursor is kept between chunks, so how a
    stream is cut into messages never changes what it shows."""

    def __init__(self) -> None:
        self.line = ""
        self.cursor = 0

    def feed(self, text: str) -> str:
        """Consume text; return the lines it finished (each ending in a newline)."""
        if self.cursor == len(self.line) and "\r" not in text and "\x08" not in text:
            cut = text.rfind("\n") + 1  # the common case: plain lines, appended
            if not cut:
                self.line += text
                self.cursor = len(self.line)
                return ""
            done, self.line = self.line + text[:cut], text[cut:]
            self.cursor = len(self.line)
            return done
        done = []
        for piece in _CONTROL.split(text):
            if piece == "\n":
                done.append(self.line + "\n")
                self.line, self.cursor = "", 0
            elif piece == "\r":
                self.cursor = 0
            elif piece == "\x08":
                if self.cursor:
                    self.line = self.line[: self.cursor - 1] + self.line[self.cursor :]
                    self.cursor -= 1
            elif piece:
                end = self.cursor + len(piece)
                self.line = self.line[: self.cursor] + piece + self.line[end:]
                self.cursor = end
        return "".join(done)


def render_stream_text(text: str) -> str:
    """What a stream output shows for its whole text."""
    terminal = _Terminal()
    return terminal.feed(text) + terminal.line


def stdin_echo(request: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """The stream output JupyterLab adds for an answered input() prompt: the prompt and the
    answer (dots for a password), as content of a ``stream`` message."""
    shown = "\u00b7" * 8 if request.get("password") else str(reply.get("value", ""))
    return {"name": "stdin", "text": f"{request.get('prompt', '')} {shown}\n"}


def join_text(value: Any) -> str:
    """nbformat allows multiline strings as lists of lines."""
    return "".join(value) if isinstance(value, list) else str(value)


@dataclass(frozen=True)
class Edit:
    """One change to a cell's outputs, in the order made.

    kinds: ``text`` (the stream output at ``index`` keeps its first ``at`` characters and
    continues with ``text`` instead of ``replaced``, its old end: an append when ``replaced``
    is empty), ``set`` (the output at ``index`` replaced by ``output``), ``add`` (``output``
    appended), ``clear``.
    """

    kind: str
    cell: str
    index: int = -1
    at: int = 0
    text: str = ""
    replaced: str = ""
    output: dict[str, Any] | None = None


class _Stream:
    """The text of the last stream output of a cell while it may still grow: finished lines
    are kept as chunks (joined only when read), the last line in a terminal of its own."""

    def __init__(self, output: dict[str, Any]) -> None:
        self.output = output
        self.chunks: list[str] = []
        self.head_length = 0
        self.terminal = _Terminal()

    def extend(self, text: str) -> tuple[int, str, str]:
        """Add text; return where the shown text changed, what it continues with, and what
        it no longer shows from there."""
        before = self.terminal.line
        done = self.terminal.feed(text)
        after = done + self.terminal.line
        if after.startswith(before):
            kept = len(before)  # characters of the old last line that stay as they were
        else:
            kept = 0
            while kept < min(len(before), len(after)) and before[kept] == after[kept]:
                kept += 1
        at = self.head_length + kept
        if done:
            self.chunks.append(done)
            self.head_length += len(done)
        return at, after[kept:], before[kept:]

    def text(self) -> str:
        if len(self.chunks) > 1:
            self.chunks = ["".join(self.chunks)]
        return (self.chunks[0] if self.chunks else "") + self.terminal.line


@dataclass
class CellOutputs:
    """One cell's outputs, its execution count and whether an execution is running in it."""

    _outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    running: bool = False
    _clear_pending: bool = False
    _stream: _Stream | None = None  # the last output, when it is a stream

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The outputs in nbformat's shape."""
        if self._stream is not None:
            self._stream.output["text"] = self._stream.text()
        return self._outputs


class NotebookFold:
    """Folds executions into cells. Feed it each execution's iopub messages in order."""

    def __init__(self) -> None:
        self.cells: dict[str, CellOutputs] = {}
        self.edits: list[Edit] = []
        self._displays: dict[str, list[tuple[str, int]]] = {}
        self._prompts: dict[str, tuple[str, dict[str, Any]]] = {}  # input_request id: cell, it

    def cell(self, cell_id: str) -> CellOutputs:
        return self.cells.setdefault(cell_id, CellOutputs())

    def forget(self, cell_id: str) -> None:
        """Drop a cell nobody will write into any more (its display ids with it)."""
        self.cells.pop(cell_id, None)
        self._forget_displays(cell_id)
        self._forget_prompts(cell_id)

    def take_edits(self) -> list[Edit]:
        edits, self.edits = self.edits, []
        return edits

    # --- an execution's life -----------------------------------------------------------------

    def start(self, cell_id: str) -> None:
        """An execution of the cell begins: JupyterLab clears its outputs and shows ``[*]``."""
        cell = self.cell(cell_id)
        self._clear(cell_id, cell)
        self._forget_prompts(cell_id)
        cell.running = True
        cell.execution_count = None

    def asked(self, cell_id: str, prompt_id: str, request: dict[str, Any]) -> None:
        """The cell's execution asks for input (an input_request, `prompt_id` its msg_id)."""
        self._prompts[prompt_id] = (cell_id, request)

    def answered(self, prompt_id: str, reply: dict[str, Any]) -> str | None:
        """The answer to a prompt of this fold's, echoed into its cell as JupyterLab shows it
        (a stdin stream of prompt and value); the cell, or None if the prompt is not known."""
        asked = self._prompts.pop(prompt_id, None)
        if asked is None:
            return None
        cell_id, request = asked
        self.apply(cell_id, "stream", stdin_echo(request, reply))
        return cell_id

    def _forget_prompts(self, cell_id: str) -> None:
        for prompt_id in [p for p, (cell, _) in self._prompts.items() if cell == cell_id]:
            del self._prompts[prompt_id]

    def finish(self, cell_id: str, reply: dict[str, Any] | None) -> None:
        """The execute_reply came (``reply`` is its content), or the execution was abandoned."""
        cell = self.cell(cell_id)
        cell.running = False
        cell._clear_pending = False
        if reply is not None and isinstance(reply.get("execution_count"), int):
            cell.execution_count = reply["execution_count"]

    def apply(self, cell_id: str, msg_type: str, content: dict[str, Any]) -> None:
        """Fold one iopub message of an execution of the cell."""
        cell = self.cell(cell_id)
        if msg_type == "execute_input":
            count = content.get("execution_count")
            if isinstance(count, int):
                cell.execution_count = count
        elif msg_type == "clear_output":
            if content.get("wait"):
                cell._clear_pending = True
            else:
                self._clear(cell_id, cell)
        elif msg_type == "update_display_data":
            self._update_display(content)
        elif msg_type == "stream":
            self._add_stream(cell_id, cell, content)
        elif msg_type in ("display_data", "execute_result", "error"):
            self._add(cell_id, cell, output_of(msg_type, content))
            display_id = (content.get("transient") or {}).get("display_id")
            if msg_type != "error" and isinstance(display_id, str):
                self._displays.setdefault(display_id, []).append((cell_id, len(cell._outputs) - 1))
            if msg_type == "execute_result" and isinstance(content.get("execution_count"), int):
                cell.execution_count = content["execution_count"]

    # --- outputs ------------------------------------------------------------------------------

    def _add_stream(self, cell_id: str, cell: CellOutputs, content: dict[str, Any]) -> None:
        self._clear_if_pending(cell_id, cell)
        name = content.get("name", "stdout")
        text = join_text(content.get("text", ""))
        stream = cell._stream
        if stream is None or stream.output["name"] != name:
            output = {"output_type": "stream", "name": name, "text": ""}
            self._add(cell_id, cell, output)
            stream = cell._stream = _Stream(output)
        at, continued, replaced = stream.extend(text)
        index = len(cell._outputs) - 1
        self.edits.append(Edit("text", cell_id, index, at=at, text=continued, replaced=replaced))

    def _add(self, cell_id: str, cell: CellOutputs, output: dict[str, Any]) -> None:
        self._clear_if_pending(cell_id, cell)
        if cell._stream is not None:
            cell._stream.output["text"] = cell._stream.text()
            cell._stream = None
        cell._outputs.append(output)
        self.edits.append(Edit("add", cell_id, output=copy.deepcopy(output)))

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = (content.get("transient") or {}).get("display_id")
        for cell_id, index in self._displays.get(display_id, []):
            outputs = self.cells[cell_id]._outputs
            if index < len(outputs):  # (a cleared cell drops its targets: see _forget_displays)
                outputs[index]["data"] = copy.deepcopy(content.get("data", {}))
                outputs[index]["metadata"] = copy.deepcopy(content.get("metadata", {}))
                self.edits.append(Edit("set", cell_id, index, output=copy.deepcopy(outputs[index])))

    def _clear_if_pending(self, cell_id: str, cell: CellOutputs) -> None:
        if cell._clear_pending:
            self._clear(cell_id, cell)

    def _clear(self, cell_id: str, cell: CellOutputs) -> None:
        cell._clear_pending = False
        cell._stream = None
        if cell._outputs:
            cell._outputs.clear()
            self.edits.append(Edit("clear", cell_id))
        self._forget_displays(cell_id)

    def _forget_displays(self, cell_id: str) -> None:
        self._displays = {
            display_id: kept
            for display_id, targets in self._displays.items()
            if (kept := [(c, i) for c, i in targets if c != cell_id])
        }


def output_of(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """The nbformat output of a display_data, execute_result or error message."""
    if msg_type == "error":
        return {
            "output_type": "error",
            "ename": str(content.get("ename", "")),
            "evalue": str(content.get("evalue", "")),
            "traceback": [str(line) for line in content.get("traceback", [])],
        }
    output: dict[str, Any] = {
        "output_type": msg_type,
        "data": copy.deepcopy(content.get("data", {})),
        "metadata": copy.deepcopy(content.get("metadata", {})),
    }
    if msg_type == "execute_result":
        output["execution_count"] = content.get("execution_count")
    return output
