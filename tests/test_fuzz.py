"""Fuzzing the two places bad input reaches: the router's frame parser and the worker's body
decoder (property tests), then a live pool under a seeded stream of malformed messages."""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.worker import BadBody, Job, Limits, decode_job
from router import protocol
from router.client import Client, TooLarge
from tests.support import SENTENCES, Reference, RunningPool, start_pool, stop_pool

IDENT = b"\x00peer"
# No deadline: other test runs share this machine's two cores; the properties are not timings.
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- parse_request ---------------------------------------------------------------------------

INTERESTING = [
    b"", protocol.PROTOCOL, b"ZP2", b"zp1", protocol.PROTOCOL + b"\x00", b"similarity", b"embed",
    b"ping", b"pong", b"v1",
    b"\xff\xfe", b"\xed\xa0\x80", b"{}", b"[]", b'{"pairs": [["a", "b"]]}', b'{"timeout_ms": 0}',
    b"x" * 64, b"x" * 65, b"\x00",
]
frame = st.sampled_from(INTERESTING) | st.binary(max_size=80)
ids = st.sampled_from([b"", b"r", b"x" * 64, b"x" * 65, b"y" * 300]) | st.binary(max_size=70)
ops = st.sampled_from(sorted(protocol.OPS)) | st.sampled_from([b"", b"SIMILARITY", b"sing"]) | frame
versions = st.sampled_from([b"", b"v1", "版本".encode(), b"\xff", b"v1\xc3\x28"]) | frame
bodies = st.sampled_from([b"{}", b"", b'{"pairs": [["a", "b"]]}', b'{"timeout_ms": 5}',
                          b'{"timeout_ms": -5}', b"[]", b"{", b" " * 1025]) | frame


@st.composite
def mutated_messages(draw: st.DrawFn) -> list[bytes]:
    """A valid message (maybe REQ-delimited), then drop / duplicate / insert / replace frames."""
    frames = [protocol.PROTOCOL, draw(ids), draw(ops), draw(versions), draw(bodies)]
    if draw(st.booleans()):
        frames.insert(0, b"")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "duplicate", "insert", "replace"]))
        if kind == "insert" or not frames:
            frames.insert(draw(st.integers(0, len(frames))), draw(frame))
            continue
        i = draw(st.integers(0, len(frames) - 1))
        if kind == "drop":
            del frames[i]
        elif kind == "duplicate":
            frames.insert(i, frames[i])
        else:
            frames[i] = draw(frame)
    return [IDENT, *frames]


any_frames = st.lists(frame, max_size=9).map(lambda frames: [IDENT, *frames])
messages = mutated_messages() | any_frames | st.just([])


def spec_ping_body_ok(body: bytes) -> bool:
    if len(body) > protocol.MAX_PING_BODY:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    timeout_ms = doc.get("timeout_ms")
    return timeout_ms is None or (type(timeout_ms) is int and timeout_ms > 0)


def spec(frames: list[bytes]) -> tuple[int, bytes | None, bool]:
    """docs/protocol.md restated: (envelope length, readable request_id, well-formed?)."""
    split = 2 if len(frames) > 1 and frames[1] == b"" else 1
    rest = frames[split:]
    if len(rest) < 2 or not 1 <= len(rest[1]) <= 64:
        return split, None, False
    if rest[0] != protocol.PROTOCOL or len(rest) != 5 \
            or rest[2] not in (b"similarity", b"embed", b"ping"):
        return split, rest[1], False
    try:
        rest[3].decode("utf-8")
    except UnicodeDecodeError:
        return split, rest[1], False
    body_ok = bool(rest[4]) and (rest[2] != b"ping" or spec_ping_body_ok(rest[4]))
    return split, rest[1], body_ok


