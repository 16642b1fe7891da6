"""The output fold, pure: no sockets."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.fold import Edit, NotebookFold, render_stream_text


def stream(text: str, name: str = "stdout") -> tuple[str, dict[str, Any]]:
    return "stream", {"name": name, "text": text}


def display(data: str, display_id: str | None = None) -> tuple[str, dict[str, Any]]:
    content: dict[str, Any] = {"data": {"text/plain": data}, "metadata": {}}
    if display_id is not None:
        content["transient"] = {"display_id": display_id}
    return "display_data", content


def fold(*messages: tuple[str, dict[str, Any]], cell: str = "c") -> NotebookFold:
    notebook = NotebookFold()
    notebook.start(cell)
    for msg_type, content in messages:
        notebook.apply(cell, msg_type, content)
    return notebook


def replay_edits(edits: list[Edit]) -> dict[str, list[dict[str, Any]]]:
    """What a writer of the Y document ends with when it applies the edits one by one."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for edit in edits:
        outputs = cells.setdefault(edit.cell, [])
        if edit.kind == "add":
            outputs.append(copy.deepcopy(edit.output))
        elif edit.kind == "set":
            outputs[edit.index] = copy.deepcopy(edit.output)
        elif edit.kind == "clear":
            outputs.clear()
        else:
            assert edit.kind == "text"
            text = outputs[edit.index]["text"]
            assert text[edit.at :] == edit.replaced  # what a Y writer deletes from the end
            outputs[edit.index]["text"] = text[: edit.at] + edit.text
    return cells


def test_consecutive_streams_of_one_name_join_and_others_do_not() -> None:
    notebook = fold(stream("a\n"), stream("b\n"), stream("oops\n", "stderr"), stream("c\n"))
    assert notebook.cells["c"].outputs == [
        {"output_type": "stream", "name": "stdout", "text": "a\nb\n"},
        {"output_type": "stream", "name": "stderr", "text": "oops\n"},
        {"output_type": "stream", "name": "stdout", "text": "c\n"},
    ]


def test_a_stream_line_is_an_append_not_a_rewrite() -> None:
    notebook = fold(stream("first\n"))
    notebook.take_edits()
    notebook.apply("c", *stream("second\n"))
    assert notebook.take_edits() == [Edit("text", "c", 0, at=6, text="second\n")]


def test_carriage_return_overwrites_the_line_as_a_terminal_does() -> None:
    """Also across messages: the cursor stays where the last chunk left it."""
    notebook = fold(stream("10%"), stream("\r50%"), stream("\r9%\n"), stream("done\n"))
    assert notebook.cells["c"].outputs[0]["text"] == "9%%\ndone\n"
    edits = notebook.take_edits()
    assert Edit("text", "c", 0, at=0, text="50%", replaced="10%") in edits  # the line only
    assert render_stream_text("a\r\nb") == "a\nb"
    assert fold(stream("aaaa\ra"), stream("b")).cells["c"].outputs[0]["text"] == "abaa"
    assert render_stream_text("progress\r") == "progress"
    assert render_stream_text("long line\rshort") == "shortline"


def test_backspace_erases_within_its_line() -> None:
    assert render_stream_text("abc\x08\x08d") == "ad"
    assert render_stream_text("a\n\x08b") == "a\nb"  # nothing before it on its line
    assert fold(stream("ab"), stream("\x08c\n")).cells["c"].outputs[0]["text"] == "ac\n"


def test_clear_output_and_clear_output_wait() -> None:
    now = fold(stream("a\n"), ("clear_output", {"wait": False}))
    assert now.cells["c"].outputs == []
    waiting = fold(stream("a\n"), ("clear_output", {"wait": True}))
    assert waiting.cells["c"].outputs[0]["text"] == "a\n"  # kept until the next output
    waiting.apply("c", *stream("b\n"))
    assert waiting.cells["c"].outputs == [
        {"output_type": "stream", "name": "stdout", "text": "b\n"}
    ]
    waiting.apply("c", "clear_output", {"wait": True})
    waiting.finish("c", {"status": "ok", "execution_count": 3})
    assert waiting.cells["c"].outputs[0]["text"] == "b\n"  # nothing came after: stays


def test_update_display_data_updates_every_output_with_the_id_in_any_cell() -> None:
    notebook = NotebookFold()
    notebook.start("one")
    notebook.apply("one", *display("v1", "bar"))
    notebook.apply("one", *stream("between\n"))
    notebook.start("two")
    notebook.apply("two", *display("v1 again", "bar"))
    notebook.apply("two", *display("unrelated", "other"))
    notebook.apply("two", "update_display_data", {
        "data": {"text/plain": "v2"}, "metadata": {}, "transient": {"display_id": "bar"},
    })  # fmt: skip
    assert notebook.cells["one"].outputs[0]["data"] == {"text/plain": "v2"}
    assert notebook.cells["one"].outputs[1]["text"] == "between\n"
    assert notebook.cells["two"].outputs[0]["data"] == {"text/plain": "v2"}
    assert notebook.cells["two"].outputs[1]["data"] == {"text/plain": "unrelated"}
    assert "transient" not in notebook.cells["two"].outputs[0]  # not part of nbformat


