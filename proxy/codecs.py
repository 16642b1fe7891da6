"""Pure codecs for kernel messages on jupyter-server's channels websocket.

No sockets, no asyncio: bytes in, :class:`Message` out, and back. A message is kept as the
very frames the kernel speaks over zmq (header, parent_header, metadata, content as JSON bytes,
then binary buffers), so relaying a v1 frame never re-serialises what it does not need to read.
Only header and parent_header are parsed, for routing and logging.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
LEGACY = "legacy"

#: Channels a frontend may send on; the kernel also sends on iopub.
CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})
KERNEL_CHANNELS = CLIENT_CHANNELS | {"iopub"}

_U64 = struct.Struct("<Q")


class FrameError(ValueError):
    """A websocket frame that is not a well-formed kernel message; the text is the close reason."""

    def __init__(self, reason: str, *, too_big: bool = False) -> None:
        super().__init__(reason)
        self.too_big = too_big


@dataclass(slots=True)
class Message:
    """One kernel message: its channel and its zmq frames, with header and parent parsed."""

    channel: str
    parts: list[bytes]  # header, parent_header, metadata, content, *buffers
    header: dict[str, Any]
    parent_header: dict[str, Any]
    seq: int = 0  # position in the log, set when the relay passes it on
    _encoded: dict[str, bytes | str] = field(default_factory=dict, repr=False)

    @property
    def msg_id(self) -> str:
        return self.header.get("msg_id", "")

    @property
    def msg_type(self) -> str:
        return self.header.get("msg_type", "")

    @property
    def parent_msg_id(self) -> str | None:
        parent_id = self.parent_header.get("msg_id")
        return parent_id if isinstance(parent_id, str) and parent_id else None

    @property
    def buffers(self) -> list[bytes]:
        return self.parts[4:]

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    def content(self) -> Any:
        """The parsed content (parsed on demand: the relay itself never needs it)."""
        return json.loads(self.parts[3])

    def encoded(self, protocol: str) -> bytes | str:
        """This message as a frame for `protocol`, encoded once however many clients get it."""
        frame = self._encoded.get(protocol)
        if frame is None:
            frame = encode_v1(self) if protocol == V1_SUBPROTOCOL else encode_legacy(self)
            self._encoded[protocol] = frame
        return frame


#: Deepest nesting of arrays and objects a client's message may have. The kernel protocol's
#: own messages are a few levels deep; widget state a dozen. Deeper JSON costs recursion in
#: every reader (Python's json, SQLite's JSON functions stop at 1,000), so it stops here.
MAX_JSON_DEPTH = 100
#: Header fields that must be strings when present (the log binds them; routing reads them).
HEADER_STRINGS = ("msg_id", "msg_type", "session", "username", "date", "version")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _nesting_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed value, walked without recursing; a string
    that is not Unicode text (a lone surrogate, which JSON escapes allow) is a FrameError:
    the kernel cannot encode its reply to it, and says so into whatever cell is running."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if isinstance(item, dict):
            for key in item:
                _check_text(key)
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, str | dict | list)
        )
    return deepest


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FrameError("a string is not Unicode text (a lone surrogate)") from None


def parse_json(raw: bytes | str, what: str) -> Any:
    """Strict JSON as SQLite's JSON functions and the kernel read it too: UTF-8 only (no BOM,
    no UTF-16), no NaN or Infinity, Unicode strings, at most `MAX_JSON_DEPTH` deep.
    FrameError says what is wrong."""
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FrameError(f"{what} is not valid UTF-8") from error
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FrameError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise FrameError(f"{what} is not valid JSON") from error
    if _nesting_depth(value) > MAX_JSON_DEPTH:
        raise FrameError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_object(raw: bytes, what: str, *, strict: bool) -> dict[str, Any]:
    if strict:
        value = parse_json(raw, what)
    else:  # the kernel's own output: its Session wrote it
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as error:
            raise FrameError(f"{what} is not valid JSON") from error
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _check_header_strings(header: dict[str, Any], what: str) -> None:
    for name in HEADER_STRINGS:
        if name in header and not isinstance(header[name], str):
            raise FrameError(f"{what}.{name} is not a string")


def message_from_parts(
    channel: str, parts: list[bytes], *, allowed_channels: frozenset[str], validate_body: bool
) -> Message:
    """Build a :class:`Message` from zmq-style frames, checking what routing relies on.

    `validate_body` checks everything a frontend's message must be (small, untrusted): all four
    parts strict JSON objects, the header's and parent header's fields strings. The kernel's
    output stream is checked only for what routing reads.
    """
    if len(parts) < 4:
        raise FrameError(f"a message has at least 4 parts, got {len(parts)}")
    header = _json_object(parts[0], "header", strict=validate_body)
    parent_header = _json_object(parts[1], "parent_header", strict=validate_body)
    if validate_body:
        _json_object(parts[2], "metadata", strict=True)
        _json_object(parts[3], "content", strict=True)
    return _checked(channel, parts, header, parent_header, allowed_channels, validate_body)


def _checked(
    channel: str,
    parts: list[bytes],
    header: dict[str, Any],
    parent_header: dict[str, Any],
    allowed_channels: frozenset[str],
    strict: bool,
) -> Message:
    if channel not in allowed_channels:
        raise FrameError(f"unknown channel {channel!r}")
    if not isinstance(header.get("msg_id"), str) or not isinstance(header.get("msg_type"), str):
        raise FrameError("header lacks msg_id or msg_type")
    if strict:
        _check_header_strings(header, "header")
        _check_header_strings(parent_header, "parent_header")
    return Message(channel, parts, header, parent_header)


def with_seq(message: Message) -> Message:
    """A copy whose metadata carries its log sequence number, for tools that resume by it."""
    metadata = message.parts[2].strip()
    stamp = b'{"replay_proxy_seq":%d' % message.seq
    spliced = stamp + (b"}" if metadata in (b"{}", b"") else b"," + metadata[1:])
    parts = [*message.parts[:2], spliced, *message.parts[3:]]
    return Message(message.channel, parts, message.header, message.parent_header, message.seq)


def coalesce_streams(messages: list[Message]) -> list[Message]:
    """Merge runs of stream messages of one execution and stream name into one message each.

    JupyterLab appends stream text to the output it already shows, so what it renders is the
    same; a client that fell behind receives far fewer, larger frames. A merged message keeps
    the first one's header and the last one's sequence number.
    """
    merged: list[Message] = []
    run: list[Message] = []
    run_key: tuple[str | None, str] | None = None
    texts: list[str] = []

    def close_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            first = run[0]
            content = json.dumps({"name": run_key[1], "text": "".join(texts)}).encode()  # type: ignore[index]
            parts = [first.parts[0], first.parts[1], first.parts[2], content]
            merged.append(Message("iopub", parts, first.header, first.parent_header, run[-1].seq))
        run.clear()
        texts.clear()

    for message in messages:
        key = None
        if message.channel == "iopub" and message.msg_type == "stream" and not message.buffers:
            content = message.content()
            key = (message.parent_msg_id, content.get("name", "stdout"))
        if key is None or key != run_key:
            close_run()
            run_key = key
        if key is None:
            merged.append(message)
        else:
            run.append(message)
            texts.append(content.get("text", ""))
    close_run()
    return merged


# --- v1.kernel.websocket.jupyter.org -------------------------------------------------------


def decode_v1(
    frame: bytes, *, allowed_channels: frozenset[str] = CLIENT_CHANNELS, validate_body: bool = True
) -> Message:
    """Decode a v1 binary frame: u64le count n, n u64le offsets, channel, then the parts."""
    size = len(frame)
    if size < 8:
        raise FrameError("v1 frame shorter than its offset count")
    (count,) = _U64.unpack_from(frame, 0)
    if count < 6 or 8 * (count + 1) > size:
        raise FrameError(f"v1 frame has a bad offset count {count}")
    offsets = [_U64.unpack_from(frame, 8 * (i + 1))[0] for i in range(count)]
    if offsets[0] != 8 * (count + 1) or offsets[-1] != size:
        raise FrameError("v1 frame offsets do not span the frame")
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise FrameError("v1 frame offsets are not in order")
    try:
        channel = frame[offsets[0] : offsets[1]].decode("utf-8")
    except UnicodeDecodeError as error:
        raise FrameError("v1 channel name is not valid UTF-8") from error
    parts = [frame[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
    return message_from_parts(
        channel, parts, allowed_channels=allowed_channels, validate_body=validate_body
    )


def encode_v1(message: Message) -> bytes:
    """Encode a message as a v1 binary frame."""
    channel = message.channel.encode()
    pieces = [channel, *message.parts]
    count = len(pieces) + 1
    offsets = [8 * (count + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    head = struct.pack(f"<{count + 1}Q", count, *offsets)
    return b"".join([head, *pieces])


# --- legacy JSON protocol ------------------------------------------------------------------


def _legacy_json(message: Message) -> bytes:
    # The parts already are JSON; splice them instead of parsing and dumping them again.
    p = message.parts
    return b"".join(
        [
            b'{"header":', p[0], b',"parent_header":', p[1], b',"metadata":', p[2],
            b',"content":', p[3], b',"buffers":[],"channel":', json.dumps(message.channel).encode(),
            b',"msg_id":', json.dumps(message.msg_id).encode(),
            b',"msg_type":', json.dumps(message.msg_type).encode(), b"}",
        ]
    )  # fmt: skip


def encode_legacy(message: Message) -> bytes | str:
    """Encode as jupyter-server's legacy protocol: JSON text, or a binary frame with buffers."""
    body = _legacy_json(message)
    buffers = message.buffers
    if not buffers:
        return body.decode("utf-8", "replace")
    pieces = [body, *buffers]
    offsets = [4 * (len(pieces) + 1)]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f"!{len(pieces) + 1}I", len(pieces), *offsets), *pieces])


