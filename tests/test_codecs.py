"""The pure codecs, checked against jupyter-server's own serialisers and fuzzed."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from proxy.codecs import (
    HEADER_STRINGS,
    KERNEL_CHANNELS,
    V1_SUBPROTOCOL,
    FrameError,
    Message,
    decode_client_frame,
    decode_legacy_binary,
    decode_legacy_text,
    decode_v1,
    encode_legacy,
    encode_v1,
    message_from_parts,
    readdressed,
)

from .frames import INVALID, VALID, Frame, frames

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
headers = st.fixed_dictionaries(
    {"msg_id": st.text(min_size=1), "msg_type": st.text(min_size=1)},
    optional={"session": st.text(), "username": st.text(), "date": st.text()},
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    channel = draw(st.sampled_from(sorted(KERNEL_CHANNELS)))
    header = draw(headers)
    parent = draw(st.one_of(st.just({}), headers))
    metadata = draw(st.dictionaries(st.text(), json_values, max_size=3))
    content = draw(st.dictionaries(st.text(), json_values, max_size=3))
    buffers = draw(st.lists(st.binary(max_size=64), max_size=3))
    parts = [json.dumps(p).encode() for p in (header, parent, metadata, content)] + buffers
    return message_from_parts(channel, parts, allowed_channels=KERNEL_CHANNELS, validate_body=True)


@given(messages())
def test_v1_matches_jupyter_server(message: Message) -> None:
    ours = encode_v1(message)
    assert ours == serialize_msg_to_ws_v1(message.parts, message.channel)
    channel, parts = deserialize_msg_from_ws_v1(ours)
    assert (channel, parts) == (message.channel, message.parts)
    decoded = decode_v1(ours, allowed_channels=KERNEL_CHANNELS)
    assert (decoded.channel, decoded.parts) == (message.channel, message.parts)
    assert decoded.header == message.header and decoded.parent_header == message.parent_header


@given(messages())
def test_legacy_is_what_jupyter_server_reads(message: Message) -> None:
    frame = encode_legacy(message)
    if message.buffers:
        assert isinstance(frame, bytes)
        theirs = deserialize_binary_message(frame)
        assert theirs["buffers"] == message.buffers
        ours = decode_legacy_binary(frame, allowed_channels=KERNEL_CHANNELS)
    else:
        assert isinstance(frame, str)
        theirs = json.loads(frame)
        ours = decode_legacy_text(frame, allowed_channels=KERNEL_CHANNELS)
    assert theirs["channel"] == message.channel
    assert theirs["content"] == json.loads(message.parts[3])
    assert theirs["msg_id"] == message.msg_id and theirs["msg_type"] == message.msg_type
    assert ours.channel == message.channel and ours.header == message.header
    assert [json.loads(p) for p in ours.parts[:4]] == [json.loads(p) for p in message.parts[:4]]
    assert ours.buffers == message.buffers


@given(messages())
def test_legacy_binary_from_jupyter_server_decodes(message: Message) -> None:
    body = {
        "header": message.header,
        "parent_header": message.parent_header,
        "metadata": json.loads(message.parts[2]),
        "content": json.loads(message.parts[3]),
        "channel": message.channel,
        "buffers": [*message.buffers, b"x"],
    }
    decoded = decode_legacy_binary(serialize_binary_message(body), allowed_channels=KERNEL_CHANNELS)
    assert decoded.buffers == [*message.buffers, b"x"]
    assert decoded.header == message.header


@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_v1_decoder(frame: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_client_frame(V1_SUBPROTOCOL, frame, max_size=1 << 20)


@given(st.binary(max_size=512) | st.text(max_size=256))
def test_random_frames_never_crash_the_legacy_decoder(frame: bytes | str) -> None:
    with contextlib.suppress(FrameError):
        decode_client_frame("legacy", frame, max_size=1 << 20)


@given(messages(), st.data())
def test_corrupted_v1_offsets_are_frame_errors(message: Message, data: st.DataObject) -> None:
    frame = bytearray(encode_v1(message))
    count = struct.unpack_from("<Q", frame)[0]
    index = data.draw(st.integers(0, count))
    struct.pack_into("<Q", frame, 8 * index, data.draw(st.integers(0, 2**64 - 1)))
    try:
        decoded = decode_v1(bytes(frame), allowed_channels=KERNEL_CHANNELS)
    except FrameError:
        return
    # accepted only where the offsets still cut the frame into its parts exactly (e.g. a moved
    # boundary between two buffers): nothing read out of bounds, overlapping or skipped
    assert encode_v1(decoded) == bytes(frame)


def test_clients_may_not_send_on_iopub() -> None:
    message = message_from_parts(
        "iopub", [b'{"msg_id":"a","msg_type":"status"}', b"{}", b"{}", b"{}"],
        allowed_channels=KERNEL_CHANNELS, validate_body=True,
    )  # fmt: skip
    with pytest.raises(FrameError, match="unknown channel"):
        decode_client_frame(V1_SUBPROTOCOL, encode_v1(message), max_size=1 << 20)


def test_oversized_frame_is_refused_before_parsing() -> None:
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_client_frame(V1_SUBPROTOCOL, b"\0" * 100, max_size=10)


def test_legacy_without_channel_means_shell_like_jupyter_server() -> None:
    message = decode_legacy_text(
        json.dumps({"header": {"msg_id": "m", "msg_type": "kernel_info_request"}})
    )
    assert message.channel == "shell"
    assert message.parts[1:4] == [b"{}", b"{}", b"{}"]


def test_message_is_encoded_once_per_protocol() -> None:
    message = message_from_parts(
        "iopub", [b'{"msg_id":"a","msg_type":"status"}', b"{}", b"{}", b"{}"],
        allowed_channels=KERNEL_CHANNELS, validate_body=False,
    )  # fmt: skip
    assert message.encoded(V1_SUBPROTOCOL) is message.encoded(V1_SUBPROTOCOL)
    assert message.encoded("legacy") is message.encoded("legacy")


@given(messages(), st.text(), st.dictionaries(st.text(), json_values, max_size=3))
def test_readdressed_changes_only_the_requester_and_adds_metadata(
    message: Message, session: str, extra: dict
) -> None:
    copy = readdressed(message, session, extra)
    decoded = decode_v1(encode_v1(copy), allowed_channels=KERNEL_CHANNELS)
    assert decoded.parent_header == {**message.parent_header, "session": session}
    assert json.loads(decoded.parts[2]) == {**json.loads(message.parts[2]), **extra}
    assert decoded.parts[0] == message.parts[0] and decoded.parts[3:] == message.parts[3:]
    assert json.loads(message.parts[1]) == message.parent_header  # the original is untouched


@settings(max_examples=400, deadline=None)
@given(frames())
def test_every_generated_frame_gets_the_verdict_it_should(frame: Frame) -> None:
    """The fuzz generator's frames, straight through the decoder: a valid frame decodes, an
    invalid one is a FrameError, and whatever decodes is what the relay and the log rely on."""
    try:
        message = decode_client_frame(frame.protocol, frame.data, max_size=1 << 20)
    except FrameError as error:
        assert frame.expect != VALID, f"{frame.kind}: {error}"
        assert str(error)
        return
    assert frame.expect != INVALID, frame.kind
    assert message.channel in ("shell", "control", "stdin")
    for field in HEADER_STRINGS:
        for header in (message.header, message.parent_header):
            assert isinstance(header.get(field, ""), str)
    for part in message.parts[:4]:  # strict JSON objects, as SQLite's JSON functions read them
        assert isinstance(json.loads(part.decode("utf-8"), parse_constant=_no_constant), dict)


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in a relayed message")


@pytest.mark.parametrize("protocol", [V1_SUBPROTOCOL, "legacy"])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_json_nested_50000_deep_is_a_frame_error(protocol: str, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    deep = opener * 50_000 + "1" + closer * 50_000
    header = '{"msg_id": "m", "msg_type": "kernel_info_request"}'
    if protocol == V1_SUBPROTOCOL:
        frame: bytes | str = _raw_v1("shell", [header, "{}", "{}", '{"x": ' + deep + "}"])
    else:
        frame = f'{{"header": {header}, "content": {{"x": {deep}}}, "channel": "shell"}}'
    with pytest.raises(FrameError, match="nested deeper than 100 levels"):
        decode_client_frame(protocol, frame, max_size=1 << 20)


def _raw_v1(channel: str, parts: list[str | bytes]) -> bytes:
    pieces = [channel.encode(), *(p.encode() if isinstance(p, str) else p for p in parts)]
    offsets = [8 * (len(pieces) + 2)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(pieces)


_HEADER = '{"msg_id": "m", "msg_type": "kernel_info_request"}'


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([_HEADER, "{}", "{}", '{"x": NaN}'], "content is not valid JSON"),
        ([_HEADER, "{}", '{"x": -Infinity}', "{}"], "metadata is not valid JSON"),
        ([_HEADER, "{}", "{}", b"\xef\xbb\xbf{}"], "content is not valid JSON"),
        ([_HEADER, "{}", "{}", "{}".encode("utf-16")], "content is not valid UTF-8"),
        ([_HEADER, '{"msg_id": {"a": 1}}', "{}", "{}"], "parent_header.msg_id is not a string"),
        (['{"msg_id": "m", "msg_type": "x", "session": 1}', "{}", "{}", "{}"],
         "header.session is not a string"),
        (['{"msg_id": "m", "msg_type": "x", "date": null}', "{}", "{}", "{}"],
         "header.date is not a string"),
        ([_HEADER, "{}", "{}", '{"n": ' + "9" * 5000 + "}"], "content is not valid JSON"),
        ([_HEADER, "{}", '{"x": "\\ud800"}', "{}"], "lone surrogate"),
        ([_HEADER, '{"\\udfff": 1}', "{}", "{}"], "lone surrogate"),
    ],
)  # fmt: skip
def test_what_json_or_the_log_cannot_take_is_a_frame_error(
    parts: list[str | bytes], reason: str
) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_client_frame(V1_SUBPROTOCOL, _raw_v1("shell", parts), max_size=1 << 20)


def test_a_legacy_parent_msg_id_object_is_a_frame_error() -> None:
    frame = json.dumps(
        {"header": {"msg_id": "m", "msg_type": "x"}, "parent_header": {"msg_id": {"a": 1}}}
    )
    with pytest.raises(FrameError, match=r"parent_header\.msg_id is not a string"):
        decode_client_frame("legacy", frame, max_size=1 << 20)


def test_a_kernels_odd_parent_msg_id_routes_as_none() -> None:
    """The kernel's own messages are not checked field by field; routing reads what it can."""
    message = message_from_parts(
        "iopub", [b'{"msg_id":"a","msg_type":"status"}', b'{"msg_id": ["x"]}', b"{}", b"{}"],
        allowed_channels=KERNEL_CHANNELS, validate_body=False,
    )  # fmt: skip
    assert message.parent_msg_id is None
