"""The wire codec: every frame sequence parses to a request or a precise error, never raises."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from router import protocol
from router.client import BadRequest, Similarity, UnknownVersion, decode_reply, encode_request

IDENT = b"\x00peer"
TAG = protocol.PROTOCOL  # b"ZP1": frames below are spelled as a producer sends them


def test_well_framed_request_parses() -> None:
    req = protocol.parse_request([IDENT, TAG, b"r1", b"similarity", b"v2", b'{"pairs": []}'])
    assert isinstance(req, protocol.Request)
    assert (req.envelope, req.request_id, req.op, req.version) == ([IDENT], b"r1",
                                                                   b"similarity", "v2")
    assert req.body == b'{"pairs": []}'


def test_req_socket_delimiter_is_kept_in_the_envelope() -> None:
    req = protocol.parse_request([IDENT, b"", TAG, b"r1", b"ping", b"", b"{}"])
    assert isinstance(req, protocol.Request)
    assert req.envelope == [IDENT, b""]
    assert protocol.reply_frames(req.envelope, req.request_id, protocol.STATUS_OK, b"{}")[:3] == [
        IDENT, b"", TAG]


def test_wrong_tag_is_answered_when_the_id_is_readable() -> None:
    err = protocol.parse_request([IDENT, b"ZP9", b"r1", b"ping", b"", b"{}"])
    assert isinstance(err, protocol.FrameError)
    assert (err.request_id, err.code) == (b"r1", protocol.BAD_REQUEST)


def test_unknown_op_and_frame_count_are_bad_requests() -> None:
    for frames in ([IDENT, TAG, b"r", b"sing", b"", b"{}"],
                   [IDENT, TAG, b"r", b"ping", b""],
                   [IDENT, TAG, b"r", b"ping", b"", b"{}", b"extra"],
                   [IDENT, TAG, b"r", b"ping", b"\xff\xfe", b"{}"]):
        err = protocol.parse_request(frames)
        assert isinstance(err, protocol.FrameError) and err.code == protocol.BAD_REQUEST
        assert err.request_id == b"r"


def test_messages_without_a_readable_id_are_dropped() -> None:
    for frames in ([IDENT], [IDENT, TAG], [IDENT, TAG, b"", b"ping", b"", b"{}"],
                   [IDENT, TAG, b"x" * 65, b"ping", b"", b"{}"], [],
                   [IDENT, b""], [IDENT, b"", TAG], [IDENT, b"", TAG, b"", b"ping"]):
        err = protocol.parse_request(frames)
        assert isinstance(err, protocol.FrameError) and err.request_id is None


def test_error_messages_say_what_is_wrong() -> None:
    cases = {
        (b"ZP9", b"r", b"ping", b"", b"{}"): "protocol tag must be ZP1, got b'ZP9'",
        (TAG, b"r", b"ping"): "expected 5 frames",
        (TAG, b"r", b"sing", b"", b"{}"): "unknown op b'sing'",
        (TAG, b"r", b"ping", b"\xff", b"{}"): "version is not UTF-8",
    }
    for frames, message in cases.items():
        err = protocol.parse_request([IDENT, *frames])
        assert isinstance(err, protocol.FrameError) and message in err.message


def test_an_empty_body_is_a_bad_request_for_every_op() -> None:
    for op in sorted(protocol.OPS):
        err = protocol.parse_request([IDENT, TAG, b"r", op, b"", b""])
        assert isinstance(err, protocol.FrameError)
        assert (err.request_id, err.code) == (b"r", protocol.BAD_REQUEST)
        assert "body is empty" in err.message


def test_the_router_checks_ping_bodies_since_it_answers_them() -> None:
    for body in (b"{}", b'{"timeout_ms": 5}', b'{"anything": [1, 2]}'):
        request = protocol.parse_request([IDENT, TAG, b"r", b"ping", b"", body])
        assert isinstance(request, protocol.Request)
    for body in (b"nope", b"[]", b'"x"', b'{"timeout_ms": 0}', b'{"timeout_ms": true}',
                 b"\xff{}", b"{}" + b" " * protocol.MAX_PING_BODY):
        err = protocol.parse_request([IDENT, TAG, b"r", b"ping", b"", body])
        assert isinstance(err, protocol.FrameError), body
        assert (err.request_id, err.code) == (b"r", protocol.BAD_REQUEST)


def test_request_id_of_64_bytes_is_accepted() -> None:
    request = protocol.parse_request([IDENT, TAG, b"x" * 64, b"ping", b"", b"{}"])
    assert isinstance(request, protocol.Request)


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_any_frames_give_a_request_or_an_error(frames: list[bytes]) -> None:
    result = protocol.parse_request([IDENT, *frames])
    assert isinstance(result, protocol.Request | protocol.FrameError)
    if isinstance(result, protocol.FrameError) and result.request_id is not None:
        assert 1 <= len(result.request_id) <= protocol.MAX_REQUEST_ID
        assert result.code in protocol.ERROR_CODES


@given(st.binary(min_size=1, max_size=64), st.sampled_from(sorted(protocol.OPS)),
       st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1)))
def test_client_encoding_round_trips_through_the_router_codec(
    rid: bytes, op: bytes, version: str, body: dict
) -> None:
    req = protocol.parse_request([IDENT, *encode_request(rid, op, version, body)])
    assert isinstance(req, protocol.Request)
    assert (req.request_id, req.op, req.version) == (rid, op, version)
    assert orjson.loads(req.body) == body


def test_client_decodes_results_and_typed_errors() -> None:
    ok = decode_reply(protocol.OP_SIMILARITY,
                      [TAG, b"r", b"ok", b'{"scores":[0.5],"version":"v1"}'])
    assert ok == Similarity([0.5], "v1")
    err = decode_reply(protocol.OP_EMBED,
                       protocol.error_frames([], b"r", protocol.UNKNOWN_VERSION, "nope"))
    assert isinstance(err, UnknownVersion) and err.code == "unknown_version"
    bad = decode_reply(protocol.OP_EMBED,
                       protocol.error_frames([], b"r", protocol.BAD_REQUEST, "x"))
    assert isinstance(bad, BadRequest)


timeout_values = (st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.booleans()
                  | st.none() | st.text(max_size=5))


@given(timeout_values)
@example(2**64 - 1)  # the largest integer orjson reads as one
@example(2**64)  # read back as a float: refused
@example(True)
def test_the_router_reads_only_a_valid_timeout_ms(value: object) -> None:
    try:
        body = orjson.dumps({"pairs": [["a", "b"]], "timeout_ms": value})
    except orjson.JSONEncodeError:  # beyond 64 bits, as a producer elsewhere may send it
        body = b'{"timeout_ms": %d}' % value
    try:
        decoded = orjson.loads(body)["timeout_ms"]
    except orjson.JSONDecodeError:
        decoded = None  # the worker answers bad_request: not JSON it can read
    # What a JSON decoder reads back must be that very integer (orjson reads integers beyond
    # 64 bits as floats, which the worker refuses too).
    valid = type(decoded) is int and decoded == value and decoded > 0
    assert protocol.peek_timeout_ms(body) == (value if valid else None)


def test_bodies_without_timeout_ms_are_not_decoded() -> None:
    assert protocol.peek_timeout_ms(b"not json at all") is None
    padding = b" " * protocol.PEEK_MAX_BYTES  # too big to decode in the router: the worker's job
    assert protocol.peek_timeout_ms(b'{"timeout_ms": 5}' + padding) is None
    assert protocol.peek_timeout_ms(b'{"timeout_ms": 5}' + padding[:-100]) == 5
    assert protocol.peek_timeout_ms(b'[{"timeout_ms": 5}]') is None
    assert protocol.peek_timeout_ms(b'{"timeout_ms": 5, ') is None


def test_the_protocol_tag_is_the_public_contract() -> None:
    # Every test spells frames with protocol.PROTOCOL; this pins what it is on the wire.
    assert protocol.PROTOCOL == b"ZP1"


def test_importing_the_client_loads_no_server_code() -> None:
    """A producer's `from router import Client` must not pull in the broker, the ZAP handler,
    the pool or the tooling: a fresh interpreter shows exactly what it loads."""
    code = ("import sys; from router import Client; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('router', 'pool', 'tooling', 'cli')))")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120, check=True)
    loaded = ast.literal_eval(done.stdout.strip())
    assert loaded == ["router", "router.client", "router.failover", "router.keys",
                      "router.protocol"], loaded


OPS = st.sampled_from([protocol.OP_SIMILARITY, protocol.OP_EMBED, protocol.OP_PING])


@given(requests=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**63), OPS,
                                   st.binary(max_size=300)), max_size=20))
def test_backend_request_entries_round_trip(requests: list[tuple[int, int, bytes, bytes]]) -> None:
    packed = b"".join(protocol.request_entry(*request) for request in requests)
    assert [(int.from_bytes(seq, "little"), at, op, body)
            for seq, at, op, body in protocol.split_requests(packed)] == requests


@given(replies=st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                  st.sampled_from([protocol.STATUS_OK, protocol.STATUS_ERROR]),
                                  st.binary(max_size=300)), max_size=20))
def test_backend_reply_entries_round_trip(replies: list[tuple[int, bytes, bytes]]) -> None:
    packed = b"".join(protocol.reply_entry(seq.to_bytes(protocol.SEQ_BYTES, "little"), status,
                                           body) for seq, status, body in replies)
    assert protocol.split_replies(packed) == replies


@given(body=st.binary(min_size=1, max_size=50), cut=st.integers(1, 200))
def test_a_truncated_packed_frame_is_refused_not_misread(body: bytes, cut: int) -> None:
    packed = protocol.reply_entry(b"\x01" * protocol.SEQ_BYTES, protocol.STATUS_OK, body) * 2
    truncated = packed[:max(0, len(packed) - cut)]
    whole_entries = len(truncated) in (0, len(packed) // 2)
    if whole_entries:
        assert len(protocol.split_replies(truncated)) == len(truncated) * 2 // len(packed)
    else:
        with pytest.raises(protocol.BadEntries, match="ends inside"):
            protocol.split_replies(truncated)
