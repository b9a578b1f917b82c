"""Score semantics against the seed's in-process computation, batching, dedupe, truncation."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pool.builtin import embedded_model_path
from pool.cudagraphs import ROW_BUCKETS, WIDTH_BUCKETS, bucket, buckets_up_to
from pool.health import TOLERANCE_HALF
from pool.runtime import (
    CHUNK_SECONDS,
    CHUNK_TOKENS_RANGE,
    GRAPH_TOLERANCE,
    GRID_STEP,
    MIN_COSINE,
    OVERHEAD_ROWS,
    OVERHEAD_TOKENS_RANGE,
    OVERHEAD_WIDTH,
    SHORT_PASS_TOKENS,
    Encoder,
    GraphCheckFailed,
    ModelWeightsError,
    PassCost,
    TokenIdEncoder,
    cpu_flags,
    fixed_cost_tokens,
    grid_rows,
    padded,
    plan_chunks,
    resolve_dtype,
)
from tests.modelstub import weights_of_another_shape, with_pooling
from tests.support import SENTENCES, TINY_MAX_LENGTH, Reference

TOLERANCE = 1e-4
# The traced fp32 graph against the eager model: the same arithmetic in another order of
# kernels, so a few ulps apart. 1.2e-6 on a Zen 4 EPYC (session 24), under 1e-6 on a Xeon;
# still a hundredth of the pool's 1e-4 contract with the seed's computation.
GRAPH_ATOL = 1e-5


@pytest.fixture(scope="module")
def encoder(models: dict[str, Path]) -> Encoder:
    torch.set_num_threads(1)
    return Encoder(str(models["v1"]), device="cpu", dtype="float32", chunk_texts=3)


def test_float32_keeps_the_models_max_length(encoder: Encoder) -> None:
    assert encoder.dtype == torch.float32
    assert encoder.max_length == TINY_MAX_LENGTH


@pytest.mark.parametrize(("flags", "device", "want"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "cpu", torch.bfloat16),
    ({"avx2", "amx_tile", "amx_bf16"}, "cpu", torch.bfloat16),
    ({"avx2", "avx512f"}, "cpu", torch.float32),  # bf16 emulated: slower than fp32
    (set(), "cpu", torch.float32),  # no /proc/cpuinfo
    ({"avx512_bf16"}, "cuda:0", torch.float16),
])
def test_auto_dtype_is_fp16_on_cuda_and_bf16_only_on_cpus_with_native_bf16(
        flags: set[str], device: str, want: torch.dtype) -> None:
    assert resolve_dtype("auto", device, lambda: frozenset(flags)) == want
    assert resolve_dtype("float32", device, lambda: frozenset(flags)) == torch.float32


def test_cpu_runs_a_traced_graph_that_computes_what_the_eager_model_does(
        models: dict[str, Path], encoder: Encoder) -> None:
    assert encoder.graph == "traced" and not encoder.graph_note
    eager = Encoder(str(models["v1"]), device="cpu", dtype="float32", graph="eager")
    assert eager.graph == "eager"
    texts = [*SENTENCES, "今天天气真好今天天气真好今天天气真好", "a"]  # several widths
    assert torch.allclose(encoder.embed(texts), eager.embed(texts), atol=GRAPH_ATOL)
    # Passes wider than SHORT_PASS_TOKENS run the other graph (the model's own attention).
    wide = ["今天天气真好，我们去公园散步吧" * 4, "the weather is fine today " * 8]
    assert min(len(ids) for ids in encoder.token_ids(wide)) > SHORT_PASS_TOKENS
    assert torch.allclose(encoder.embed(wide), eager.embed(wide), atol=GRAPH_ATOL)


def pooled_one_by_one(path: Path, texts: list[str], mode: str) -> torch.Tensor:
    """The model's sentence vectors as sentence-transformers pools them, computed apart from
    pool.runtime: one text a pass, so no padding to leave out."""
    from transformers import AutoModel

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    rows = []
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            rows.append({"cls_token": hidden[0], "max_tokens": hidden.max(dim=0).values,
                         "lasttoken": hidden[-1], "mean_tokens": hidden.mean(dim=0)}[mode])
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


@pytest.mark.parametrize(("mode", "pooling"), [("cls_token", "cls"), ("max_tokens", "max"),
                                               ("lasttoken", "lasttoken")])
def test_a_model_is_pooled_as_its_sentence_transformers_config_says(
        models: dict[str, Path], tmp_path: Path, mode: str, pooling: str) -> None:
    model = with_pooling(models["v1"], tmp_path / mode, mode)
    texts = [*SENTENCES[:4], "好", "今天天气真好今天天气真好今天天气真好"]  # widths differ: padding
    want = pooled_one_by_one(model, texts, mode)
    for graph in ("traced", "eager"):
        encoder = Encoder(str(model), dtype="float32", graph=graph)
        assert (encoder.pooling, encoder.graph) == (pooling, graph)
        assert torch.allclose(encoder.embed(texts), want, atol=TOLERANCE)
    mean = Encoder(str(models["v1"]), dtype="float32").embed(texts)
    assert not torch.allclose(mean, want, atol=0.01)  # the pooling is what changed them


def without_weights(model: Path, copy: Path, *prefixes: str) -> Path:
    """A copy of `model` whose checkpoint lacks the weights named by `prefixes`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, copy)
    weights = load_file(copy / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    assert len(kept) < len(weights)
    save_file(kept, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_weights_that_do_not_fill_the_config_are_refused_by_name(
        models: dict[str, Path], tmp_path: Path, reference: dict[str, Reference]) -> None:
    resized = weights_of_another_shape(models["v1"], tmp_path / "resized")
    with pytest.raises(ModelWeightsError, match=(
            r"do not fit config.json: encoder\.layer\.0\.intermediate\.dense\.bias is \[64\] "
            r"in the checkpoint, \[128\] by the config \(6 weights in all\)")):
        Encoder(str(resized), dtype="float32")
    # A weight the checkpoint lacks would be random numbers, serving without an error.
    lacking = without_weights(models["v1"], tmp_path / "lacking", "encoder.layer.1.output.")
    with pytest.raises(ModelWeightsError, match=r"lacks 4 of the model's weights \(the first: "
                       r"encoder\.layer\.1\.output\.LayerNorm\.bias\)"):
        Encoder(str(lacking), dtype="float32")
    # Mean pooling never reads BERT's pooler: a checkpoint without it serves as it would.
    no_pooler = Encoder(str(without_weights(models["v1"], tmp_path / "np", "pooler.")),
                        dtype="float32")
    pair = ("今天天气真好", "今日阳光明媚")
    assert abs(no_pooler.similarity([pair])[0] - reference["v1"].similarity(*pair)) < TOLERANCE


def test_a_model_that_cannot_be_traced_runs_eager_under_auto_and_fails_under_traced(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        reference: dict[str, Reference]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    auto = Encoder(str(models["v1"]), device="cpu", dtype="float32")
    assert auto.graph == "eager" and "cannot trace this model" in auto.graph_note
    pair = ("今天天气真好", "今日阳光明媚")
    assert abs(auto.similarity([pair])[0] - reference["v1"].similarity(*pair)) < TOLERANCE
    with pytest.raises(RuntimeError, match="cannot trace"):
        Encoder(str(models["v1"]), device="cpu", dtype="float32", graph="traced")


def test_a_traced_graph_that_computes_something_else_is_refused(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    freeze = torch.jit.freeze

    class Skewed(torch.nn.Module):
        """The frozen graph with its output moved: what a mis-traced branch would give."""

        def __init__(self, graph: torch.nn.Module) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            vectors = self.graph(input_ids, mask)
            return vectors + torch.linspace(0, 1, vectors.shape[-1])

    monkeypatch.setattr(torch.jit, "freeze", lambda module: Skewed(freeze(module)))
    with pytest.raises(GraphCheckFailed, match="differ"):
        Encoder(str(models["v1"]), device="cpu", dtype="float32", graph="traced")
    assert Encoder(str(models["v1"]), device="cpu", dtype="float32").graph == "eager"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n"
                       "flags\t\t: fpu sse2 avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bfloat16_weights_give_float32_embeddings_close_to_float32(
        models: dict[str, Path], encoder: Encoder) -> None:
    low = Encoder(str(models["v1"]), device="cpu", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    got = low.embed(SENTENCES)
    assert got.dtype == torch.float32  # pooling and normalisation ran in fp32
    assert torch.allclose(got.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    pairs = list(itertools.combinations(SENTENCES, 2))
    drift = max(abs(a - b) for a, b in zip(low.similarity(pairs), encoder.similarity(pairs),
                                           strict=True))
    # Really bf16, and close: the tiny model's deliberately wide random weights amplify
    # rounding (3e-2 here); the real MiniLM moves by 2.5e-3 (docs/benchmarks.md).
    assert 0 < drift < 5 * TOLERANCE_HALF


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


def test_a_sentence_transformers_max_seq_length_bounds_the_input(
        models: dict[str, Path], tmp_path: Path, encoder: Encoder) -> None:
    # all-MiniLM-L6-v2 says 256 in sentence_bert_config.json while its tokenizer allows 512:
    # sentence-transformers (and TEI, Infinity) truncate at 256, and so must a pool.
    model = tmp_path / "st-model"
    shutil.copytree(models["v1"], model)
    (model / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    limited = Encoder(str(model), dtype="float32")
    assert limited.max_length == 16 < encoder.max_length
    long_text = "今天天气真好" * 10  # 60 characters, a token each
    assert len(limited.token_ids([long_text])[0]) == 16
    head = long_text[:14]  # what fits between [CLS] and [SEP]
    assert torch.allclose(limited.embed([long_text]), encoder.embed([head]), atol=1e-5)


def test_warm_up_runs_the_golden_pairs(encoder: Encoder) -> None:
    assert encoder.warm_up() > 0


def test_versions_differ(models: dict[str, Path]) -> None:
    v2 = Encoder(str(models["v2"]))
    v1 = Encoder(str(models["v1"]))
    pair = [("今天天气真好", "股票市场今天大跌")]
    assert abs(v1.similarity(pair)[0] - v2.similarity(pair)[0]) > 1e-3


def _cost(lengths: list[int], passes: list[tuple[int, int]], overhead: int) -> int:
    return sum((end - start) * lengths[end - 1] + overhead for start, end in passes)


def _allowed(lengths: list[int], start: int, end: int, max_rows: int, max_tokens: int) -> bool:
    rows = end - start
    return 0 < rows <= max_rows and (not max_tokens or rows == 1
                                     or rows * lengths[end - 1] <= max_tokens)


def _brute_force_cost(lengths: list[int], overhead: int, max_rows: int,
                      max_tokens: int = 0) -> int:
    """Least cost over every way of cutting the texts into passes of at most max_rows (and
    max_tokens padded tokens, unless one text alone)."""
    best = None
    for k in range(len(lengths)):
        for chosen in itertools.combinations(range(1, len(lengths)), k):
            passes = list(itertools.pairwise([0, *chosen, len(lengths)]))
            if all(_allowed(lengths, start, end, max_rows, max_tokens)
                   for start, end in passes):
                cost = _cost(lengths, passes, overhead)
                best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60).map(sorted),
    overhead=st.integers(0, 200),
    max_rows=st.integers(1, 70),
)
def test_chunk_plan_covers_every_text_once_within_the_row_limit(
    lengths: list[int], overhead: int, max_rows: int
) -> None:
    passes = plan_chunks(lengths, overhead, max_rows)
    assert passes[0][0] == 0 and passes[-1][1] == len(lengths)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(passes))
    assert all(0 < end - start <= max_rows for start, end in passes)
    # Never worse than the two obvious plans: one pass per row limit, one pass per length.
    one_pass = [(s, min(s + max_rows, len(lengths))) for s in range(0, len(lengths), max_rows)]
    assert _cost(lengths, passes, overhead) <= _cost(lengths, one_pass, overhead)


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=11).map(sorted),
    overhead=st.integers(0, 60),
    max_rows=st.integers(1, 12),
)
@example(lengths=[1, 1, 1, 2], overhead=2, max_rows=2)  # a cut inside a run pays here
def test_chunk_plan_is_the_cheapest(lengths: list[int], overhead: int, max_rows: int) -> None:
    passes = plan_chunks(lengths, overhead, max_rows)
    assert all(0 < end - start <= max_rows for start, end in passes)
    assert _cost(lengths, passes, overhead) == _brute_force_cost(lengths, overhead, max_rows)


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=11).map(sorted),
    overhead=st.integers(0, 60),
    max_rows=st.integers(1, 12),
    max_tokens=st.integers(1, 80),
)
def test_chunk_plan_with_a_token_limit_is_the_cheapest_within_it(
        lengths: list[int], overhead: int, max_rows: int, max_tokens: int) -> None:
    passes = plan_chunks(lengths, overhead, max_rows, max_tokens)
    assert passes[0][0] == 0 and passes[-1][1] == len(lengths)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(passes))
    assert all(_allowed(lengths, start, end, max_rows, max_tokens) for start, end in passes)
    assert _cost(lengths, passes, overhead) == _brute_force_cost(lengths, overhead, max_rows,
                                                                 max_tokens)


