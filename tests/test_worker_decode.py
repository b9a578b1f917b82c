"""Request bodies as the worker validates them: precise codes, never an exception escaping."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool import config
from pool.modeldir import Prompts
from pool.worker import BadBody, Limits, decode_job
from router import protocol

NOW = time.monotonic_ns
LIMITS = Limits(max_pairs=4, max_text_chars=10)
SIMILARITY, EMBED = protocol.OP_SIMILARITY, protocol.OP_EMBED


def test_similarity_body_flattens_pairs() -> None:
    job = decode_job(b"s", SIMILARITY, b'{"pairs": [["a", "b"], ["c", "d"]]}', NOW(), LIMITS)
    assert (job.texts, job.size) == (["a", "b", "c", "d"], 2)


def test_embed_body() -> None:
    job = decode_job(b"s", EMBED, '{"texts": ["今天", "x"]}'.encode(), NOW(), LIMITS)
    assert (job.texts, job.size) == (["今天", "x"], 2)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'"x"', b'{"pairs": []}', b'{"pairs": "ab"}', b'{"pairs": [["a"]]}',
    b'{"pairs": [["a", 1]]}', b'{"pairs": [["a", "b", "c"]]}', b'{}', b"\xff\xfe",
    b'{"pairs": [["a", "b"]], "timeout_ms": "soon"}', b'{"pairs": [["a", "b"]], "timeout_ms": 0}',
])
def test_bad_similarity_bodies(body: bytes) -> None:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", SIMILARITY, body, NOW(), LIMITS)
    assert exc.value.code == protocol.BAD_REQUEST


@pytest.mark.parametrize("body", [b'{"texts": []}', b'{"texts": [1]}', b'{"texts": "abc"}'])
def test_bad_embed_bodies(body: bytes) -> None:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", EMBED, body, NOW(), LIMITS)
    assert exc.value.code == protocol.BAD_REQUEST


def test_a_request_that_waited_past_its_timeout_is_abandoned() -> None:
    enqueued = NOW() - 50_000_000  # 50 ms ago
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", SIMILARITY, b'{"pairs": [["a", "b"]], "timeout_ms": 10}', enqueued,
                   LIMITS)
    assert exc.value.code == protocol.TIMEOUT
    job = decode_job(b"s", SIMILARITY, b'{"pairs": [["a", "b"]], "timeout_ms": 1000}',
                     enqueued, LIMITS)
    assert job.size == 1


def test_the_default_limits_are_the_pool_defaults() -> None:
    assert (Limits().max_pairs, Limits().max_text_chars) == (config.DEFAULT_MAX_PAIRS,
                                                             config.DEFAULT_MAX_TEXT_CHARS)


def too_large(op: bytes, doc: dict) -> str:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", op, orjson.dumps(doc), NOW(), LIMITS)
    assert exc.value.code == protocol.TOO_LARGE
    return str(exc.value)


def test_requests_at_the_limits_are_served_whole() -> None:
    job = decode_job(b"s", SIMILARITY, orjson.dumps({"pairs": [["x" * 10, "好" * 10]] * 4}),
                     NOW(), LIMITS)
    assert job.size == 4 and job.texts[:2] == ["x" * 10, "好" * 10]  # nothing cut
    job = decode_job(b"s", EMBED, orjson.dumps({"texts": ["好" * 10] * 4}), NOW(), LIMITS)
    assert job.size == 4 and job.texts[0] == "好" * 10


def test_too_many_pairs_or_texts_is_too_large_with_a_precise_message() -> None:
    message = too_large(protocol.OP_SIMILARITY, {"pairs": [["a", "b"]] * 5})
    assert message.startswith("pairs holds 5 items")
    assert "limit of 4" in message and "--max-pairs" in message
    message = too_large(protocol.OP_EMBED, {"texts": ["a"] * 7})
    assert message.startswith("texts holds 7 items")
    assert "limit of 4" in message and "--max-pairs" in message


@pytest.mark.parametrize(("op", "doc", "code", "at"), [
    (SIMILARITY, {"pairs": [["a", "b"], ["c", "好" * 11]]}, protocol.TOO_LARGE, ("pairs", 1, 1)),
    (SIMILARITY, {"pairs": [["a", "b"], ["c"]]}, protocol.BAD_REQUEST, ("pairs", 1)),
    (SIMILARITY, {"pairs": [["a", "b"]] * 5}, protocol.TOO_LARGE, ("pairs",)),
    (SIMILARITY, {"pairs": []}, protocol.BAD_REQUEST, ("pairs",)),
    (EMBED, {"texts": ["ok", "x" * 11]}, protocol.TOO_LARGE, ("texts", 1)),
    (EMBED, {"texts": ["ok", 3]}, protocol.BAD_REQUEST, ("texts", 1)),
    (EMBED, {"texts": ["ok"], "truncate": "no"}, protocol.BAD_REQUEST, ("truncate",)),
])
def test_an_items_error_says_where_it_is_and_its_message_begins_there(
        op: bytes, doc: dict, code: str, at: tuple) -> None:
    # A gateway renames the item for its callers (the HTTP door's input[1]) from `at`.
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", op, orjson.dumps(doc), NOW(), LIMITS)
    assert (exc.value.code, exc.value.at) == (code, at)
    assert str(exc.value).startswith(protocol.path_text(at) + " ")
    reply = orjson.loads(protocol.error_body(exc.value.code, str(exc.value), exc.value.at))
    assert reply == {"code": code, "message": str(exc.value), "at": list(at)}


def test_a_client_sends_truncate_only_when_it_is_false() -> None:
    from router.client import embed_body, similarity_body

    assert embed_body(["a"], None) == {"texts": ["a"]}
    assert embed_body(["a"], None, None) == {"texts": ["a"]}  # type: ignore[arg-type]
    assert embed_body(["a"], 5, False) == {"texts": ["a"], "timeout_ms": 5, "truncate": False}
    assert similarity_body([("a", "b")], None, False) == {"pairs": [["a", "b"]],
                                                          "truncate": False}


def test_truncate_is_optional_and_true_unless_sent_false() -> None:
    for doc, want in [({}, True), ({"truncate": True}, True), ({"truncate": False}, False)]:
        job = decode_job(b"s", EMBED, orjson.dumps({"texts": ["a"], **doc}), NOW(), LIMITS)
        assert job.truncate is want
    assert orjson.loads(protocol.error_body("timeout", "late")) == {"code": "timeout",
                                                                    "message": "late"}


def test_a_prompt_goes_before_every_text_the_named_one_else_the_default() -> None:
    e5 = Prompts({"query": "query: ", "passage": "passage: "}, default="query")
    pairs = orjson.dumps({"pairs": [["a", "b"]]})
    assert decode_job(b"s", SIMILARITY, pairs, NOW(), LIMITS, e5).texts == ["query: a",
                                                                              "query: b"]
    named = orjson.dumps({"texts": ["a"], "prompt_name": "passage"})
    assert decode_job(b"s", EMBED, named, NOW(), LIMITS, e5).texts == ["passage: a"]
    assert decode_job(b"s", EMBED, orjson.dumps({"texts": ["a"]}), NOW(), LIMITS).texts == ["a"]
    for prompts, says in [(e5, "not one of this version's prompts (query, passage)"),
                          (Prompts(), "its model declares none")]:
        with pytest.raises(BadBody) as exc:
            decode_job(b"s", EMBED, orjson.dumps({"texts": ["a"], "prompt_name": "doc"}), NOW(),
                       LIMITS, prompts)
        assert exc.value.code == protocol.BAD_REQUEST and exc.value.at == ("prompt_name",)
        assert str(exc.value).startswith("prompt_name is 'doc'") and says in str(exc.value)
    for bad in ("", 3, ["query"]):
        with pytest.raises(BadBody, match="must name one of the model's prompts"):
            decode_job(b"s", EMBED, orjson.dumps({"texts": ["a"], "prompt_name": bad}), NOW(),
                       LIMITS, e5)


def test_a_client_sends_prompt_name_only_when_given() -> None:
    from router.client import embed_body, similarity_body

    assert "prompt_name" not in embed_body(["a"], None)
    assert similarity_body([("a", "b")], None, True, "query") == {"pairs": [["a", "b"]],
                                                                   "prompt_name": "query"}


def test_a_text_over_max_text_chars_is_too_large_never_cut() -> None:
    # Characters, not bytes: ten CJK characters (30 UTF-8 bytes) are within the limit.
    message = too_large(protocol.OP_SIMILARITY, {"pairs": [["a", "b"], ["c", "好" * 11]]})
    assert "pairs[1][1]" in message and "11 characters" in message
    assert "limit of 10" in message and "--max-text-chars" in message
    message = too_large(protocol.OP_EMBED, {"texts": ["ok", "ok", "x" * 500]})
    assert "texts[2]" in message and "500 characters" in message and "--max-text-chars" in message


def test_malformed_items_before_an_oversized_one_are_bad_requests() -> None:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", SIMILARITY, orjson.dumps({"pairs": [["a"], ["b", "c" * 99]]}),
                   NOW(), LIMITS)
    assert exc.value.code == protocol.BAD_REQUEST and "pairs[0]" in str(exc.value)


@given(st.sampled_from([protocol.OP_SIMILARITY, protocol.OP_EMBED]), st.binary(max_size=200))
def test_any_body_decodes_or_raises_bad_body(op: bytes, body: bytes) -> None:
    try:
        decode_job(b"s", op, body, NOW(), LIMITS)
    except BadBody as exc:
        assert exc.code in protocol.ERROR_CODES
