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
        return self.parent_header.get("msg_id") or None

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


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as error:
        raise FrameError(f"{what} is not valid UTF-8") from error
    except ValueError as error:
        raise FrameError(f"{what} is not valid JSON") from error
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def message_from_parts(
    channel: str, parts: list[bytes], *, allowed_channels: frozenset[str], validate_body: bool
) -> Message:
    """Build a :class:`Message` from zmq-style frames, checking what routing relies on.

    `validate_body` also checks metadata and content: worth it for what frontends send (small,
    untrusted), not for the kernel's output stream.
    """
    if channel not in allowed_channels:
        raise FrameError(f"unknown channel {channel!r}")
    if len(parts) < 4:
        raise FrameError(f"a message has at least 4 parts, got {len(parts)}")
    header = _json_object(parts[0], "header")
    if not isinstance(header.get("msg_id"), str) or not isinstance(header.get("msg_type"), str):
        raise FrameError("header lacks msg_id or msg_type")
    parent_header = _json_object(parts[1], "parent_header")
    if validate_body:
        _json_object(parts[2], "metadata")
        _json_object(parts[3], "content")
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
    parts = []
    for key in ("header", "parent_header", "metadata", "content"):
        part = value.get(key, {})
        if not isinstance(part, dict):
            raise FrameError(f"{key} is not a JSON object")
        parts.append(json.dumps(part).encode())
    return message_from_parts(
        channel, [*parts, *buffers], allowed_channels=allowed_channels, validate_body=False
    )


def decode_legacy_text(text: str, *, allowed_channels: frozenset[str] = CLIENT_CHANNELS) -> Message:
    """Decode a legacy JSON text frame."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise FrameError("legacy frame is not valid JSON") from error
    return _from_legacy_dict(value, [], allowed_channels)


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
    try:
        value = json.loads(pieces[0])
    except ValueError as error:  # includes UnicodeDecodeError
        raise FrameError("binary frame's message is not valid JSON") from error
    return _from_legacy_dict(value, pieces[1:], allowed_channels)


def decode_client_frame(protocol: str, frame: bytes | str, *, max_size: int) -> Message:
    """Decode what a frontend sent, in the protocol its websocket agreed on."""
    if len(frame) > max_size:
        raise FrameError(f"frame of {len(frame)} bytes exceeds the limit of {max_size}")
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