def check_error_reply(envelope: list[bytes], request_id: bytes, code: str, message: str) -> None:
    frames = protocol.error_frames(envelope, request_id, code, message)
    assert frames[: len(envelope)] == envelope
    tag, rid, status, body = frames[len(envelope):]
    assert (tag, rid, status) == (protocol.PROTOCOL, request_id, b"error")
    doc = orjson.loads(body)
    assert set(doc) == {"code", "message"}
    assert doc["code"] == code and doc["code"] in protocol.ERROR_CODES
    assert isinstance(doc["message"], str) and doc["message"]


@FUZZ
@given(messages)
def test_parse_request_never_raises_and_follows_the_spec(frames: list[bytes]) -> None:
    result = protocol.parse_request(frames)
    assert isinstance(result, protocol.Request | protocol.FrameError)
    if not frames:
        assert isinstance(result, protocol.FrameError) and result.request_id is None
        return
    split, request_id, valid = spec(frames)
    assert result.request_id == request_id
    assert isinstance(result, protocol.Request) == valid
    assert result.envelope == frames[:split]
    if isinstance(result, protocol.Request):
        # A request is exactly the message: nothing is lost or invented on the way.
        assert [*result.envelope, protocol.PROTOCOL, result.request_id, result.op,
                result.version.encode(), result.body] == frames
    elif result.request_id is not None:
        check_error_reply(result.envelope, result.request_id, result.code, result.message)


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=12))
def test_arbitrary_frames_parse_or_yield_a_replyable_error(frames: list[bytes]) -> None:
    result = protocol.parse_request(frames)
    assert isinstance(result, protocol.Request | protocol.FrameError)
    if isinstance(result, protocol.FrameError) and result.request_id is not None:
        assert 1 <= len(result.request_id) <= protocol.MAX_REQUEST_ID
        check_error_reply(result.envelope, result.request_id, result.code, result.message)


# -- decode_job --------------------------------------------------------------------------------

LIMITS = Limits(max_pairs=8, max_text_chars=12)
FAR_FUTURE = 10**18  # enqueued "later": no timeout_ms can have run out
WORKER_CODES = {protocol.BAD_REQUEST, protocol.TOO_LARGE, protocol.TIMEOUT}

int64 = st.integers(-(2**63), 2**63 - 1)  # what orjson writes
json_values = st.recursive(
    st.none() | st.booleans() | int64
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)
texts = st.text(max_size=16)
items = texts | st.lists(texts | int64 | st.none(), max_size=3) | json_values
keys = st.sampled_from(["pairs", "texts", "timeout_ms"]) | st.text(max_size=8)
bodies_json = st.dictionaries(
    keys,
    st.lists(items, max_size=12) | st.integers(-5, 10**6) | json_values,
    max_size=4,
) | json_values


def decode(op: bytes, body: bytes, enqueued_ns: int = FAR_FUTURE) -> Job | BadBody:
    try:
        return decode_job(b"seq", op, body, enqueued_ns, LIMITS)
    except BadBody as exc:
        assert exc.code in WORKER_CODES
        # The message must travel: it serializes into a well-formed error reply.
        check_error_reply([], b"r", exc.code, str(exc))
        return exc


def spec_outcome(op: bytes, doc: object) -> str:
    """The code docs/protocol.md implies for a body (malformed before too large, per item)."""
    if not isinstance(doc, dict) or op not in (protocol.OP_SIMILARITY, protocol.OP_EMBED):
        return protocol.BAD_REQUEST
    timeout_ms = doc.get("timeout_ms")
    if not (timeout_ms is None or (type(timeout_ms) is int and timeout_ms > 0)):
        return protocol.BAD_REQUEST
    entries = doc.get("pairs" if op == protocol.OP_SIMILARITY else "texts")
    if not isinstance(entries, list) or not entries:
        return protocol.BAD_REQUEST
    if len(entries) > LIMITS.max_pairs:
        return protocol.TOO_LARGE
    for entry in entries:
        if op == protocol.OP_EMBED:
            strings = [entry] if isinstance(entry, str) else None
        elif isinstance(entry, list) and len(entry) == 2:
            strings = entry if all(isinstance(s, str) for s in entry) else None
        else:
            strings = None
        if strings is None:
            return protocol.BAD_REQUEST
        if any(len(s) > LIMITS.max_text_chars for s in strings):
            return protocol.TOO_LARGE
    return "ok"