def test_a_cleared_cell_no_longer_receives_display_updates() -> None:
    notebook = fold(display("v1", "bar"))
    notebook.start("c")  # executed again
    notebook.apply("c", *stream("fresh\n"))
    notebook.apply("c", "update_display_data", {
        "data": {"text/plain": "v2"}, "metadata": {}, "transient": {"display_id": "bar"},
    })  # fmt: skip
    assert notebook.cells["c"].outputs == [
        {"output_type": "stream", "name": "stdout", "text": "fresh\n"}
    ]


def test_execute_result_error_and_counts() -> None:
    notebook = fold(
        ("execute_input", {"code": "1/0", "execution_count": 7}),
        ("execute_result", {"data": {"text/plain": "1"}, "metadata": {}, "execution_count": 7}),
        ("error", {"ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": ["t"]}),
    )
    cell = notebook.cells["c"]
    assert cell.running and cell.execution_count == 7
    assert cell.outputs == [
        {"output_type": "execute_result", "data": {"text/plain": "1"}, "metadata": {},
         "execution_count": 7},
        {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
         "traceback": ["t"]},
    ]  # fmt: skip
    notebook.finish("c", {"status": "error", "execution_count": 7})
    assert not cell.running and cell.execution_count == 7


def test_a_new_execution_clears_the_cell() -> None:
    notebook = fold(stream("old\n"), ("execute_input", {"execution_count": 1}))
    notebook.start("c")
    assert notebook.cells["c"].outputs == [] and notebook.cells["c"].execution_count is None


def test_a_long_stream_folds_in_linear_time() -> None:
    notebook = fold(*(stream(f"{i}\n") for i in range(100_000)))
    text = notebook.cells["c"].outputs[0]["text"]
    assert text.count("\n") == 100_000 and text.endswith("99999\n")


_pieces = st.text(alphabet="ab\r\n\x08", max_size=12)
_messages = st.lists(
    st.one_of(
        st.tuples(st.just("stream"), st.sampled_from(["stdout", "stderr"]), _pieces),
        st.tuples(st.just("display"), st.sampled_from(["x", "y", ""]), st.text("pq", max_size=3)),
        st.tuples(st.just("update"), st.sampled_from(["x", "y"]), st.text("pq", max_size=3)),
        st.tuples(st.just("clear"), st.booleans(), st.just("")),
        st.tuples(st.just("start"), st.sampled_from(["c", "d"]), st.just("")),
    ),
    max_size=30,
)


@given(_messages)
def test_edits_rebuild_exactly_the_folded_outputs(messages: list[tuple[str, Any, str]]) -> None:
    """A Y writer applying the edits (appends and line rewrites) ends where the fold ends."""
    notebook = NotebookFold()
    cell = "c"
    notebook.start(cell)
    for kind, arg, text in messages:
        if kind == "stream":
            notebook.apply(cell, "stream", {"name": arg, "text": text})
        elif kind == "display":
            notebook.apply(cell, *display(text, arg or None))
        elif kind == "update":
            notebook.apply(cell, "update_display_data", {
                "data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": arg},
            })  # fmt: skip
        elif kind == "clear":
            notebook.apply(cell, "clear_output", {"wait": arg})
        else:
            cell = arg
            notebook.start(cell)
    rebuilt = replay_edits(notebook.take_edits())
    for cell_id, state in notebook.cells.items():
        assert rebuilt.get(cell_id, []) == state.outputs


@given(st.lists(_pieces, max_size=20), st.data())
def test_how_a_stream_is_chunked_does_not_change_what_is_shown(
    pieces: list[str], data: st.DataObject
) -> None:
    whole = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    chunked = fold(*(stream(chunk) for chunk in chunks if chunk))
    outputs = chunked.cells["c"].outputs
    assert (outputs[0]["text"] if outputs else "") == render_stream_text(whole)


@given(st.lists(st.text(alphabet="aé😀\r\n\x08", max_size=8), max_size=15))
def test_edits_applied_to_a_y_cell_give_the_folded_outputs(chunks: list[str]) -> None:
    """Y Text offsets are UTF-8 bytes: the writer's translation keeps every character."""
    from pycrdt import Array, Doc, Map

    from proxy.taps.yfold import _apply

    doc = Doc()
    doc["cell"] = ycell = Map({"outputs": Array()})
    notebook = fold(*(stream(chunk) for chunk in chunks), stream("end", "stderr"))
    for edit in notebook.take_edits():
        _apply(ycell, edit)
    written = [{**output, "text": str(output["text"])} for output in ycell["outputs"].to_py()]
    assert written == notebook.cells["c"].outputs


def test_a_forgotten_cell_is_no_target_of_display_updates() -> None:
    notebook = fold(display("v1", "bar"))
    notebook.forget("c")
    notebook.start("d")
    notebook.apply("d", "update_display_data", {
        "data": {"text/plain": "v2"}, "metadata": {}, "transient": {"display_id": "bar"},
    })  # fmt: skip
    assert "c" not in notebook.cells and notebook.cells["d"].outputs == []
