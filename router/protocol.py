"""Wire protocol v1 (public contract, see docs/protocol.md) and the internal backend frames.

Frontend request:  [b"ZP1", request_id, op, version, body]
Frontend reply:    [b"ZP1", request_id, status, body]

The router reads frames only; bodies stay opaque bytes until a worker decodes them. The one
exception is ping, which the router answers itself: its (tiny) body is checked here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

PROTOCOL = b"ZP1"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
ENDPOINT_ENV = "ZEROPOOL_ENDPOINT"  # where clients connect when no endpoint is given
MAX_REQUEST_ID = 64
MAX_PING_BODY = 1024  # bytes; a ping body is `{}` or `{"timeout_ms": n}`

OP_SIMILARITY = b"similarity"
OP_EMBED = b"embed"
OP_PING = b"ping"
OPS = frozenset({OP_SIMILARITY, OP_EMBED, OP_PING})

STATUS_OK = b"ok"
STATUS_ERROR = b"error"
# A request's outcome where reports and counters spell it as text: "ok", or its error code.
OK_CODE = STATUS_OK.decode()

# Error codes (the body of an error reply is {"code": ..., "message": ...}, and "at" where
# one item of the request is at fault: its place in the body, as a JSON path).
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNKNOWN_VERSION = "unknown_version"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
WORKER_FAILED = "worker_failed"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"
# Replies that say the pool, not the producer, fell short: these count against health, a
# bake's judge and a worker's error count. bad_request, too_large and unknown_version are the
# producer's own.
POOL_FAULTS = frozenset({INTERNAL, WORKER_FAILED, TIMEOUT, OVERLOADED})
ERROR_CODES = frozenset(
    {
        BAD_REQUEST,
        TOO_LARGE,
        UNKNOWN_VERSION,
        OVERLOADED,
        TIMEOUT,
        WORKER_FAILED,
        SHUTTING_DOWN,
        INTERNAL,
    }
)

# Backend frames between the router (ROUTER) and workers (DEALER). Internal: not a contract.
# One request message carries every request the router hands a worker at once, and one reply
# message every reply of a forward pass, packed into one frame as entries back to back: the
# router and the worker pay per message, not per request. (A frame per head and body cost
# ~8 us a request on each hop, through pyzmq and libzmq; copying a body into the packed frame
# costs far less: docs/benchmarks.md, session 10.)
W_READY = b"R"  # worker -> router: [W_READY, json info]
W_HEARTBEAT = b"H"  # worker -> router: [W_HEARTBEAT, json counters]
W_REPLY = b"P"  # worker -> router: [W_REPLY, reply entries]
W_REQUEST = b"Q"  # router -> worker: [W_REQUEST, request entries]
W_STOP = b"S"  # router -> worker: [W_STOP]
W_FAILED = b"F"  # worker -> router: [W_FAILED, why its model did not load, one line], then exit
SEQ_BYTES = 8  # a request's sequence number on the backend, little-endian
# A request entry: seq, when the router took it (monotonic ns), len(op), len(body); then the
# op and the producer's body. A reply entry: the seq as received, len(status), len(body);
# then the status and the body.
_REQUEST_ENTRY = struct.Struct("<QQBI")
_REPLY_ENTRY = struct.Struct(f"<{SEQ_BYTES}sBI")


class BadEntries(ValueError):
    """A packed backend frame that does not parse (a bug in its sender)."""


@dataclass(slots=True)
class Request:
    """A well-framed frontend request. `envelope` is what must precede the reply frames."""

    envelope: list[bytes]
    request_id: bytes
    op: bytes
    version: str
    body: bytes


@dataclass(slots=True)
class FrameError:
    """A frontend message that cannot be served. `request_id` is None when no reply is possible."""

    envelope: list[bytes]
    request_id: bytes | None
    code: str
    message: str


def parse_request(frames: list[bytes]) -> Request | FrameError:
    """Split a message received on the frontend ROUTER; never raises.

    frames[0] is the peer identity added by the ROUTER. A REQ peer (or a DEALER imitating
    one) puts an empty delimiter before the protocol tag; it is echoed back in the envelope.
    Whenever a request_id is readable (frame 1 after the envelope, 1 to 64 bytes) the error
    carries it and gets a reply; otherwise the message is dropped (request_id None).
    """
    if not frames:
        return FrameError([], None, BAD_REQUEST, "empty message")
    split = 2 if len(frames) > 1 and frames[1] == b"" else 1
    envelope, rest = frames[:split], frames[split:]
    if len(rest) < 2:
        return FrameError(envelope, None, BAD_REQUEST, "no request_id frame")
    request_id = rest[1]
    if not 0 < len(request_id) <= MAX_REQUEST_ID:
        return FrameError(envelope, None, BAD_REQUEST,
                          f"request_id of {len(request_id)} bytes; must be 1 to {MAX_REQUEST_ID}")

    def bad(message: str) -> FrameError:
        return FrameError(envelope, request_id, BAD_REQUEST, message)

    if rest[0] != PROTOCOL:
        return bad(f"protocol tag must be {PROTOCOL.decode()}, got {rest[0][:16]!r}")
    if len(rest) != 5:
        return bad(f"expected 5 frames [ZP1, request_id, op, version, body], got {len(rest)}")
    op = rest[2]
    if op not in OPS:
        return bad(f"unknown op {op[:32]!r}; expected similarity, embed or ping")
    try:
        version = rest[3].decode("utf-8")
    except UnicodeDecodeError:
        return bad("version is not UTF-8")
    body = rest[4]
    if not body:
        return bad("body is empty; expected a JSON object ({} for ping)")
    if op == OP_PING:
        problem = ping_body_problem(body)
        if problem is not None:
            return bad(problem)
    return Request(envelope, request_id, op, version, body)


def ping_body_problem(body: bytes) -> str | None:
    """What is wrong with a ping body (the router answers ping without a worker), or None."""
    if len(body) > MAX_PING_BODY:
        return f"ping body of {len(body)} bytes; expected {{}} (at most {MAX_PING_BODY} bytes)"
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"body is not UTF-8 JSON: {exc}"
    if not isinstance(doc, dict):
        return "body must be a JSON object"
    return timeout_ms_problem(doc.get("timeout_ms"))


TIMEOUT_MS_KEY = b'"timeout_ms"'
# The router decodes a body for its timeout_ms only up to this size: decoding blocks the one
# event loop every producer shares (a 64 MiB body takes ~100 ms). Bigger bodies have their
# timeout_ms enforced by the worker alone.
PEEK_MAX_BYTES = 1 << 20


def timeout_ms_problem(value: object) -> str | None:
    """The optional `timeout_ms` of any body: absent (None) or a positive integer."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return "timeout_ms must be a positive integer"


