"""Score semantics against the seed's in-process computation, batching, dedupe, truncation."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pool.runtime import Encoder
from tests.conftest import SENTENCES, TINY_MAX_LENGTH, Reference

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def encoder(models: dict[str, Path]) -> Encoder:
    torch.set_num_threads(1)
    return Encoder(str(models["v1"]), device="cpu", dtype="auto", chunk_texts=3)


def test_cpu_defaults_to_float32(encoder: Encoder) -> None:
    assert encoder.dtype == torch.float32
    assert encoder.max_length == TINY_MAX_LENGTH


def test_scores_match_the_seed_computation(
    encoder: Encoder, reference: dict[str, Reference]
) -> None:
    pairs = list(itertools.combinations(SENTENCES, 2))
    scores = encoder.similarity(pairs)
    for (a, b), score in zip(pairs, scores, strict=True):
        assert abs(score - reference["v1"].similarity(a, b)) < TOLERANCE, (a, b)


def test_embeddings_are_normalised_and_match_in_order(
    encoder: Encoder, reference: dict[str, Reference]
) -> None:
    # Mixed lengths force the length-sorted chunks (chunk_texts=3) to be reassembled.
    texts = ["a", "今天天气真好今天天气真好今天", "hello world", "股", "the quick brown fox"]
    got = encoder.embed(texts)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    for i, text in enumerate(texts):
        want = reference["v1"].embed([text])[0]
        assert torch.allclose(got[i], want, atol=TOLERANCE), text


def test_duplicates_give_identical_results(encoder: Encoder) -> None:
    pairs = [("今天天气真好", "今日阳光明媚")] * 5 + [("今日阳光明媚", "今天天气真好")]
    scores = encoder.similarity(pairs)
    assert max(scores) - min(scores) < 1e-6


def test_self_similarity_is_one(encoder: Encoder) -> None:
    assert all(abs(s - 1) < 1e-5 for s in encoder.similarity([(t, t) for t in SENTENCES]))


def test_long_texts_are_truncated_at_the_model_max_length(
    encoder: Encoder, reference: dict[str, Reference]
) -> None:
    long_text = "今天天气真好" * 50  # 300 characters, far beyond 48 positions
    score = encoder.similarity([(long_text, "今日阳光明媚")])[0]
    assert abs(score - reference["v1"].similarity(long_text, "今日阳光明媚")) < TOLERANCE
    truncated = "今天天气真好" * 10  # the same first 46 tokens
    assert abs(encoder.similarity([(long_text, truncated)])[0] - 1) < 1e-5


def test_warm_up_runs_the_golden_pairs(encoder: Encoder) -> None:
    assert encoder.warm_up() > 0


def test_versions_differ(models: dict[str, Path]) -> None:
    v2 = Encoder(str(models["v2"]))
    v1 = Encoder(str(models["v1"]))
    pair = [("今天天气真好", "股票市场今天大跌")]
    assert abs(v1.similarity(pair)[0] - v2.similarity(pair)[0]) > 1e-3
