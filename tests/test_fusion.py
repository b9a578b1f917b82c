"""pool.fusion: a CPU bf16 model's linears through oneDNN, the feed-forward GELU folded in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from pool import fusion
from pool.runtime import Encoder, SentenceVectors, embeddings_differ
from tests.support import SENTENCES

needs_onednn_bf16 = pytest.mark.skipif(
    not fusion.fusable(torch.device("cpu"), torch.bfloat16),
    reason="oneDNN runs no bf16 on this CPU (torch asks for AVX-512)")
ONEDNN_LINEAR = "mkldnn::_linear_pointwise"  # the op a fused graph runs its linears as


def graphs_of(encoder: Encoder) -> list[torch.jit.ScriptModule]:
    assert encoder._traced is not None
    return [encoder._traced.narrow, encoder._traced.short, encoder._traced.wide]


def differ(got: torch.Tensor, want: torch.Tensor) -> str:
    """Why a fused graph's embeddings would be refused ("" when they pass)."""
    return embeddings_differ(got, want, torch.bfloat16, rounded_otherwise=True)


def _unit_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)), dim=1)


@needs_onednn_bf16
def test_the_fused_copy_packs_the_linears_folds_each_gelu_and_leaves_the_model_alone(
        models: dict[str, Path]) -> None:
    model = AutoModel.from_pretrained(str(models["v1"]), dtype=torch.bfloat16).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    fused, moved = fusion.fused_copy(model)
    ours = [m for m in fused.modules() if isinstance(m, fusion.OneDnnLinear)]
    assert moved == len(ours) == len(linears) > 0
    assert not any(type(m) is torch.nn.Linear for m in fused.modules())
    # Each linear's weight in oneDNN's layout (not reordered again on every call), the same
    # numbers; the rest shared with the model, not copied.
    assert all(m.weight.is_mkldnn for m in ours)
    assert all(torch.equal(mine.weight.to_dense(), theirs.weight)
               for mine, theirs in zip(ours, linears, strict=True))
    assert all(mine.bias is theirs.bias for mine, theirs in zip(ours, linears, strict=True))
    assert fused.embeddings.word_embeddings.weight is model.embeddings.word_embeddings.weight
    layers = model.config.num_hidden_layers
    assert [m.post for m in ours].count("gelu") == layers
    assert all(isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity) and
               layer.intermediate.dense.post == "gelu" for layer in fused.encoder.layer)
    # The model itself is as transformers built it: the reference a graph is checked against.
    assert all(type(m) is torch.nn.Linear for m in linears)
    assert not any(isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
                   for layer in model.encoder.layer)


@needs_onednn_bf16
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
def test_the_fused_copy_computes_what_the_model_does(activation: str) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, hidden_act=activation)
    model = BertModel(config).to(torch.bfloat16).eval()
    fused, moved = fusion.fused_copy(model)
    assert moved == 2 * 6 + 1  # per layer: query, key, value, output, feed-forward x 2; pooler
    folded = sum(isinstance(m, fusion.OneDnnLinear) and m.post == "gelu"
                 for m in fused.modules())
    assert folded == (0 if activation == "relu" else 2)  # relu stays a kernel of its own
    ids = torch.randint(1, 200, (5, 11))
    mask = torch.ones_like(ids)
    mask[3:, 7:] = 0
    with torch.inference_mode():
        want = SentenceVectors(model)(ids, mask)
        got = SentenceVectors(fused)(ids, mask)
    assert differ(got, want) == ""
    if activation != "relu":  # really another computation: one rounding fewer a layer
        assert not torch.equal(got, want)


@needs_onednn_bf16
def test_a_cpu_bf16_encoder_traces_the_fused_copy_and_fp32_keeps_torchs_linears(
        models: dict[str, Path]) -> None:
    low = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16")
    assert low.graph == "traced" and low.fused_linears > 0 and not low.fusion_note
    exact = Encoder(str(models["v1"]), device="cpu", dtype="float32")
    assert exact.graph == "traced" and exact.fused_linears == 0
    plain = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16", graph="eager")
    for graph in graphs_of(low):
        assert ONEDNN_LINEAR in str(graph.graph) and "aten::linear" not in str(graph.graph)
        # Frozen with the packed weights as they are: freezing inlines dense tensors as
        # constants and leaves the opaque ones attributes; none goes back to torch's layout.
        assert 'GetAttr[name="weight"]' in str(graph.graph)
        assert "to_dense" not in str(graph.graph)
    wide = ["今天天气真好，我们去公园散步吧" * 4, "the weather is fine today " * 8]
    for texts in (SENTENCES, wide):  # both graphs: the short passes' and the wide ones'
        assert differ(low.embed(texts), plain.embed(texts)) == ""


@needs_onednn_bf16
def test_a_fused_graph_that_computes_something_else_falls_back_to_torchs_linears(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def skewed(self: fusion.OneDnnLinear, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, self.weight, self.bias, self.post, self.algorithm) + 1.0

    monkeypatch.setattr(fusion.OneDnnLinear, "forward", skewed)
    low = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16")
    assert low.graph == "traced" and low.fused_linears == 0
    assert "cosine" in low.fusion_note and "GraphCheckFailed" in low.fusion_note
    for graph in graphs_of(low):
        assert ONEDNN_LINEAR not in str(graph.graph) and "aten::linear" in str(graph.graph)
    plain = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16", graph="eager")
    assert differ(low.embed(SENTENCES), plain.embed(SENTENCES)) == ""


def test_embeddings_differ_by_cosine_whatever_their_width() -> None:
    for width in (32, 384):
        want = _unit_rows(4, width, seed=1)
        assert differ(want.clone(), want) == ""
        near = torch.nn.functional.normalize(want + 0.003 * _unit_rows(4, width, seed=2), dim=1)
        assert differ(near, want) == ""
        # A mask read wrong once gave cosine 0.957 against the right embeddings.
        far = torch.nn.functional.normalize(want + 0.3 * _unit_rows(4, width, seed=3), dim=1)
        assert "under" in differ(far, want)
    nan = want.clone()
    nan[2, 0] = float("nan")
    assert "cosine nan" in differ(nan, want)
    assert "shape" in differ(want[:3], want)


def test_only_cpu_bf16_is_fused() -> None:
    assert not fusion.fusable(torch.device("cpu"), torch.float32)
    assert not fusion.fusable(torch.device("cuda", 0), torch.bfloat16)
    assert not fusion.fusable(torch.device("cuda", 0), torch.float16)
