"""Verdict thresholds per version on a real pool (issue #16): `pool serve --thresholds`, the
replies and `pool similarity`, `pool status`, `pool calibrate` (and --save), and a rotation
to a version registered with thresholds of its own. One one-worker pool for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.client import Client
from tests.support import SENTENCES, RunningPool, run_cli, start_pool, stop_pool, wait_for

pytestmark = pytest.mark.slow

SERVED_THRESHOLDS = [0.3, 0.1]
ROTATED_THRESHOLDS = [0.6, 0.2]
# Labels for pairs of SENTENCES: 2 same meaning, 1 same topic, 0 unrelated.
LABELLED = [
    (2, 0, 1), (2, 2, 3), (1, 4, 0), (0, 5, 6), (0, 6, 7), (1, 0, 5), (0, 2, 7), (2, 6, 6),
    (1, 1, 4), (0, 3, 6), (2, 7, 7), (0, 4, 7),
]


@pytest.fixture(scope="module")
def pool(models: dict[str, Path]) -> Iterator[RunningPool]:
    running = start_pool(models["v1"], "--thresholds", "0.3,0.1", workers=1)
    yield running
    assert stop_pool(running) == 0


def pairs_file(directory: Path) -> Path:
    path = directory / "pairs.tsv"
    lines = [f"{label}\t{SENTENCES[a]}\t{SENTENCES[b]}" for label, a, b in LABELLED]
    path.write_text("# a small labelled set\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_served_version_answers_with_its_thresholds(pool: RunningPool) -> None:
    with Client(pool.endpoint) as client:
        result = client.similarity([(SENTENCES[0], SENTENCES[1]), (SENTENCES[0], SENTENCES[5])])
    assert list(result.thresholds) == SERVED_THRESHOLDS
    high, low = SERVED_THRESHOLDS
    assert result.verdicts == ["very similar" if s > high else "related" if s > low
                               else "unrelated" for s in result.scores]

    done = run_cli("similarity", SENTENCES[0], SENTENCES[1], "--json", env=pool.env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["thresholds"] == SERVED_THRESHOLDS and reply["verdict"] == result.verdicts[0]

    status = json.loads(run_cli("status", "--json", env=pool.env).stdout)
    row = status["versions"]["v1"]
    assert (row["thresholds"], row["thresholds_source"]) == (SERVED_THRESHOLDS, "version")
    assert "v1: verdict thresholds 0.3 / 0.1 (version)" in run_cli("status", env=pool.env).stdout


def test_calibrate_reports_the_figures_and_save_stores_the_fitted_thresholds(
        pool: RunningPool, tmp_path: Path) -> None:
    pairs = pairs_file(tmp_path)
    done = run_cli("calibrate", "v1", "--pairs", str(pairs), "--batch-pairs", "5", "--json",
                   env=pool.env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["pairs"] == len(LABELLED) and report["thresholds"] == SERVED_THRESHOLDS
    assert -1 <= report["spearman"] <= 1 and 0 <= report["auc"] <= 1
    assert report["fitted_accuracy"] >= report["accuracy"]
    assert "saved" not in report

    human = run_cli("calibrate", "v1", "--pairs", str(pairs), "--save", env=pool.env)
    assert human.returncode == 0, human.stderr
    for words in ("Spearman", "AUC", "accuracy at current", "accuracy at fitted", "saved",
                  "keep 0.3 / 0.1 (version) until"):
        assert words in human.stdout, human.stdout
    listed = json.loads(run_cli("versions", "list", "--json", env=pool.env).stdout)
    (v1,) = [row for row in listed["versions"] if row["version"] == "v1"]
    assert (v1["thresholds"], v1["thresholds_source"]) == (report["fitted_thresholds"],
                                                           "version")
    # The running workers keep answering with theirs until the version is loaded again.
    with Client(pool.endpoint) as client:
        assert list(client.similarity([("a", "b")]).thresholds) == SERVED_THRESHOLDS

    unknown = run_cli("calibrate", "v9", "--pairs", str(pairs), "--json", env=pool.env)
    assert unknown.returncode == 1
    error = json.loads(unknown.stdout)["error"]
    assert error["code"] == "unknown_version" and "v9" in error["message"]

    bad = tmp_path / "bad.tsv"
    bad.write_text("2\ta\tb\n\n3\ta\tb\n", encoding="utf-8")
    refused = run_cli("calibrate", "v1", "--pairs", str(bad), env=pool.env)
    assert refused.returncode == 2 and "line 3" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_version_registered_with_thresholds_answers_pinned_requests_with_them(
        pool: RunningPool, models: dict[str, Path]) -> None:
    added = run_cli("versions", "add", "v3", "--path", str(models["v2"]), "--thresholds",
                    "0.7,0.4", "--json", env=pool.env)  # through the running pool
    assert added.returncode == 0, added.stdout + added.stderr
    assert run_cli("load", "v3", "--workers", "1", env=pool.env).returncode == 0
    with Client(pool.endpoint) as client:
        wait_for(lambda: client.ping(version="v3").workers == 1, what="v3 ready")
        result = client.similarity([(SENTENCES[0], SENTENCES[1])], version="v3")
    assert result.version == "v3" and list(result.thresholds) == [0.7, 0.4]
    status = json.loads(run_cli("status", "--json", env=pool.env).stdout)
    assert status["versions"]["v3"]["thresholds_source"] == "version"
    assert run_cli("unload", "v3", env=pool.env).returncode == 0


def test_a_rotation_to_a_version_with_thresholds_answers_with_them(
        pool: RunningPool, models: dict[str, Path]) -> None:
    done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]),
                   "--thresholds", "0.6,0.2", "--json", env=pool.env)
    assert done.returncode == 0, done.stdout + done.stderr
    with Client(pool.endpoint) as client:
        result = client.similarity([(SENTENCES[0], SENTENCES[1])])
    assert result.version == "v2" and list(result.thresholds) == ROTATED_THRESHOLDS