@FUZZ
@given(st.sampled_from(sorted(protocol.OPS)) | st.binary(max_size=12), st.binary(max_size=300))
def test_decode_job_on_arbitrary_bytes_gives_a_job_or_bad_body(op: bytes, body: bytes) -> None:
    result = decode(op, body)
    if isinstance(result, Job):
        assert op in (protocol.OP_SIMILARITY, protocol.OP_EMBED)


@FUZZ
@given(st.sampled_from([protocol.OP_SIMILARITY, protocol.OP_EMBED, protocol.OP_PING, b"nope"]),
       bodies_json)
def test_decode_job_on_json_bodies_matches_the_spec(op: bytes, doc: object) -> None:
    result = decode(op, orjson.dumps(doc))
    want = spec_outcome(op, doc)
    assert (result.code if isinstance(result, BadBody) else "ok") == want, result
    if isinstance(result, Job):
        assert isinstance(doc, dict)
        entries = doc["pairs" if op == protocol.OP_SIMILARITY else "texts"]
        flat = [t for pair in entries for t in pair] if op == protocol.OP_SIMILARITY else entries
        assert (result.seq, result.op, result.texts, result.size) == (b"seq", op, flat,
                                                                      len(entries))


@FUZZ
@given(st.sampled_from([protocol.OP_SIMILARITY, protocol.OP_EMBED]), st.integers(1, 40),
       st.integers(0, 40), st.integers(0, 100))
def test_limits_hold_at_every_size(op: bytes, count: int, chars: int, where: int) -> None:
    text = "好" * chars
    if op == protocol.OP_SIMILARITY:
        doc: dict = {"pairs": [["a", "b"]] * count}
        doc["pairs"][where % count] = ["a", text]
    else:
        doc = {"texts": ["a"] * count}
        doc["texts"][where % count] = text
    result = decode(op, orjson.dumps(doc))
    if count > LIMITS.max_pairs:
        assert isinstance(result, BadBody) and result.code == protocol.TOO_LARGE
        assert f"{count} " in str(result) and "--max-pairs" in str(result)
    elif chars > LIMITS.max_text_chars:
        assert isinstance(result, BadBody) and result.code == protocol.TOO_LARGE
        assert f"{chars} characters" in str(result) and "--max-text-chars" in str(result)
    else:
        assert isinstance(result, Job) and text in result.texts  # whole, never cut


# -- a live pool -------------------------------------------------------------------------------

MAX_PAIRS, MAX_TEXT_CHARS, MAX_MESSAGE_BYTES = 16, 256, 65536
LIMIT_ARGS = ("--max-pairs", str(MAX_PAIRS), "--max-text-chars", str(MAX_TEXT_CHARS),
              "--max-message-bytes", str(MAX_MESSAGE_BYTES))
SEED = int(os.environ.get("ZEROPOOL_FUZZ_SEED", "20240808"))
MESSAGES = 1200
TOLERANCE = 1e-4
OK = "ok"


@pytest.fixture(scope="module")
def limited_pool(models: dict[str, Path]) -> Iterator[RunningPool]:
    """2 workers of the tiny v1 model with small limits, shared by the live tests below."""
    running = start_pool(models["v1"], *LIMIT_ARGS, workers=2)
    yield running
    assert stop_pool(running) == 0


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # never let our own backlog drop a reply
    sock.connect(endpoint)
    return sock


@dataclass
class Case:
    frames: list[bytes]
    expect: str | None  # the error code, OK, or None: no readable request_id, dropped
    request_id: bytes | None = None
    delimited: bool = False  # sent REQ-style: the reply must echo the empty delimiter


