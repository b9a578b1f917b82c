"""pool.attention: a CPU graph per width band, the softmax in fp32 written for the width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from pool import attention, fusion
from pool.runtime import Encoder, embeddings_differ
from tests.support import SENTENCES

NARROW = ["a", "今天天气真好"]  # a few tokens
SHORT = ["今天天气真好，我们去公园散步吧今天天气"]  # 16-32 tokens with the test vocab
WIDE = ["今天天气真好，我们去公园散步吧" * 4, "the weather is fine today " * 8]


@pytest.mark.parametrize("width", [1, 7, 12, 15, 16, 17, 24, 31, 48])
def test_the_written_out_softmax_is_torchs_with_and_without_masked_keys(width: int) -> None:
    scores = torch.randn(3, 2, 5, width, generator=torch.Generator().manual_seed(width)) * 8
    assert torch.allclose(attention.written_out_softmax(scores), scores.softmax(-1),
                          atol=1e-6)
    kept = (width + 1) // 2  # the first key is never padding
    masked = scores.clone()
    masked[..., kept:] += torch.finfo(torch.bfloat16).min  # additive padding mask
    got = attention.written_out_softmax(masked)
    assert torch.allclose(got, masked.softmax(-1), atol=1e-6)
    assert torch.count_nonzero(got[..., kept:]) == 0


@pytest.fixture(scope="module")
def banded(models: dict[str, Path]) -> Encoder:
    torch.set_num_threads(1)
    return Encoder(str(models["v1"]), device="cpu", dtype="float32")


def test_a_cpu_encoder_has_a_graph_per_band_and_each_width_runs_its_own(
        banded: Encoder) -> None:
    traced = banded._traced
    assert traced is not None
    assert len({id(traced.narrow), id(traced.short), id(traced.wide)}) == 3
    widths = {name: max(map(len, banded.token_ids(texts)))
              for name, texts in (("narrow", NARROW), ("short", SHORT), ("wide", WIDE))}
    assert widths["narrow"] <= attention.NARROW_PASS_TOKENS < widths["short"] \
        <= attention.SHORT_PASS_TOKENS < widths["wide"]
    assert traced.for_width(widths["narrow"]) is traced.narrow
    assert traced.for_width(widths["short"]) is traced.short
    assert traced.for_width(widths["wide"]) is traced.wide


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_band_computes_what_the_model_does(models: dict[str, Path], banded: Encoder,
                                                  dtype: str) -> None:
    encoder = banded if dtype == "float32" else \
        Encoder(str(models["v1"]), device="cpu", dtype=dtype)
    eager = Encoder(str(models["v1"]), device="cpu", dtype=dtype, graph="eager")
    for texts in (NARROW, SHORT, WIDE, SENTENCES):
        got, want = encoder.embed(texts), eager.embed(texts)
        if dtype == "float32":
            assert torch.allclose(got, want, atol=1e-6)  # the 1e-4 contract, with room
        else:  # bf16: torch's softmax in bf16 against fp32 here
            assert embeddings_differ(got, want, torch.bfloat16, rounded_otherwise=True) == ""


def test_a_model_whose_attention_is_its_own_runs_it_at_every_width(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    own = PreTrainedModel.set_attn_implementation

    def refuse_ours(self: PreTrainedModel, name: str) -> None:
        if name.startswith("zeropool"):
            raise ValueError(f"{name} is not supported by this model")
        own(self, name)

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse_ours)
    encoder = Encoder(str(models["v1"]), device="cpu", dtype="float32")
    assert encoder.graph == "traced" and encoder._traced is not None
    assert encoder._traced.narrow is encoder._traced.short is encoder._traced.wide
    eager = Encoder(str(models["v1"]), device="cpu", dtype="float32", graph="eager")
    for texts in (NARROW, WIDE):
        assert torch.allclose(encoder.embed(texts), eager.embed(texts), atol=1e-6)


def test_a_bf16_graph_with_torchs_linears_keeps_its_bands(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the oneDNN linears are not used (a CPU without oneDNN bf16, or a fused copy
    that failed its check), the bands' fp32 softmax still rounds otherwise than the model's
    bf16 attention: they are judged by cosine, as fused graphs are, not refused for it."""
    monkeypatch.setattr(fusion, "fusable", lambda device, dtype: False)
    encoder = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16")
    assert encoder.graph == "traced" and encoder.fused_linears == 0
    traced = encoder._traced
    assert traced is not None
    assert len({id(traced.narrow), id(traced.short), id(traced.wide)}) == 3
    eager = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16", graph="eager")
    for texts in (NARROW, SHORT, WIDE):
        assert embeddings_differ(encoder.embed(texts), eager.embed(texts), torch.bfloat16,
                                 rounded_otherwise=True) == ""