def peek_timeout_ms(body: bytes) -> int | None:
    """A body's valid `timeout_ms`, or None. Bodies without the key, or over PEEK_MAX_BYTES,
    are not decoded; the worker validates every body in full (an invalid value gets
    bad_request there)."""
    if len(body) > PEEK_MAX_BYTES or TIMEOUT_MS_KEY not in body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("timeout_ms") if isinstance(doc, dict) else None
    return value if value is not None and timeout_ms_problem(value) is None else None


# The optional request key that, set to false, refuses a text over the model's input limit
# (too_large) instead of embedding its first tokens (text-embeddings-inference's `truncate`).
TRUNCATE_KEY = "truncate"
# The optional request key naming one of the model's prompts (sentence-transformers'
# config_sentence_transformers.json: e5's "query", "passage"), put before each of its texts;
# absent, the model's default prompt, if it declares one.
PROMPT_NAME_KEY = "prompt_name"


def prompt_name_problem(value: object) -> str | None:
    """The optional `prompt_name` of a similarity or embed body: absent (None) or a name."""
    if value is None or (isinstance(value, str) and value):
        return None
    return "must name one of the model's prompts (a non-empty string)"

JsonPath = Sequence[str | int]  # a place in a JSON body: ("pairs", 2, 1) is pairs[2][1]


def path_text(at: JsonPath) -> str:
    """A JSON path as error messages name it: ("pairs", 2, 1) -> "pairs[2][1]"."""
    head, *rest = at
    return str(head) + "".join(f"[{key}]" for key in rest)


def error_body(code: str, message: str, at: JsonPath | None = None) -> bytes:
    """An error reply's body; `at` (optional) is the item at fault, and `message` then begins
    with `path_text(at)`, so that a gateway can name the item in its callers' terms."""
    if at is None:
        return orjson.dumps({"code": code, "message": message})
    return orjson.dumps({"code": code, "message": message, "at": list(at)})


def reply_frames(
    envelope: list[bytes], request_id: bytes, status: bytes, body: bytes
) -> list[bytes]:
    return [*envelope, PROTOCOL, request_id, status, body]


def error_frames(envelope: list[bytes], request_id: bytes, code: str, message: str) -> list[bytes]:
    return reply_frames(envelope, request_id, STATUS_ERROR, error_body(code, message))


def request_entry(seq: int, enqueued_ns: int, op: bytes, body: bytes) -> bytes:
    """One request of a W_REQUEST frame."""
    return _REQUEST_ENTRY.pack(seq, enqueued_ns, len(op), len(body)) + op + body


def split_requests(packed: bytes) -> list[tuple[bytes, int, bytes, bytes]]:
    """(seq as the worker echoes it back, enqueued_ns, op, body) of each request of a
    W_REQUEST frame; BadEntries if it does not parse."""
    return [(packed[at:at + SEQ_BYTES], head[1], fields[0], fields[1])
            for at, head, fields in _entries(packed, _REQUEST_ENTRY)]


def reply_entry(seq: bytes, status: bytes, body: bytes) -> bytes:
    """One reply of a W_REPLY frame: `seq` as the request carried it."""
    return _REPLY_ENTRY.pack(seq, len(status), len(body)) + status + body


def error_entry(seq: bytes, code: str, message: str, at: JsonPath | None = None) -> bytes:
    """One error reply of a W_REPLY frame."""
    return reply_entry(seq, STATUS_ERROR, error_body(code, message, at))


def split_replies(packed: bytes) -> list[tuple[int, bytes, bytes]]:
    """(seq, status, body) of each reply of a W_REPLY frame; BadEntries if it does not
    parse."""
    return [(int.from_bytes(head[0], "little"), fields[0], fields[1])
            for _, head, fields in _entries(packed, _REPLY_ENTRY)]


def _entries(packed: bytes, entry: struct.Struct):
    """(offset, fixed head, (first field, second field)) of each entry, the two variable
    fields' lengths being the head's last two values."""
    at, end, size = 0, len(packed), entry.size
    out = []
    while at < end:
        if at + size > end:
            raise BadEntries(f"a packed backend frame ends inside an entry head at byte {at}")
        head = entry.unpack_from(packed, at)
        first_len, second_len = head[-2], head[-1]
        start = at + size
        middle = start + first_len
        stop = middle + second_len
        if stop > end:
            raise BadEntries(f"a packed backend frame ends inside an entry at byte {at}")
        out.append((at, head, (packed[start:middle], packed[middle:stop])))
        at = stop
    return out
