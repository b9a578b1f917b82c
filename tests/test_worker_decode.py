"""Request bodies as the worker validates them: precise codes, never an exception escaping."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool.worker import BadBody, decode_job
from router import protocol as p

NOW = time.monotonic_ns


def test_similarity_body_flattens_pairs() -> None:
    job = decode_job(b"s", p.OP_SIMILARITY, b'{"pairs": [["a", "b"], ["c", "d"]]}', NOW())
    assert (job.texts, job.size) == (["a", "b", "c", "d"], 2)


def test_embed_body() -> None:
    job = decode_job(b"s", p.OP_EMBED, '{"texts": ["今天", "x"]}'.encode(), NOW())
    assert (job.texts, job.size) == (["今天", "x"], 2)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'"x"', b'{"pairs": []}', b'{"pairs": "ab"}', b'{"pairs": [["a"]]}',
    b'{"pairs": [["a", 1]]}', b'{"pairs": [["a", "b", "c"]]}', b'{}', b"\xff\xfe",
    b'{"pairs": [["a", "b"]], "timeout_ms": "soon"}', b'{"pairs": [["a", "b"]], "timeout_ms": 0}',
])
def test_bad_similarity_bodies(body: bytes) -> None:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", p.OP_SIMILARITY, body, NOW())
    assert exc.value.code == p.BAD_REQUEST


@pytest.mark.parametrize("body", [b'{"texts": []}', b'{"texts": [1]}', b'{"texts": "abc"}'])
def test_bad_embed_bodies(body: bytes) -> None:
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", p.OP_EMBED, body, NOW())
    assert exc.value.code == p.BAD_REQUEST


def test_a_request_that_waited_past_its_timeout_is_abandoned() -> None:
    enqueued = NOW() - 50_000_000  # 50 ms ago
    with pytest.raises(BadBody) as exc:
        decode_job(b"s", p.OP_SIMILARITY, b'{"pairs": [["a", "b"]], "timeout_ms": 10}', enqueued)
    assert exc.value.code == p.TIMEOUT
    job = decode_job(b"s", p.OP_SIMILARITY, b'{"pairs": [["a", "b"]], "timeout_ms": 1000}',
                     enqueued)
    assert job.size == 1


@given(st.sampled_from([p.OP_SIMILARITY, p.OP_EMBED]), st.binary(max_size=200))
def test_any_body_decodes_or_raises_bad_body(op: bytes, body: bytes) -> None:
    try:
        decode_job(b"s", op, body, NOW())
    except BadBody as exc:
        assert exc.code in p.ERROR_CODES
