"""Verdict thresholds per version (issue #16): stored and validated in the registry, resolved
(version, builtin, seed default), carried by workers' replies and judged by the client.
No processes here: tests/test_thresholds_serve.py runs real pools."""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.serving import serve
from pool import builtin, config
from pool.builtin import embedded_model_path
from pool.passes import DeviceThread, Job, JobQueue
from pool.quality import SEED_THRESHOLDS, Thresholds
from pool.registry import REGISTRY_FILE, Registry
from pool.reports import BatchStats
from pool.thresholds import (
    SOURCE_BUILTIN,
    SOURCE_SEED,
    SOURCE_VERSION,
    resolve_thresholds,
    thresholds_from_json,
)
from pool.worker import WorkerConfig
from router import protocol
from router.client import Similarity, VerdictThresholds, decode_reply, verdict
from tests.modelstub import model_stub

E5_LIKE = Thresholds(high=0.92, low=0.86)


def model_dir(root: Path, name: str = "m") -> Path:
    return model_stub(root / name)


# ------------------------------------------------------------------------- the registry


def test_thresholds_round_trip_through_the_registry_file(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.add("v1", str(model_dir(tmp_path)), thresholds=[0.92, 0.86])
    registry.add("v2", str(model_dir(tmp_path, "m2")))
    registry.save()
    stored = orjson.loads((tmp_path / REGISTRY_FILE).read_bytes())["versions"]
    assert stored["v1"]["thresholds"] == [0.92, 0.86] and stored["v2"]["thresholds"] is None

    again = Registry(tmp_path)
    assert again.own_thresholds("v1") == E5_LIKE
    assert again.own_thresholds("v2") is None
    rows = {row["version"]: row for row in again.listing()}
    assert (rows["v1"]["thresholds"], rows["v1"]["thresholds_source"]) == (
        [0.92, 0.86], SOURCE_VERSION)
    assert (rows["v2"]["thresholds"], rows["v2"]["thresholds_source"]) == (
        [0.85, 0.5], SOURCE_SEED)


def test_adding_again_without_thresholds_keeps_them_and_none_clears_them(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    path = str(model_dir(tmp_path))
    registry.add("v1", path, thresholds=E5_LIKE)
    registry.add("v1", path, auto_load=True)
    assert registry.own_thresholds("v1") == E5_LIKE
    assert registry.set_thresholds("v1", None) is None
    assert registry.thresholds_of("v1", path).source == SOURCE_SEED


@pytest.mark.parametrize("value,words", [
    ([0.5, 0.9], "must be below"),
    ([1.5, 0.2], "outside [-1, 1]"),
    ([0.9, -1.2], "outside [-1, 1]"),
    ([0.9], "two numbers"),
    ("0.9,0.5", "two numbers"),
    ([0.9, "x"], "is not a number"),
    ([True, 0.5], "is not a number"),
])
def test_bad_thresholds_are_refused_with_the_reason(tmp_path: Path, value: object,
                                                    words: str) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        registry.add("v1", str(model_dir(tmp_path)), thresholds=value)
    assert registry.version("v1") is None  # nothing half-written


def test_setting_thresholds_of_an_unknown_version_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown version"):
        Registry(tmp_path).set_thresholds("nope", [0.9, 0.5])


def test_a_hand_edited_invalid_entry_is_listed_as_invalid(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.add("v1", str(model_dir(tmp_path)))
    registry.data["versions"]["v1"]["thresholds"] = [0.2, 0.4]
    (row,) = registry.listing()
    assert row["thresholds_source"].startswith("invalid")


# ---------------------------------------------------------------------- which thresholds


def test_builtin_thresholds_recognise_the_embedded_minilm(tmp_path: Path) -> None:
    embedded = embedded_model_path()
    assert builtin.builtin_thresholds(embedded) == builtin.MINILM_THRESHOLDS
    assert builtin.builtin_thresholds(str(embedded) + "/.") == builtin.MINILM_THRESHOLDS
    assert builtin.builtin_thresholds(model_dir(tmp_path)) is None
    assert builtin.builtin_thresholds(tmp_path / "missing") is None


def test_builtin_thresholds_recognise_a_converted_e5_directory_by_its_manifest(
        tmp_path: Path) -> None:
    converted = model_dir(tmp_path, "e5")
    (converted / builtin.MANIFEST).write_text(json.dumps({"builtin": builtin.E5_BUILTIN}))
    assert builtin.builtin_thresholds(converted) == builtin.E5_THRESHOLDS
    # A directory converted before e5's prompts: its texts go in as given, and were
    # calibrated so.
    (converted / builtin.MANIFEST).write_text(json.dumps({"builtin": builtin.E5_BUILTIN,
                                                          "converter_version": 1}))
    assert builtin.builtin_thresholds(converted) == builtin.E5_UNPROMPTED_THRESHOLDS
    other = model_dir(tmp_path, "other")
    (other / builtin.MANIFEST).write_text(json.dumps({"builtin": "something-else"}))
    assert builtin.builtin_thresholds(other) is None
    (other / builtin.MANIFEST).write_text("not json")
    assert builtin.builtin_thresholds(other) is None


def test_calibrated_builtin_thresholds_are_valid_and_their_own() -> None:
    for cuts in (builtin.MINILM_THRESHOLDS, builtin.E5_THRESHOLDS):
        assert Thresholds(cuts.high, cuts.low) == cuts
    # e5 scores everything in 0.8-0.97: the seed's cuts would call nearly all "very similar".
    assert builtin.E5_THRESHOLDS.low > SEED_THRESHOLDS.high


def test_resolution_prefers_the_versions_own_then_the_builtin_then_the_seed(
        tmp_path: Path) -> None:
    embedded = str(embedded_model_path())
    assert resolve_thresholds(E5_LIKE, embedded).source == SOURCE_VERSION
    assert resolve_thresholds(None, embedded).source == SOURCE_BUILTIN
    seed = resolve_thresholds(None, str(model_dir(tmp_path)))
    assert (seed.thresholds, seed.source) == (SEED_THRESHOLDS, SOURCE_SEED)
    assert seed.as_dict() == {"thresholds": [0.85, 0.5], "thresholds_source": "seed default"}


def test_thresholds_from_json_accepts_integers_and_none() -> None:
    assert thresholds_from_json([1, 0]) == Thresholds(1.0, 0.0)
    assert thresholds_from_json(None) is None


# ------------------------------------------------------------------- the worker's reply


def test_a_worker_puts_its_thresholds_in_every_similarity_reply() -> None:
    cfg = WorkerConfig("v1-0-1", "v1", "/m", "cpu", config.PoolSettings(path="/m"),
                       thresholds=E5_LIKE)
    assert pickle.loads(pickle.dumps(cfg)).thresholds == E5_LIKE  # what the worker gets
    device = DeviceThread(JobQueue(), "v1", 8, 0.0, embed=lambda ids: np.eye(len(ids)),
                          stats=BatchStats(), thresholds=cfg.thresholds)
    job = Job((1).to_bytes(8, "little"), protocol.OP_SIMILARITY, ["a", "b"], 1,
              ids=[[1], [2]])
    device._serve([job])
    ((_, status, body),) = protocol.split_replies(b"".join(device.outbox))
    assert status == protocol.STATUS_OK
    assert orjson.loads(body) == {"scores": [0.0], "version": "v1", "thresholds": [0.92, 0.86]}


# ------------------------------------------------------------------------- the client


def reply_frames(body: dict) -> list[bytes]:
    return [protocol.PROTOCOL, b"id", protocol.STATUS_OK, orjson.dumps(body)]


def test_similarity_verdicts_use_the_thresholds_of_the_reply() -> None:
    result = decode_reply(protocol.OP_SIMILARITY, reply_frames(
        {"scores": [0.95, 0.9, 0.6], "version": "e5", "thresholds": [0.92, 0.86]}))
    assert isinstance(result, Similarity)
    assert result.thresholds == VerdictThresholds(0.92, 0.86)
    assert result.verdicts == ["very similar", "related", "unrelated"]
    assert result.verdict(2) == "unrelated"


@pytest.mark.parametrize("extra", [{}, {"thresholds": None}, {"thresholds": [0.2, 0.9]},
                                   {"thresholds": "0.9,0.5"}, {"thresholds": [2, 0.5]}])
def test_a_reply_without_valid_thresholds_gets_the_seeds(extra: dict) -> None:
    result = decode_reply(protocol.OP_SIMILARITY, reply_frames(
        {"scores": [0.95, 0.9, 0.6, 0.4], "version": "old", **extra}))
    assert isinstance(result, Similarity)
    assert result.thresholds == (0.85, 0.5)
    assert result.verdicts == ["very similar", "very similar", "related", "unrelated"]


def test_the_module_verdict_keeps_the_seeds_by_default_and_takes_any_thresholds() -> None:
    assert [verdict(s) for s in (0.86, 0.85, 0.51, 0.5)] == [
        "very similar", "related", "related", "unrelated"]
    assert verdict(0.9, E5_LIKE) == "related"
    assert verdict(0.9, VerdictThresholds(0.85, 0.5)) == "very similar"


# --------------------------------------------------------------------------- settings


def test_serve_thresholds_is_one_declared_setting_parsed_by_its_flag(tmp_path: Path) -> None:
    params = inspect.signature(serve).parameters
    assert "thresholds" in params and params["thresholds"].default is None
    assert "thresholds" not in config.shown_settings(config.PoolSettings(path="/m"))
    spec = dict((name, flag) for name, _, flag in config.flags())["thresholds"]
    assert spec.parser("0.92,0.86") == E5_LIKE
    bad = CliRunner().invoke(app, ["serve", "--thresholds", "0.5,0.9",
                                   "--state-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "must be above" in bad.output


# ----------------------------------------------------------------- the CLI, offline


def test_versions_add_and_list_show_thresholds_and_their_source(tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state")]
    added = runner.invoke(app, ["versions", "add", "v1", "--path", str(model_dir(tmp_path)),
                                "--thresholds", "0.92,0.86", "--json", *state])
    assert added.exit_code == 0, added.output
    runner.invoke(app, ["versions", "add", "mini", "--path",
                        str(embedded_model_path()), *state])
    listed = json.loads(runner.invoke(app, ["versions", "list", "--json", *state]).output)
    rows = {row["version"]: row for row in listed["versions"]}
    assert (rows["v1"]["thresholds"], rows["v1"]["thresholds_source"]) == (
        [0.92, 0.86], "version")
    assert rows["mini"]["thresholds_source"] == "builtin"
    table = runner.invoke(app, ["versions", "list", *state]).output
    assert "0.92 / 0.86 (version)" in table

    bad = runner.invoke(app, ["versions", "add", "v2", "--path", str(model_dir(tmp_path, "x")),
                              "--thresholds", "1.5,0.9", *state])
    assert bad.exit_code == 2 and "outside [-1, 1]" in bad.output


def test_calibrate_names_the_bad_line_before_touching_any_pool(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("2\t今天天气真好\t今日阳光明媚\n0\t股票\n", encoding="utf-8")
    done = CliRunner().invoke(app, ["calibrate", "v1", "--pairs", str(pairs), "--json",
                                    "--endpoint", f"ipc://{tmp_path}/none.sock"])
    assert done.exit_code == 2
    error = json.loads(done.output)["error"]
    assert error["code"] == "bad_pairs_file" and "line 2" in error["message"]
