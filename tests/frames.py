"""Frames a frontend might send on a kernel's channels, well-formed or not, in both wire
protocols: the generator of the adversarial suite (``tests/test_fuzz.py``, ``bench/fuzz.py``).

Each :class:`Frame` says what the proxy must do with it: relay it (``valid``), close the
sender's websocket with 1007 and a reason (``invalid``), or either (random mutations, whose
outcome the generator does not know). Well-formed frames only carry requests a kernel answers
without running code or changing its state: a fuzzer that shuts kernels down tests the kernel,
not the proxy.
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from proxy.codecs import HEADER_STRINGS, LEGACY, MAX_JSON_DEPTH, V1_SUBPROTOCOL

VALID, INVALID, EITHER = "valid", "invalid", "either"

#: Requests the kernel answers (or ignores) without running code or changing its state.
HARMLESS = {
    "shell": ("kernel_info_request", "comm_info_request", "is_complete_request", "comm_msg",
              "comm_close", "history_request", "fuzz_request"),
    "control": ("kernel_info_request", "fuzz_request"),
    "stdin": ("input_reply",),
}  # fmt: skip
_serial = itertools.count()


@dataclass(frozen=True)
class Frame:
    protocol: str  # V1_SUBPROTOCOL or LEGACY
    data: bytes | str
    expect: str  # VALID, INVALID or EITHER
    kind: str  # what made it, for tallies
    msg_id: str | None = None  # of a valid frame: to find it in the log


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)  # fmt: skip
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
not_strings = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.lists(json_scalars, max_size=2)
    | (st.dictionaries(st.text(max_size=4), json_scalars, max_size=2))
)
not_objects = json_scalars | st.lists(json_values, max_size=3)


@dataclass
class _Message:
    """A message as raw JSON texts, so that any part can be made wrong on its own."""

    channel: Any
    header: str
    parent_header: str
    metadata: str
    content: str
    buffers: list[bytes]


def _dump(value: Any) -> str:
    return json.dumps(value)


@st.composite
def harmless_messages(draw: st.DrawFn) -> tuple[_Message, str]:
    channel = draw(st.sampled_from(sorted(HARMLESS)))
    msg_type = draw(st.sampled_from(HARMLESS[channel]))
    msg_id = f"fuzz-{next(_serial):012d}-{draw(st.uuids())}"  # unique (a reused id is refused),
    # and of one length whatever the count (later draws depend on lengths)
    header = {
        "msg_id": msg_id, "msg_type": msg_type, "session": draw(st.text(max_size=20)),
        "username": draw(st.text(max_size=12)), "date": "2026-12-06T00:00:00.000000Z",
        "version": "5.3",
    }  # fmt: skip
    parent = draw(st.just({}) | st.fixed_dictionaries({"msg_id": st.text(max_size=20)}))
    buffers = draw(st.lists(st.binary(max_size=32), max_size=2))
    message = _Message(
        channel, _dump(header), _dump(parent), _dump(draw(json_objects)),
        _dump(draw(json_objects)), buffers,
    )  # fmt: skip
    return message, msg_id


def _v1(channel: bytes, parts: list[bytes]) -> bytes:
    pieces = [channel, *parts]
    offsets = [8 * (len(pieces) + 2)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(pieces)


def encode(message: _Message, protocol: str, raw_parts: list[bytes] | None = None) -> bytes | str:
    """The message as the protocol frames it; `raw_parts` replace the v1 JSON parts' bytes."""
    if protocol == V1_SUBPROTOCOL:
        channel = message.channel if isinstance(message.channel, str) else _dump(message.channel)
        parts = raw_parts or [
            p.encode("utf-8", "surrogatepass")
            for p in (message.header, message.parent_header, message.metadata, message.content)
        ]
        return _v1(channel.encode("utf-8", "surrogatepass"), [*parts, *message.buffers])
    body = (
        f'{{"header": {message.header}, "parent_header": {message.parent_header}, '
        f'"metadata": {message.metadata}, "content": {message.content}, '
        f'"channel": {_dump(message.channel)}}}'
    )
    if not message.buffers:
        return body
    pieces = [body.encode("utf-8", "surrogatepass"), *message.buffers]
    offsets = [4 * (len(pieces) + 1)]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"!{len(pieces) + 1}I", len(pieces), *offsets) + b"".join(pieces)


_PARTS = ("header", "parent_header", "metadata", "content")