def test_long_texts_go_in_passes_of_at_most_the_token_limit() -> None:
    lengths = [16] * 100 + [512] * 100
    passes = plan_chunks(lengths, overhead_tokens=48, max_rows=128, max_tokens=8192)
    assert max((end - start) * lengths[end - 1] for start, end in passes) <= 8192
    assert (0, 100) in passes  # the short ones as before: one pass, far under the limit
    assert plan_chunks([600], 48, 128, max_tokens=512) == [(0, 1)]  # one text alone may


def test_chunk_plan_trades_padding_against_passes() -> None:
    lengths = [6] * 40 + [18] * 40
    assert plan_chunks(lengths, overhead_tokens=48, max_rows=128) == [(0, 40), (40, 80)]
    assert plan_chunks(lengths, overhead_tokens=1024, max_rows=128) == [(0, 80)]


def test_a_passs_fixed_cost_is_read_off_a_line_through_two_pass_sizes() -> None:
    # 1 ms fixed + 10 us a token: a 1x16 pass 1.16 ms, a 16x16 pass 3.56 ms.
    assert fixed_cost_tokens(1.16e-3, 3.56e-3, 16, 16) == 100
    low, high = OVERHEAD_TOKENS_RANGE
    assert fixed_cost_tokens(1.0e-3, 1.0e-3, 16, 16) == high  # noise: no cost per token seen
    assert fixed_cost_tokens(1.0e-3, 0.9e-3, 16, 16) == high
    assert fixed_cost_tokens(1e-3, 1.0, 16, 16) == low  # all compute, no fixed cost
    assert fixed_cost_tokens(10.0, 10.001, 16, 16) == high  # all fixed cost


