"""The health judgement of a probe reply, and the registry's atomic, validated edits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from pool.control import PID_FILE, PoolNotRunning, PoolStarting, control_request
from pool.health import GOLDEN_PAIRS, Expectation, judge_probe, probe_pairs
from pool.registry import Registry
from tests.modelstub import model_stub
from tests.support import run_cli


def reply(scores: list[float]) -> bytes:
    return orjson.dumps({"scores": scores, "version": "v2"})


def healthy(expect: Expectation) -> list[float]:
    n = len(GOLDEN_PAIRS)
    return [0.5] * n + [1.0] * (2 * n) + list(expect.scores)


def test_a_sane_probe_passes() -> None:
    assert judge_probe(b"ok", reply(healthy(Expectation())), Expectation(), "float32") is None


@pytest.mark.parametrize("index,value,words", [
    (0, float("nan"), "not a finite number"),
    (1, 1.7, "not a finite number"),
    (len(GOLDEN_PAIRS), 0.8, "against itself"),
])
def test_bad_scores_fail(index: int, value: float, words: str) -> None:
    scores = healthy(Expectation())
    scores[index] = value
    # The worker encodes with orjson, which writes a NaN score as null.
    problem = judge_probe(b"ok", reply(scores), Expectation(), "float32")
    assert problem is not None and words in problem


def test_expected_scores_are_checked_with_a_dtype_tolerance() -> None:
    expect = Expectation([("a", "b")], [0.30])
    assert len(probe_pairs(expect)) == 3 * len(GOLDEN_PAIRS) + 1
    scores = healthy(expect)
    scores[-1] = 0.31
    assert judge_probe(b"ok", reply(scores), expect, "float16") is None  # fp16: ±0.02
    problem = judge_probe(b"ok", reply(scores), expect, "float32")  # fp32: ±1e-3
    assert problem is not None and "expected 0.3000" in problem


def test_error_replies_and_wrong_counts_fail() -> None:
    err = orjson.dumps({"code": "internal", "message": "CUDA out of memory"})
    assert "CUDA out of memory" in judge_probe(b"error", err, Expectation(), "float16")
    assert "scores for" in judge_probe(b"ok", reply([0.5]), Expectation(), "float32")


def test_malformed_expectations_are_refused() -> None:
    with pytest.raises(ValueError):
        Expectation.from_dict({"pairs": [["a", "b"]], "scores": []})


def test_registry_writes_atomically_and_validates(tmp_path: Path, models: dict[str, Path]) -> None:
    reg = Registry(tmp_path)
    reg.add("v1", str(models["v1"]), auto_load=True)
    reg.set_active("v1")
    reg.add("v2", str(models["v2"]))
    reg.set_active("v2")
    reg.save()
    assert [p.name for p in tmp_path.iterdir()] == ["versions.json"]  # no temp file left
    data = orjson.loads((tmp_path / "versions.json").read_bytes())
    assert (data["active"], data["previous"]) == ("v2", "v1")
    assert [h["event"] for h in data["history"]] == ["version_added", "version_added"]
    with pytest.raises(ValueError, match="active"):
        reg.remove("v2")
    with pytest.raises(ValueError, match=r"no config\.json"):
        reg.add("v3", str(tmp_path))
    with pytest.raises(ValueError, match="bad version name"):
        reg.add("v 3", str(models["v1"]))
    reg.remove("v1")
    assert reg.data["previous"] is None
    assert Registry(tmp_path).active == "v2"


def test_the_registry_of_a_starting_pool_is_not_written_behind_its_back(tmp_path: Path) -> None:
    """A pool writes its pid first and opens its control socket seconds later (torch's
    import): an offline write meanwhile would be overwritten by the pool's own copy."""
    starting = subprocess.Popen(["sleep", "60"])  # stands for a pool still importing
    try:
        (tmp_path / PID_FILE).write_text(f"{starting.pid}\n")
        with pytest.raises(PoolStarting, match=f"pid {starting.pid}.*starting or stopping"):
            control_request(tmp_path, "versions", timeout_s=0.3)
        model = model_stub(tmp_path / "m")
        added = run_cli("versions", "add", "v3", "--path", str(model), "--state-dir",
                        str(tmp_path), env=dict(os.environ), timeout=60)
        assert added.returncode != 0 and "starting or stopping" in added.stderr
        assert not (tmp_path / "versions.json").exists()
    finally:
        starting.kill()
        starting.wait(10)
    with pytest.raises(PoolNotRunning):
        control_request(tmp_path, "versions", timeout_s=0.3)