def _from_legacy_dict(
    value: Any, buffers: list[bytes], allowed_channels: frozenset[str]
) -> Message:
    if not isinstance(value, dict):
        raise FrameError("legacy message is not a JSON object")
    channel = value.get("channel", "shell")  # jupyter-server assumes shell, so do we
    if not isinstance(channel, str):
        raise FrameError("legacy channel is not a string")
    objects = []
    for key in ("header", "parent_header", "metadata", "content"):
        part = value.get(key, {})
        if not isinstance(part, dict):
            raise FrameError(f"{key} is not a JSON object")
        objects.append(part)
    parts = [json.dumps(part).encode() for part in objects]
    header, parent_header = objects[0], objects[1]
    return _checked(channel, [*parts, *buffers], header, parent_header, allowed_channels, True)


def decode_legacy_text(text: str, *, allowed_channels: frozenset[str] = CLIENT_CHANNELS) -> Message:
    """Decode a legacy JSON text frame."""
    return _from_legacy_dict(parse_json(text, "legacy frame"), [], allowed_channels)


def decode_legacy_binary(
    frame: bytes, *, allowed_channels: frozenset[str] = CLIENT_CHANNELS
) -> Message:
    """Decode a legacy binary frame: u32be count n, n u32be offsets, the JSON, then buffers."""
    size = len(frame)
    if size < 4:
        raise FrameError("binary frame shorter than its buffer count")
    (count,) = struct.unpack_from("!I", frame, 0)
    if count < 1 or 4 * (count + 1) > size:
        raise FrameError(f"binary frame has a bad buffer count {count}")
    offsets = [*struct.unpack_from(f"!{count}I", frame, 4), size]
    if offsets[0] != 4 * (count + 1) or any(b < a for a, b in itertools.pairwise(offsets)):
        raise FrameError("binary frame offsets are out of range")
    pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(count)]
    value = parse_json(pieces[0], "binary frame's message")
    return _from_legacy_dict(value, pieces[1:], allowed_channels)


def decode_client_frame(protocol: str, frame: bytes | str, *, max_size: int) -> Message:
    """Decode what a frontend sent, in the protocol its websocket agreed on."""
    if len(frame) > max_size:
        raise FrameError(
            f"frame of {len(frame)} bytes exceeds the limit of {max_size}", too_big=True
        )
    if protocol == V1_SUBPROTOCOL:
        if isinstance(frame, str):
            raise FrameError("text frame on a v1 websocket")
        return decode_v1(frame)
    if isinstance(frame, str):
        return decode_legacy_text(frame)
    return decode_legacy_binary(frame)


def readdressed(message: Message, session: str, metadata: dict[str, Any]) -> Message:
    """A copy as if its request had come from `session`, with `metadata` added: how the proxy
    shows a frontend an input_request of an execution the frontend did not send."""
    parent = {**message.parent_header, "session": session}
    original = json.loads(message.parts[2] or b"{}")
    merged = {**(original if isinstance(original, dict) else {}), **metadata}
    parts = [message.parts[0], json.dumps(parent).encode(), json.dumps(merged).encode(),
             *message.parts[3:]]  # fmt: skip
    return Message(message.channel, parts, message.header, parent, message.seq)