def test_a_cpu_encoder_measures_its_passes_fixed_cost_unless_told(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement, on a clock that a pass moves by 2 ms plus 8 us a token: 250 tokens'
    worth, whatever the machine is doing. Told a cost, an encoder measures nothing."""
    told = Encoder(str(models["v1"]), dtype="float32", overhead_tokens=7)
    assert told.overhead_tokens == 7
    measured = Encoder(str(models["v1"]), dtype="float32")
    low, high = OVERHEAD_TOKENS_RANGE
    assert low <= measured.overhead_tokens <= high
    now = [0.0]
    shapes: set[tuple[int, int]] = set()

    def timed_pass(ids: list[list[int]]) -> torch.Tensor:
        shapes.add((len(ids), len(ids[0])))
        now[0] += 2e-3 + 8e-6 * len(ids) * len(ids[0])
        return torch.zeros((len(ids), measured.dim))

    monkeypatch.setattr(measured, "_forward", timed_pass)
    monkeypatch.setattr("pool.runtime.time.perf_counter", lambda: now[0])
    cost = measured.measure_pass_cost()
    assert cost.overhead_tokens == 250 and cost.seconds_per_token == pytest.approx(8e-6)
    assert cost.chunk_tokens() == CHUNK_TOKENS_RANGE[1]  # 250,000 tokens' 2 s: at the top
    assert PassCost(48, 1e-4).chunk_tokens() == int(CHUNK_SECONDS / 1e-4)  # 20,000
    assert PassCost(48, 1e-2).chunk_tokens() == CHUNK_TOKENS_RANGE[0]
    assert PassCost(48, None).chunk_tokens() is None
    assert shapes == {(1, OVERHEAD_WIDTH), (OVERHEAD_ROWS, OVERHEAD_WIDTH)}


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_scores_do_not_depend_on_how_texts_are_split(models: dict[str, Path], dtype: str) -> None:
    """Exact in fp32. In bf16 (auto, on a CPU with AVX512_BF16 or AMX) the kernels round
    differently for each shape: within the tolerance the load check allows a traced graph."""
    pairs = list(itertools.combinations(SENTENCES, 2))
    one_pass = Encoder(str(models["v1"]), dtype=dtype, overhead_tokens=10**9)
    per_length = Encoder(str(models["v1"]), dtype=dtype, overhead_tokens=0)
    got, want = one_pass.similarity(pairs), per_length.similarity(pairs)
    tolerance = 1e-5 if one_pass.dtype == torch.float32 else GRAPH_TOLERANCE[one_pass.dtype]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < tolerance


def test_padding_to_a_wider_multiple_leaves_the_embeddings_as_they_were(
        models: dict[str, Path]) -> None:
    # What a CUDA worker does to every pass (CUDA_WIDTH_MULTIPLE), checked here on CPU.
    pairs = list(itertools.combinations(SENTENCES, 2))
    tight = Encoder(str(models["v1"]), dtype="float32")
    wide = Encoder(str(models["v1"]), dtype="float32")
    wide.width_multiple = 16
    assert wide._batch(wide.token_ids(["a"]))["input_ids"].shape[1] == 16
    got, want = wide.similarity(pairs), tight.similarity(pairs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


@given(ids=st.lists(st.lists(st.integers(0, 2**40), max_size=20), min_size=1, max_size=20),
       multiple=st.integers(1, 16), pad=st.integers(0, 3))
def test_padded_ids_and_mask_are_the_rows_padded_to_a_multiple_of_the_longest(
        ids: list[list[int]], multiple: int, pad: int) -> None:
    matrix, mask = padded(ids, pad, multiple)
    longest = max(map(len, ids))
    width = matrix.shape[1]
    assert width % multiple == 0 and longest <= width < longest + multiple
    assert matrix.tolist() == [row + [pad] * (width - len(row)) for row in ids]
    assert mask.tolist() == [[1] * len(row) + [0] * (width - len(row)) for row in ids]


@given(st.integers(min_value=1, max_value=2048))
def test_grid_rows_hold_the_pass_with_little_more(rows: int) -> None:
    padded_rows = grid_rows(rows)
    assert rows <= padded_rows <= rows * 1.6 and padded_rows - rows < 64
    assert grid_rows(padded_rows) == padded_rows  # a pass on the grid stays as it is
    assert rows > 4 or padded_rows == rows  # one pair, one request: no padding


def seen_shapes(encoder: Encoder) -> list[tuple[int, ...]]:
    """The (rows, width) of every pass `encoder` runs from now on."""
    shapes: list[tuple[int, ...]] = []
    vectors = encoder._vectors

    def recording(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shapes.append(tuple(batch["input_ids"].shape))
        return vectors(batch)

    encoder._vectors = recording  # type: ignore[method-assign]
    return shapes


def test_low_precision_cpu_passes_run_on_the_grid_and_each_text_keeps_its_vector(
        models: dict[str, Path]) -> None:
    encoder = Encoder(str(models["v1"]), dtype="bfloat16", overhead_tokens=1024)
    texts = [s * k for k, s in enumerate(SENTENCES[:7], start=1)]  # 7 widths, one pass
    alone = torch.cat([encoder.embed([t]) for t in texts])
    shapes = seen_shapes(encoder)
    got = encoder.embed(texts)
    assert shapes == [(8, shapes[0][1])] and shapes[0][1] % GRID_STEP == 0
    assert got.shape == alone.shape
    assert ((got * alone).sum(dim=1) >= MIN_COSINE).all()  # row i is text i's, the filler dropped

    exact = Encoder(str(models["v1"]), dtype="float32", overhead_tokens=1024)
    shapes = seen_shapes(exact)
    exact.embed(texts)
    assert shapes[0][0] == 7  # fp32: MKL keeps nothing per shape, so no padding


@pytest.fixture(scope="module")
def tokenizers_under_test(models: dict[str, Path],
                          encoder: Encoder) -> dict[str, tuple[object, int]]:
    """The tiny BERT's and the embedded MiniLM's tokenizers, each with its length limit."""
    tiny = AutoTokenizer.from_pretrained(models["v1"])
    minilm = AutoTokenizer.from_pretrained(embedded_model_path())
    return {"tiny": (tiny, encoder.max_length), "minilm": (minilm, 64)}


TEXTS = st.lists(st.one_of(st.text(max_size=200), st.sampled_from(SENTENCES),
                           st.sampled_from(SENTENCES).map(lambda s: s * 30)),
                 min_size=1, max_size=12)


@given(texts=TEXTS, which=st.sampled_from(["tiny", "minilm"]))
def test_token_ids_and_lengths_over_the_limit_are_what_the_transformers_tokenizer_gives(
    tokenizers_under_test: dict[str, tuple[object, int]], texts: list[str], which: str
) -> None:
    tokenizer, max_length = tokenizers_under_test[which]
    encoder = TokenIdEncoder(tokenizer, max_length)
    want = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator]
    assert encoder(texts) == want
    whole = tokenizer(texts, truncation=False, verbose=False)["input_ids"]  # type: ignore[operator]
    assert encoder.over_limit(texts) == {i: len(ids) for i, ids in enumerate(whole)
                                         if len(ids) > max_length}


@given(texts=TEXTS)
def test_an_encoder_tokenises_as_its_transformers_tokenizer_on_the_one_it_took_over(
    tokenizers_under_test: dict[str, tuple[object, int]], encoder: Encoder, texts: list[str]
) -> None:
    tokenizer, max_length = tokenizers_under_test["tiny"]
    want = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator]
    assert encoder.token_ids(texts) == want
    assert not any(isinstance(value, PreTrainedTokenizerBase) for value in vars(encoder).values())


@given(st.integers(min_value=1, max_value=4096),
       st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=12, unique=True))
def test_a_bucket_is_the_smallest_that_holds_the_value_and_the_last_holds_all(
    value: int, sizes: list[int]
) -> None:
    buckets = tuple(sorted(sizes))
    chosen = bucket(value, buckets)
    assert chosen in buckets
    assert chosen >= value or chosen == buckets[-1]
    assert all(b < value for b in buckets if b < chosen)


def test_cuda_graph_buckets_end_at_the_models_limits() -> None:
    assert buckets_up_to(1024, ROW_BUCKETS)[-1] == 1024
    assert buckets_up_to(100, ROW_BUCKETS) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert buckets_up_to(512, WIDTH_BUCKETS) == WIDTH_BUCKETS
    assert buckets_up_to(128, WIDTH_BUCKETS) == (16, 32, 48, 64, 96, 128)
    long_context = buckets_up_to(8192, WIDTH_BUCKETS)
    assert long_context[len(WIDTH_BUCKETS):] == (768, 1152, 1728, 2560, 3840, 5760, 8192)
    assert bucket(600, long_context) == 768
    assert all(b <= a * 1.5 for a, b in itertools.pairwise(long_context[len(WIDTH_BUCKETS) - 1:]))


def test_padding_to_a_given_width_masks_the_extra_columns() -> None:
    matrix, mask = padded([[5, 6], [7]], pad=0, width=4)
    assert matrix.tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_cudagraphs_on_a_cpu_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Encoder(str(models["v1"]), device="cpu", graph="cudagraphs")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_cuda_graphs_forward_masks_padding_as_the_model_does(
        models: dict[str, Path], attention: str) -> None:
    """What a CUDA graph captures (Encoder._graph_forward, its mask already 4-D) against the
    module: padding must be masked for plain attention too (MPNet has no other)."""
    encoder = Encoder(str(models["v1"]), dtype="float32", graph="eager", overhead_tokens=48)
    encoder.model.set_attn_implementation(attention)
    ids = encoder.token_ids(["今天天气真好", "好"])
    matrix, mask = (torch.from_numpy(x) for x in padded(ids, 0, width=16))  # a graph bucket
    with torch.inference_mode():
        got = encoder._graph_forward(matrix, mask)
        want = encoder.pooled(matrix, mask)
    assert (got - want).abs().max().item() < 1e-6


def test_the_cuda_graphs_forward_masks_padding_for_mpnet() -> None:
    from transformers import MPNetConfig, MPNetModel

    from pool.runtime import SentenceVectors

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64)).eval()
    encoder = object.__new__(Encoder)  # only what _graph_forward reads
    encoder.model, encoder.dtype, encoder.pooling = model, torch.float32, "mean"
    ids = [[0, 10, 11, 12, 2], [0, 20, 2]]
    matrix, mask = (torch.from_numpy(x) for x in padded(ids, 1, width=16))
    with torch.inference_mode():
        got = encoder._graph_forward(matrix, mask)
        want = SentenceVectors(model)(matrix, mask)
    assert (got - want).abs().max().item() < 1e-6


def test_a_roberta_style_model_takes_texts_as_long_as_its_positions_allow(
        tmp_path: Path) -> None:
    """XLM-R (e5) and RoBERTa number positions from past the padding index: a tokenizer that
    records no length limit must not let texts index past the position table."""
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    from tests.support import _vocab

    (tmp_path / "vocab.txt").write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=40, pad_token_id=0)
    RobertaModel(config).eval().save_pretrained(tmp_path)
    encoder = Encoder(str(tmp_path), dtype="float32", graph="eager", overhead_tokens=48)
    assert encoder.max_length == 39  # 40 positions, the first past padding index 0
    vectors = encoder.embed(["天" * 60, "天"])
    assert vectors.shape == (2, 32) and torch.isfinite(vectors).all()