def _deep(depth: int, opener: str) -> str:
    if opener == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """One frame, of a kind drawn at random."""
    protocol = draw(st.sampled_from([V1_SUBPROTOCOL, LEGACY]))
    message, msg_id = draw(harmless_messages())
    kind = draw(st.sampled_from(_KINDS))
    if kind == "valid":
        return Frame(protocol, encode(message, protocol), VALID, kind, msg_id)
    if kind == "header field not a string":
        header = json.loads(message.header)
        header[draw(st.sampled_from(HEADER_STRINGS))] = draw(not_strings)
        message.header = _dump(header)
    elif kind == "parent field not a string":
        parent = json.loads(message.parent_header)
        parent[draw(st.sampled_from(HEADER_STRINGS))] = draw(not_strings)
        message.parent_header = _dump(parent)
    elif kind == "header lacks msg_id or msg_type":
        header = json.loads(message.header)
        del header[draw(st.sampled_from(("msg_id", "msg_type")))]
        message.header = _dump(header)
    elif kind == "part not an object":
        setattr(message, draw(st.sampled_from(_PARTS)), _dump(draw(not_objects)))
    elif kind == "nested too deep":
        # (+1: inside "x"); now and then as deep as a parser without bounds would recurse
        depth = 50_000 if draw(st.integers(0, 9)) == 0 else draw(st.integers(MAX_JSON_DEPTH, 3000))
        value = _deep(depth, draw(st.sampled_from("[{")))
        part = draw(st.sampled_from(_PARTS))
        if part == "header":
            header = json.loads(message.header)
            message.header = _dump(header)[:-1] + f', "x": {value}}}'
        else:
            setattr(message, part, f'{{"x": {value}}}')
    elif kind == "lone surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udbff\\u0041"]))
        setattr(message, draw(st.sampled_from(_PARTS[1:])), f'{{"x": "{escape}"}}')
    elif kind == "NaN or Infinity":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        setattr(message, draw(st.sampled_from(_PARTS[1:])), f'{{"x": {constant}}}')
    elif kind == "not JSON":
        part = draw(st.sampled_from(_PARTS))
        text = getattr(message, part)
        setattr(message, part, text[: draw(st.integers(0, max(0, len(text) - 1)))])
    elif kind == "unknown channel":
        message.channel = draw(st.sampled_from(["iopub", "", "hb", "Shell"]) | st.text(max_size=8))
        if message.channel in HARMLESS:
            message.channel = "iopub"
        if protocol == LEGACY and draw(st.booleans()):
            message.channel = draw(not_strings.filter(lambda v: v is not None))
    elif kind == "not UTF-8" and protocol == V1_SUBPROTOCOL:
        index = draw(st.integers(0, 3))
        parts = [getattr(message, p).encode() for p in _PARTS]
        how = draw(st.sampled_from(["bytes", "utf-16", "bom"]))
        if how == "bytes":
            parts[index] = parts[index][:-1] + b'"\xff\xfe"' + parts[index][-1:]
            if parts[index] == b'{"\xff\xfe"}':
                parts[index] = b'{"\xff\xfe": 1}'
        elif how == "utf-16":
            parts[index] = getattr(message, _PARTS[index]).encode("utf-16")
        else:
            parts[index] = b"\xef\xbb\xbf" + parts[index]
        return Frame(protocol, encode(message, protocol, parts), INVALID, kind)
    elif kind == "not UTF-8":  # legacy: a binary frame whose JSON is not UTF-8
        message.buffers = message.buffers or [b"x"]
        frame = bytearray(encode(message, protocol))  # type: ignore[arg-type]
        start = struct.unpack_from("!I", frame, 4)[0]
        frame[start + 1 : start + 1] = b"\xff"
        return Frame(protocol, _fix_legacy_offsets(bytes(frame), 1), INVALID, kind)
    elif kind == "text on v1" and protocol == V1_SUBPROTOCOL:
        return Frame(protocol, encode(message, LEGACY), INVALID, kind)  # type: ignore[arg-type]
    elif kind == "text on v1":
        return Frame(protocol, draw(st.text(max_size=64)), INVALID, "legacy text not JSON object")
    elif kind == "bad offsets":
        return _bad_offsets(draw, message, protocol)
    elif kind == "mutated":
        frame = encode(message, protocol)
        raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, max(0, len(data) - 1)))
            action = draw(st.sampled_from(["flip", "insert", "delete"]))
            if action == "flip" and data:
                data[position] ^= 1 << draw(st.integers(0, 7))
            elif action == "insert":
                data[position:position] = draw(st.binary(min_size=1, max_size=4))
            elif data:
                del data[position]
        mutated: bytes | str = bytes(data)
        if isinstance(frame, str):
            mutated = bytes(data).decode("utf-8", "replace")
        return Frame(protocol, mutated, EITHER, kind)
    else:  # random bytes, or random text
        data = draw(st.binary(max_size=200) | st.text(max_size=200))
        return Frame(protocol, data, EITHER, "random")
    return Frame(protocol, encode(message, protocol), INVALID, kind)


def _fix_legacy_offsets(frame: bytes, grown_piece: int) -> bytes:
    """A legacy binary frame one byte longer in piece 0: shift the later offsets."""
    count = struct.unpack_from("!I", frame)[0]
    offsets = list(struct.unpack_from(f"!{count}I", frame, 4))
    offsets[grown_piece:] = [o + 1 for o in offsets[grown_piece:]]
    return struct.pack(f"!{count + 1}I", count, *offsets) + frame[4 * (count + 1) :]


def _bad_offsets(draw: st.DrawFn, message: _Message, protocol: str) -> Frame:
    if protocol == LEGACY:
        message.buffers = message.buffers or [b"x"]
    frame = bytearray(encode(message, protocol))  # type: ignore[arg-type]
    width, fmt = (8, "<Q") if protocol == V1_SUBPROTOCOL else (4, "!I")
    count = struct.unpack_from(fmt, frame)[0]
    how = draw(st.sampled_from(["count", "offset", "truncate", "tiny"]))
    if how == "tiny":
        return Frame(
            protocol, bytes(frame[: draw(st.integers(0, width - 1))]), INVALID, "bad offsets"
        )
    if how == "truncate":
        cut = draw(st.integers(0, len(frame) - 1))
        return Frame(protocol, bytes(frame[:cut]), EITHER, "bad offsets")
    index = 0 if how == "count" else draw(st.integers(1, count))
    old = struct.unpack_from(fmt, frame, width * index)[0]
    new = draw(st.integers(0, 2 ** (8 * width) - 1).filter(lambda v: v != old))
    struct.pack_into(fmt, frame, width * index, new)
    return Frame(protocol, bytes(frame), EITHER, "bad offsets")


_KINDS = (
    "valid", "valid", "valid", "header field not a string", "parent field not a string",
    "header lacks msg_id or msg_type", "part not an object", "nested too deep",
    "NaN or Infinity", "lone surrogate", "not JSON", "unknown channel", "not UTF-8", "text on v1",
    "bad offsets", "mutated", "mutated", "random",
)  # fmt: skip