class MalformedTraffic:
    """A seeded stream of malformed (and a few odd but valid) producer messages."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.count = 0

    # building blocks

    def request_id(self) -> bytes:
        self.count += 1
        rid = b"f%05d." % self.count  # unique prefix; the rest is noise, up to 64 bytes
        shape = self.rng.random()
        if shape < 0.2:
            rid += self.rng.randbytes(self.rng.randint(1, 64 - len(rid)))  # not UTF-8, often
        elif shape < 0.3:
            rid = rid.ljust(64, b"#")
        return rid

    def text(self, max_chars: int = 20) -> str:
        alphabet = "今天天气真好abc xyz😀\u0000\t"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, max_chars)))

    def pairs(self, count: int) -> list[list[str]]:
        return [[self.text(), self.text()] for _ in range(count)]

    def readable(self, frames: list[bytes], expect: str) -> Case:
        case = Case(frames, expect, request_id=frames[1])
        if self.rng.random() < 0.1:
            case.frames, case.delimited = [b"", *frames], True
        return case

    def request(self, op: bytes, body: bytes, expect: str, version: bytes = b"") -> Case:
        return self.readable([protocol.PROTOCOL, self.request_id(), op, version, body], expect)

    # message families

    def unreadable(self) -> Case:
        rng = self.rng
        body = orjson.dumps({"pairs": self.pairs(1)})
        frames = rng.choice([
            [protocol.PROTOCOL],
            [rng.randbytes(rng.randint(0, 30))],
            [protocol.PROTOCOL, b"", protocol.OP_SIMILARITY, b"", body],  # empty request_id
            # a huge request_id
            [protocol.PROTOCOL, b"h" * rng.randint(65, 3000), protocol.OP_SIMILARITY, b"", body],
            [b"", protocol.PROTOCOL],
            [b"", b""],
            [b"", protocol.PROTOCOL, b"", protocol.OP_PING, b"", b"{}"],
        ])
        return Case(frames, None)

    def bad_frames(self) -> Case:
        rng = self.rng
        rid = self.request_id()
        body = orjson.dumps({"pairs": self.pairs(2)})
        kind = rng.randrange(8)
        if kind == 0:  # wrong protocol tag (never empty: that reads as a REQ delimiter)
            tag = rng.choice([b"ZP2", b"zp1", b"ZP", b"ZP10", b"\x00", rng.randbytes(4) + b"!"])
            return self.readable([tag, rid, protocol.OP_SIMILARITY, b"", body],
                                 protocol.BAD_REQUEST)
        if kind == 1:  # too few frames
            frames = [protocol.PROTOCOL, rid, protocol.OP_SIMILARITY, b""][: rng.randint(2, 4)]
            return self.readable(frames, protocol.BAD_REQUEST)
        if kind == 2:  # extra frames
            extra = [rng.randbytes(rng.randint(0, 20)) for _ in range(rng.randint(1, 3))]
            frames = [protocol.PROTOCOL, rid, protocol.OP_SIMILARITY, b"", body, *extra]
            return self.readable(frames, protocol.BAD_REQUEST)
        if kind == 3:  # unknown op
            op = rng.choice([b"SIMILARITY", b"similarity ", b"embeds", b"", b"\xff",
                             rng.randbytes(6)])
            return self.readable([protocol.PROTOCOL, rid, op, b"", body], protocol.BAD_REQUEST)
        if kind == 4:  # version not UTF-8
            version = rng.choice([b"\xff", b"v1\xff", b"\xc3\x28", b"\xed\xa0\x80"])
            return self.readable([protocol.PROTOCOL, rid, protocol.OP_SIMILARITY, version, body],
                                 protocol.BAD_REQUEST)
        if kind == 5:  # a pinned version that is not serving
            version = rng.choice([b"v9", b"nope", "版本".encode(), b"v1 "])
            return self.readable([protocol.PROTOCOL, rid, protocol.OP_SIMILARITY, version, body],
                                 protocol.UNKNOWN_VERSION)
        if kind == 6:  # empty body, any op
            op = rng.choice(sorted(protocol.OPS))
            return self.readable([protocol.PROTOCOL, rid, op, b"", b""], protocol.BAD_REQUEST)
        ping_body = rng.choice([b"[]", b"nope", b'{"timeout_ms": -1}', b"{" * 40,
                                b"{}" + b" " * 2000])
        return self.readable([protocol.PROTOCOL, rid, protocol.OP_PING, b"", ping_body],
                             protocol.BAD_REQUEST)

    def bad_body(self) -> Case:
        rng = self.rng
        op = rng.choice([protocol.OP_SIMILARITY, protocol.OP_EMBED])
        key = "pairs" if op == protocol.OP_SIMILARITY else "texts"
        good = self.pairs(rng.randint(1, 8)) if key == "pairs" else [self.text() for _ in "abc"]
        valid = orjson.dumps({key: good})
        bad_items = ([["a"], ["a", "b", "c"], [], "ab", ["a", 1], [None, "b"], {"a": "b"},
                      [["a"], "b"], ["a", ["b"]]] if key == "pairs"
                     else [1, None, ["a"], {"t": "a"}, True, 1.5])
        with_bad_item = [*good]
        with_bad_item.insert(rng.randint(0, len(good)), rng.choice(bad_items))
        body = rng.choice([
            b"{", b"not json", valid[: rng.randint(1, len(valid) - 1)],  # cut short
            b"\xff\xfe" + rng.randbytes(rng.randint(0, 40)),  # not UTF-8 at all
            b'{"%s": [["\xff\xfe", "b"]]}' % key.encode(),  # not UTF-8 inside a string
            b"\xef\xbb\xbf" + valid,  # a byte order mark
            valid + b" trailing", b"[" * 3000, b'{"timeout_ms": NaN}',
            orjson.dumps(rng.choice([[], "x", 1, None, True, good])),  # not an object
            orjson.dumps({key: rng.choice(["ab", 5, None, {"a": "b"}, True, 1.5])}),
            orjson.dumps({key: with_bad_item}),
            orjson.dumps({key: []}), b"{}",
            orjson.dumps({"texts" if key == "pairs" else "pairs": good}),  # the other op's body
            orjson.dumps({key: good, "timeout_ms": rng.choice([0, -5, "soon", 1.5, True, [1]])}),
        ])
        return self.request(op, body, protocol.BAD_REQUEST)

    def too_large(self) -> Case:
        rng = self.rng
        long_text = self.text(8) + "长" * rng.randint(MAX_TEXT_CHARS + 1, 3000)
        if rng.random() < 0.5:
            pairs = self.pairs(rng.randint(MAX_PAIRS + 1, 60))
            if rng.random() < 0.5:
                pairs = self.pairs(rng.randint(1, MAX_PAIRS))
                pairs[rng.randrange(len(pairs))][rng.randrange(2)] = long_text
            return self.request(protocol.OP_SIMILARITY, orjson.dumps({"pairs": pairs}),
                                protocol.TOO_LARGE)
        texts = [self.text() for _ in range(rng.randint(MAX_PAIRS + 1, 60))]
        if rng.random() < 0.5:
            texts = texts[: rng.randint(1, MAX_PAIRS)]
            texts[rng.randrange(len(texts))] = long_text
        return self.request(protocol.OP_EMBED, orjson.dumps({"texts": texts}), protocol.TOO_LARGE)

    def odd_but_valid(self) -> Case:
        rng = self.rng
        pairs = self.pairs(rng.randint(1, MAX_PAIRS))
        pairs[0] = [rng.choice(["", " ", "\u0000", "😀" * MAX_TEXT_CHARS]), "x" * MAX_TEXT_CHARS]
        return self.request(protocol.OP_SIMILARITY, orjson.dumps({"pairs": pairs,
                                                           "timeout_ms": 600_000}), OK)

    def cases(self, n: int) -> list[Case]:
        families: list[tuple[float, Callable[[], Case]]] = [
            (0.15, self.unreadable), (0.30, self.bad_frames), (0.35, self.bad_body),
            (0.15, self.too_large), (0.05, self.odd_but_valid),
        ]
        weights = [w for w, _ in families]
        return [self.rng.choices(families, weights)[0][1]() for _ in range(n)]


def split_reply(frames: list[bytes]) -> tuple[bool, bytes, bytes, bytes]:
    """(delimiter echoed?, request_id, status, body) of one reply."""
    delimited = len(frames) == 5 and frames[0] == b""
    tag, rid, status, body = frames[1:] if delimited else frames
    assert tag == protocol.PROTOCOL, frames
    return delimited, rid, status, body


@pytest.mark.slow
def test_a_live_pool_answers_1000_malformed_messages_and_keeps_serving(
    limited_pool: RunningPool, reference: dict[str, Reference]
) -> None:
    pool = limited_pool
    cases = MalformedTraffic(random.Random(SEED)).cases(MESSAGES)
    expected = {c.request_id: c for c in cases if c.request_id is not None}
    assert len(expected) == sum(c.expect is not None for c in cases)  # ids are unique
    before = pool.status()
    pids = sorted(pool.worker_pids())

    sock = dealer(pool.endpoint)
    replies: dict[bytes, list[bytes]] = {}
    duplicates: list[bytes] = []

    def receive(timeout_ms: int) -> bool:
        if not sock.poll(timeout_ms):
            return False
        frames = sock.recv_multipart()
        rid = split_reply(frames)[1]
        if rid in replies:
            duplicates.append(rid)
        replies[rid] = frames
        return True

    for i, case in enumerate(cases):
        sock.send_multipart(case.frames)
        if i % 50 == 49:
            while receive(0):
                pass
    # after everything above
    sock.send_multipart([protocol.PROTOCOL, b"last-ping", b"ping", b"", b"{}"])
    deadline = time.monotonic() + 120
    while len(replies) < len(expected) + 1 and time.monotonic() < deadline:
        receive(1000)
    while receive(500):  # anything extra would be a second reply
        pass
    after = pool.status()
    sock.close()

    context = f"(seed {SEED})"
    assert not duplicates, f"two replies to {duplicates[:5]} {context}"
    missing = [c for rid, c in expected.items() if rid not in replies]
    assert not missing, f"{len(missing)} unanswered, e.g. {missing[0].frames!r:.300} {context}"
    assert set(replies) == {*expected, b"last-ping"}, context
    wrong = []
    for rid, case in expected.items():
        delimited, _, status, body = split_reply(replies[rid])
        doc = orjson.loads(body)
        got = OK if status == b"ok" else doc["code"]
        if status == b"error":
            assert isinstance(doc["message"], str) and doc["message"], doc
        else:
            assert all(math.isfinite(s) and -1.001 <= s <= 1.001 for s in doc["scores"]), doc
        if got != case.expect or delimited != case.delimited:
            wrong.append((case.expect, got, repr(case.frames)[:200], body[:200]))
    assert not wrong, f"{len(wrong)} wrong replies {context}: {wrong[:5]}"

    # The pool is unharmed: same workers, no restarts, and it still computes correctly.
    with Client(pool.endpoint) as client:
        pairs = [(SENTENCES[i], SENTENCES[(i + 3) % 8]) for i in range(8)]
        scores = client.similarity(pairs).scores
    for (a, b), score in zip(pairs, scores, strict=True):
        assert abs(score - reference["v1"].similarity(a, b)) < TOLERANCE
    assert sorted(pool.worker_pids()) == pids
    assert all(w["restarts"] == 0 and w["state"] == "ready" for w in after["workers"])
    assert after["versions"]["v1"]["restarts"] == 0
    assert pool.process.proc.poll() is None

    # Every message is accounted for: the unanswerable ones as dropped, the rest by code.
    req0, req1 = before["requests"], after["requests"]
    dropped = sum(c.expect is None for c in cases)
    assert dropped > 100
    assert req1["dropped"] - req0["dropped"] == dropped, context
    assert req1["received"] - req0["received"] == MESSAGES + 1, context
    codes = Counter(c.expect for c in cases if c.expect not in (None, OK))
    assert {code: req1["errors_by_code"].get(code, 0) - req0["errors_by_code"].get(code, 0)
            for code in codes} == dict(codes), context
    assert codes[protocol.TOO_LARGE] > 50 and codes[protocol.BAD_REQUEST] > 300
    # A producer's mistakes are its own: no worker or version counts them as its errors.
    assert sum(w["errors"] for w in after["workers"]) == \
        sum(w["errors"] for w in before["workers"]), after["workers"]
    assert after["versions"]["v1"]["errors"] == before["versions"]["v1"]["errors"]


@pytest.mark.slow
def test_too_large_reaches_the_client_as_a_typed_error(limited_pool: RunningPool) -> None:
    with Client(limited_pool.endpoint) as client:
        with pytest.raises(TooLarge) as exc:
            client.similarity([("今天天气真好", "今日阳光明媚")] * (MAX_PAIRS + 1))
        assert exc.value.code == "too_large"
        assert exc.value.at == ("pairs",)
        assert exc.value.message.startswith(f"pairs holds {MAX_PAIRS + 1} items")
        assert "--max-pairs" in exc.value.message
        with pytest.raises(TooLarge) as exc:
            client.embed(["ok", "长" * (MAX_TEXT_CHARS + 1)])
        assert exc.value.code == "too_large" and exc.value.at == ("texts", 1)
        assert exc.value.message.startswith(f"texts[1] has {MAX_TEXT_CHARS + 1} characters")
        assert "--max-text-chars" in exc.value.message
        # At the limits, the request is served whole.
        result = client.similarity([("长" * MAX_TEXT_CHARS, "x")] * MAX_PAIRS)
        assert len(result.scores) == MAX_PAIRS


@pytest.mark.slow
def test_an_oversized_message_is_dropped_by_libzmq_and_the_pool_keeps_serving(
    limited_pool: RunningPool,
) -> None:
    pool = limited_pool
    before = pool.status()
    pids = sorted(pool.worker_pids())
    ok_body = orjson.dumps({"pairs": [["今天天气真好", "今日阳光明媚"]]})
    big, other = dealer(pool.endpoint), dealer(pool.endpoint)

    def served(sock: zmq.Socket, rid: bytes) -> None:
        sock.send_multipart([protocol.PROTOCOL, rid, b"similarity", b"", ok_body])
        assert sock.poll(30_000), f"no reply to {rid!r}"
        assert sock.recv_multipart()[1:3] == [rid, b"ok"]

    served(big, b"before")
    oversized = orjson.dumps({"pairs": [["x" * (1 << 20), "y"]]})  # 1 MiB, the limit is 64 KiB
    big.send_multipart([protocol.PROTOCOL, b"huge", b"similarity", b"", oversized])
    served(other, b"meanwhile")  # another producer is not disturbed
    assert not big.poll(2000), "an oversized message got a reply"
    # libzmq dropped the connection; the DEALER reconnects by itself and is served again.
    served(big, b"after")
    served(other, b"still")
    after = pool.status()
    assert sorted(pool.worker_pids()) == pids
    assert pool.process.proc.poll() is None
    # The router never saw the oversized message: neither received nor dropped.
    assert after["requests"]["received"] - before["requests"]["received"] == 4
    assert after["requests"]["dropped"] == before["requests"]["dropped"]
    big.close()
    other.close()
