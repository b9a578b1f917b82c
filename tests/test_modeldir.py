"""pool.modeldir: what a model directory must hold before a worker is spent on it. Each
breakage a copy or a typo makes, refused with the file and the reason; fast, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pool.builtin import embedded_model_path
from pool.modeldir import (
    NO_PROMPTS,
    ModelDirError,
    Prompts,
    check_model_dir,
    pooling_of,
    prompts_of,
)
from tests.modelstub import model_stub, with_pooling, with_prompts


def test_a_complete_directory_passes_as_its_absolute_path(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model_stub(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert check_model_dir("m") == str(tmp_path / "m")
    minilm = embedded_model_path()
    assert check_model_dir(str(minilm)) == str(minilm.resolve())


def refused(directory: Path) -> str:
    with pytest.raises(ModelDirError) as exc:
        check_model_dir(str(directory))
    return str(exc.value)


def test_no_directory_or_no_config(tmp_path: Path) -> None:
    assert "is not a directory" in refused(tmp_path / "missing")
    model = model_stub(tmp_path / "m")
    (model / "config.json").unlink()
    assert "not a transformers model directory (no config.json)" in refused(model)


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"hidden_size": 32}', "names no model_type"),
])
def test_a_config_that_is_not_a_transformers_config(tmp_path: Path, content: str,
                                                    says: str) -> None:
    model = model_stub(tmp_path / "m")
    (model / "config.json").write_text(content)
    assert says in refused(model)


def test_weights_missing_garbage_or_cut_short_name_the_file(tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    for content in (b"garbage" * 100, b"\0" * 64, whole[:-1], whole + b"x"):
        weights.write_bytes(content)
        assert f"{weights} is not a safetensors file" in refused(model)
    save_file({}, str(weights))
    assert "holds no tensors" in refused(model)
    weights.unlink()
    assert "holds no weights" in refused(model)


def test_shards_are_checked_each_and_a_missing_one_named(tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    (model / "model.safetensors").unlink()
    for i in (1, 2):
        save_file({f"w{i}": np.ones(2, dtype=np.float32)},
                  str(model / f"model-0000{i}-of-00002.safetensors"))
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w1": "model-00001-of-00002.safetensors",
                                                "w2": "model-00002-of-00002.safetensors"}}))
    assert check_model_dir(str(model))
    (model / "model-00002-of-00002.safetensors").write_bytes(b"cut")
    assert "model-00002-of-00002.safetensors is not a safetensors file" in refused(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    assert "lists model-00002-of-00002.safetensors, which is missing" in refused(model)
    index.write_text('{"weight_map": {}}')
    assert "has no weight_map" in refused(model)


def test_a_torch_checkpoint_must_be_torch_saves_zip_or_a_pickle(tmp_path: Path) -> None:
    import zipfile

    model = model_stub(tmp_path / "m")
    (model / "model.safetensors").unlink()
    checkpoint = model / "pytorch_model.bin"
    checkpoint.write_bytes(b"<html>404 Not Found</html>")  # what a failed download saves
    assert "is not a torch checkpoint" in refused(model)
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert check_model_dir(str(model))


def test_no_tokenizer(tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    (model / "vocab.txt").unlink()
    assert "holds no tokenizer" in refused(model)


def test_pooling_is_the_sentence_transformers_modules_else_the_seeds_mean(
        tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    assert pooling_of(model) == "mean"  # no Pooling module: the seed's
    assert pooling_of(embedded_model_path()) == "mean"  # all-MiniLM-L6-v2 says so
    for mode, name in [("cls_token", "cls"), ("max_tokens", "max"), ("lasttoken", "lasttoken"),
                       ("mean_tokens", "mean")]:
        assert pooling_of(with_pooling(model, tmp_path / mode, mode)) == name
    # The folder modules.json names, wherever it is; 1_Pooling alone is read too.
    moved = with_pooling(model, tmp_path / "moved", "cls_token")
    (moved / "1_Pooling").rename(moved / "pool")
    modules = json.loads((moved / "modules.json").read_text())
    modules[1]["path"] = "pool"
    (moved / "modules.json").write_text(json.dumps(modules))
    assert pooling_of(moved) == "cls"
    (moved / "modules.json").unlink()
    (moved / "pool").rename(moved / "1_Pooling")
    assert pooling_of(moved) == "cls"


@pytest.mark.parametrize(("modes", "says"), [
    (("weightedmean_tokens",), "asks for pooling_mode_weightedmean_tokens"),
    (("cls_token", "mean_tokens"), "asks for pooling_mode_cls_token + pooling_mode_mean_tokens"),
    ((), "asks for no pooling mode"),
])
def test_a_pooling_this_pool_does_not_compute_is_refused_not_replaced(
        tmp_path: Path, modes: tuple[str, ...], says: str) -> None:
    model = with_pooling(model_stub(tmp_path / "m"), tmp_path / "p", *modes)
    message = refused(model)
    assert says in message and "exactly one of" in message


def test_a_module_past_the_pooling_that_this_pool_does_not_run_is_refused(
        tmp_path: Path) -> None:
    # LaBSE projects its pooled vector through a Dense layer: left out, every vector is wrong.
    model = with_pooling(model_stub(tmp_path / "m"), tmp_path / "dense", "cls_token")
    modules = json.loads((model / "modules.json").read_text())
    modules += [{"idx": 2, "name": "2", "path": "2_Dense",
                 "type": "sentence_transformers.models.Dense"},
                {"idx": 3, "name": "3", "path": "3_Normalize",
                 "type": "sentence_transformers.models.Normalize"}]
    (model / "modules.json").write_text(json.dumps(modules))
    assert "lists sentence_transformers.models.Dense, which this pool does not run" in \
        refused(model)
    (model / "modules.json").write_text(json.dumps(modules[:2] + modules[3:]))
    assert check_model_dir(str(model)) and pooling_of(model) == "cls"


def test_what_a_users_sweep_found_past_the_first_checks(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="the model's path is empty"):
        check_model_dir("")
    model = model_stub(tmp_path / "m")
    # A tokenizer.json cut short (a copy interrupted): named, not found by a worker.
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    assert f"{model / 'tokenizer.json'} is not valid JSON" in refused(model)
    (model / "tokenizer.json").unlink()
    # A zip that is not torch.save's.
    (model / "model.safetensors").unlink()
    import zipfile

    with zipfile.ZipFile(model / "pytorch_model.bin", "w") as archive:
        archive.writestr("readme.txt", "not weights")
    assert "is a zip but not a torch checkpoint" in refused(model)


def test_a_pooling_config_read_as_sentence_transformers_reads_it(tmp_path: Path) -> None:
    model = with_pooling(model_stub(tmp_path / "m"), tmp_path / "p", "cls_token")
    config = model / "1_Pooling" / "config.json"
    config.write_text('{"pooling_mode_cls_token": 1, "pooling_mode_mean_tokens": 0}')
    assert pooling_of(model) == "cls"  # truthy, as sentence-transformers reads it
    config.unlink()
    assert f"{config} is missing" in refused(model)
    (model / "modules.json").write_text('{"0": "x"}')  # not a list: not ignored either
    assert "is not a list of modules" in refused(model)


def test_prompts_are_read_as_sentence_transformers_declares_them(tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    assert prompts_of(model) == NO_PROMPTS and NO_PROMPTS.text_of(None) == ""
    e5 = {"query": "query: ", "passage": "passage: "}
    prompts = prompts_of(with_prompts(model, tmp_path / "e5", e5, default="query"))
    assert prompts == Prompts(e5, "query")
    assert prompts.text_of(None) == "query: " and prompts.text_of("passage") == "passage: "
    with pytest.raises(KeyError):
        prompts.text_of("document")
    assert prompts_of(with_prompts(model, tmp_path / "nodefault", e5)).text_of(None) == ""


def test_prompts_that_cannot_be_applied_are_refused(tmp_path: Path) -> None:
    model = model_stub(tmp_path / "m")
    assert "is not one of its prompts (query)" in refused(
        with_prompts(model, tmp_path / "a", {"query": "q: "}, default="passage"))
    assert "must map names to texts" in refused(
        with_prompts(model, tmp_path / "b", {"query": 3}))  # type: ignore[dict-item]
    pooled = with_pooling(model, tmp_path / "c", "mean_tokens")
    config = pooled / "1_Pooling" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "include_prompt": False}))
    assert "include_prompt: false" in refused(
        with_prompts(pooled, tmp_path / "d", {"query": "q: "}))
