"""Zero-downtime rotation on a live pool under load: real processes, real sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import orjson
import psutil
import pytest

from pool import config
from router.client import Client, UnknownVersion
from tests.modelstub import weights_of_another_shape
from tests.support import (
    LOAD_RATE,
    SENTENCES,
    Load,
    Reference,
    RunningPool,
    cli_in_background,
    labelled_file,
    make_tiny_bert,
    run_cli,
    wait_for,
)
from tooling.loadgen import ThreadLoad

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def rotate(pool: RunningPool, *args: str) -> tuple[int, dict]:
    done = run_cli("rotate", *args, "--json", env=pool.env)
    return done.returncode, json.loads(done.stdout) if done.stdout else {"stderr": done.stderr}


def assert_scores_match_versions(load: Load, reference: dict[str, Reference]) -> None:
    """Every reply's score is what the version it names computes (the load has 64 pairs)."""
    want: dict[tuple[str, str, str], float] = {}
    for reply in load.replies:
        (a, b), = reply.pairs
        key = (reply.body["version"], a, b)
        if key not in want:
            want[key] = reference[key[0]].similarity(a, b)
        assert abs(reply.body["scores"][0] - want[key]) < TOLERANCE


def reaped(pids: list[int]) -> bool:
    """No process left, not even a zombie."""
    return not any(psutil.pid_exists(pid) for pid in pids)


def test_surge_rotation_under_load_fails_nothing(
    pool_factory, models: dict[str, Path], reference: dict[str, Reference]
) -> None:
    pool = pool_factory(models["v1"])
    old_pids = pool.worker_pids()
    load = Load(pool.endpoint, in_flight=64).start()
    time.sleep(1.0)
    code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]),
                         "--strategy", "surge")
    switched_at = time.monotonic()
    time.sleep(1.0)
    load.stop()
    assert code == 0, reply
    rot = reply["rotation"]
    assert (rot["outcome"], rot["source"], rot["target"]) == ("done", "v1", "v2")
    assert set(rot["timings"]) >= {"spawning", "loading", "health_check", "draining"}
    assert load.errors() == [] and load.lost == 0
    assert len(load.replies) > 200
    assert load.versions() == {"v1", "v2"}
    assert load.versions_after(switched_at) == {"v2"}, "v1 served after the switch completed"
    assert_scores_match_versions(load, reference)
    assert reaped(old_pids)
    status = pool.status()
    assert status["active"] == "v2"
    assert {w["version"] for w in status["workers"]} == {"v2"}
    registry = orjson.loads((pool.state_dir / "versions.json").read_bytes())
    assert (registry["active"], registry["previous"]) == ("v2", "v1")
    finished = [h for h in registry["history"] if h["event"] == "rotation_finished"]
    assert finished[-1]["outcome"] == "done" and finished[-1]["timings"]["loading"] > 0


def test_rolling_rotation_never_exceeds_the_worker_count(
    pool_factory, models: dict[str, Path], reference: dict[str, Reference]
) -> None:
    pool = pool_factory(models["v1"])
    load = Load(pool.endpoint, in_flight=64).start()
    done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--strategy",
                   "rolling", "--no-wait", "--json", env=pool.env)
    assert done.returncode == 0, done.stderr
    most = 0
    while (status := pool.status())["rotation"]["outcome"] is None:
        most = max(most, len(status["workers"]))
        time.sleep(0.05)
    load.stop()
    assert status["rotation"]["outcome"] == "done", status["rotation"]
    assert status["rotation"]["strategy"] == "rolling"
    assert most <= 2, f"{most} worker processes at once with --workers 2"
    assert load.errors() == [] and load.lost == 0
    assert_scores_match_versions(load, reference)
    assert {w["version"] for w in pool.status()["workers"]} == {"v2"}


def broken_copy(src: Path, dest: Path, file: str, content: bytes) -> Path:
    shutil.copytree(src, dest)
    (dest / file).write_bytes(content)
    return dest


@pytest.mark.parametrize("breakage", ["weights_of_another_shape", "crash_on_load",
                                      "golden_mismatch"])
def test_failed_rotation_leaves_v1_serving(
    breakage: str, pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    pool = pool_factory(models["v1"])
    old_pids = pool.worker_pids()
    args = ["--version", "v2", "--strategy", "surge"]
    # Each breakage passes the command's checks of the directory (pool.modeldir): the
    # workers find it, and the rotation rolls back.
    if breakage == "weights_of_another_shape":
        path = weights_of_another_shape(models["v2"], tmp_path / "v2")
        expected_reason = "while loading"
    elif breakage == "crash_on_load":  # transformers refuses to build such a model
        config = json.loads((models["v2"] / "config.json").read_text())
        config["num_attention_heads"] = 3  # 32 wide: not a multiple of 3
        path = broken_copy(models["v2"], tmp_path / "v2", "config.json",
                           json.dumps(config).encode())
        expected_reason = "while loading"
    else:
        golden = tmp_path / "golden.json"
        golden.write_text(json.dumps({"pairs": [["今天天气真好", "今日阳光明媚"]],
                                      "scores": [-0.5], "tolerance": 0.01}))
        added = run_cli("versions", "add", "v2", "--path", str(models["v2"]), "--expect",
                        str(golden), "--json", env=pool.env)
        assert added.returncode == 0, added.stderr
        path = None
        expected_reason = "expected -0.5000"
    if path is not None:
        args += ["--path", str(path)]
    load = Load(pool.endpoint, in_flight=64).start()
    code, reply = rotate(pool, *args)
    load.stop()
    assert code == 1, reply
    rot = reply["rotation"]
    assert rot["outcome"] == "rolled_back"
    assert expected_reason in rot["reason"], rot["reason"]
    assert load.errors() == [] and load.lost == 0
    assert load.versions() == {"v1"}
    status = pool.status()
    assert status["active"] == "v1"
    assert sorted(pool.worker_pids()) == sorted(old_pids), "v1 workers must be untouched"
    assert {w["version"] for w in status["workers"]} == {"v1"}


def test_bad_rotation_requests_are_refused_and_the_pool_untouched(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    pool = pool_factory(models["v1"])
    # A wrong argument is a usage error (exit 2); what the pool's state refuses exits 1.
    code, reply = rotate(pool, "--version", "v2", "--path", str(tmp_path / "missing"))
    assert (code, reply["error"]["code"]) == (2, "bad_request")
    assert "not a directory" in reply["error"]["message"]
    # Weights cut short are refused before any worker starts, naming the file.
    cut = broken_copy(models["v2"], tmp_path / "cut", "model.safetensors",
                      (models["v2"] / "model.safetensors").read_bytes()[:4096])
    code, reply = rotate(pool, "--version", "v2", "--path", str(cut))
    assert (code, reply["error"]["code"]) == (2, "bad_request"), reply
    assert f"{cut / 'model.safetensors'} is not a safetensors file" in reply["error"]["message"]
    assert "v2" not in pool.status()["versions"]
    code, reply = rotate(pool, "--version", "v9")
    assert (code, reply["error"]["code"]) == (1, "unknown_version")
    assert "unknown version" in reply["error"]["message"]
    code, reply = rotate(pool, "--version", "v1")
    assert (code, reply["error"]["code"]) == (1, "refused")
    assert "already the active version" in reply["error"]["message"]
    code, _ = rotate(pool, "--version", "v2", "--path", str(models["v2"]), "--no-wait")
    assert code == 0
    code, reply = rotate(pool, "--version", "v3", "--path", str(models["v2"]))
    assert code == 1 and "still" in reply["error"]["message"]
    with Client(pool.endpoint) as client:
        assert client.similarity([("a", "b")]).version in ("v1", "v2")


def test_drain_serves_pinned_v1_then_reaps_everything(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"])
    old_pids = pool.worker_pids()
    unpinned = Load(pool.endpoint, in_flight=32).start()
    pinned = Load(pool.endpoint, in_flight=16, pinned="v1").start()
    code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]),
                         "--strategy", "surge", "--drain-timeout", "4")  # room on a busy CI
    assert code == 0, reply
    rot = reply["rotation"]
    switched_at = rot["started_at"] + sum(rot["timings"][p] for p in (
        "spawning", "loading", "health_check", "switching"))
    unpinned.stop()
    pinned.stop()
    assert unpinned.errors() == [] and unpinned.lost == 0
    ok = [r for r in pinned.replies if r.status == b"ok"]
    assert ok and {r.body["version"] for r in ok} == {"v1"}
    # The old version kept serving its pinned traffic while it drained.
    assert sum(1 for r in ok if r.received > switched_at + 0.2) > 10
    late = [r.body["code"] for r in pinned.replies if r.status != b"ok"]
    assert set(late) <= {"unknown_version"}, "pinned v1 fails only once v1 is gone"
    assert pinned.lost == 0
    assert reaped(old_pids)
    with Client(pool.endpoint) as client, pytest.raises(UnknownVersion):
        client.similarity([("a", "b")], version="v1")


def test_canary_promote_and_canary_rollback(pool_factory, models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"])
    code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]),
                         "--canary", "30")
    assert code == 0 and reply["rotation"]["phase"] == "canary", reply
    with Client(pool.endpoint) as client:
        versions = [client.similarity([("a", "b")]).version for _ in range(400)]
        assert client.similarity([("a", "b")], version="v1").version == "v1"
        assert client.similarity([("a", "b")], version="v2").version == "v2"
    share = versions.count("v2") / len(versions)
    assert 0.18 < share < 0.42, share
    assert pool.status()["canary"] == {"version": "v2", "share": 0.3}

    promoted = run_cli("promote", "--json", env=pool.env)
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["rotation"]["outcome"] == "done"
    with Client(pool.endpoint) as client:
        assert {client.similarity([("a", "b")]).version for _ in range(50)} == {"v2"}

    # A canary back to v1, ended by rollback: v2 keeps serving alone.
    code, reply = rotate(pool, "--version", "v1", "--canary", "50")
    assert code == 0 and reply["rotation"]["phase"] == "canary"
    load = Load(pool.endpoint, in_flight=32).start()
    time.sleep(0.5)
    ended = run_cli("rollback", "--json", env=pool.env)
    load.stop()
    assert ended.returncode == 0, ended.stderr
    assert json.loads(ended.stdout)["rotation"]["outcome"] == "rolled_back"
    assert load.errors() == [] and load.lost == 0
    assert load.versions() == {"v1", "v2"}
    status = pool.status()
    assert status["active"] == "v2" and status["canary"] is None
    assert {w["version"] for w in status["workers"]} == {"v2"}


def test_rollback_rotates_back_and_restart_restores_the_active_version(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"])
    assert rotate(pool, "--version", "v2", "--path", str(models["v2"]))[0] == 0
    back = run_cli("rollback", "--to", "v1", "--json", env=pool.env)  # previous, named
    assert back.returncode == 0, back.stderr
    rot = json.loads(back.stdout)["rotation"]
    assert (rot["target"], rot["outcome"]) == ("v1", "done")
    assert rotate(pool, "--version", "v2")[0] == 0  # path known from the registry

    state_dir = pool.state_dir
    pool.process.stop()
    restarted = pool_factory(None, state_dir=state_dir)  # no --path: from the registry
    status = restarted.status()
    assert status["active"] == "v2"
    assert status["versions"]["v2"]["path"] == str(models["v2"].resolve())
    with Client(restarted.endpoint) as client:
        assert client.similarity([("a", "b")]).version == "v2"


def test_unload_stops_a_loaded_version(pool_factory, models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"])
    assert rotate(pool, "--version", "v2", "--path", str(models["v2"]), "--canary", "10"
                  )[0] == 0
    refused = run_cli("unload", "v2", "--json", env=pool.env)
    assert refused.returncode == 1 and "rotation" in json.loads(refused.stdout)["error"]["message"]
    assert run_cli("rollback", env=pool.env).returncode == 0
    refused = run_cli("unload", "v1", "--json", env=pool.env)
    assert refused.returncode == 1 and "active" in json.loads(refused.stdout)["error"]["message"]


def test_versions_registry_offline_and_online(models: dict[str, Path], tmp_path: Path,
                                              pool_factory) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "ZEROPOOL_STATE_DIR": str(state)}
    seed = tmp_path / "model_versions.json"
    seed.write_text(json.dumps({"current_version": "v1.0.0", "versions": {
        "v1.0.0": {"path": str(models["v1"]), "load_time": "2024-01-01"},
        "v1.1.0": {"path": str(models["v2"]), "auto_load": True}}}))
    imported = run_cli("versions", "import", str(seed), "--json", env=env)
    assert imported.returncode == 0, imported.stderr
    listing = {v["version"]: v for v in json.loads(imported.stdout)["versions"]}
    assert listing["v1.0.0"]["active"] and listing["v1.1.0"]["auto_load"]

    bad = run_cli("versions", "add", "v3", "--path", str(tmp_path), "--json", env=env)
    assert bad.returncode == 2 and "no config.json" in json.loads(bad.stdout)["error"]["message"]
    refused = run_cli("versions", "remove", "v1.0.0", "--json", env=env)
    assert refused.returncode == 2 and "active" in json.loads(refused.stdout)["error"]["message"]

    # Restart from the registry: the active version serves, the auto-load one serves pinned.
    pool = pool_factory(None, state_dir=state, version="v1.0.0")
    with Client(pool.endpoint) as client:
        assert client.similarity([("a", "b")]).version == "v1.0.0"
        deadline = time.monotonic() + 60
        while pool.status()["versions"]["v1.1.0"]["workers_ready"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.similarity([("a", "b")], version="v1.1.0").version == "v1.1.0"
    online = run_cli("versions", "add", "v3", "--path", str(models["v2"]), "--json", env=pool.env)
    assert online.returncode == 0
    assert "v3" in {v["version"] for v in json.loads(
        run_cli("versions", "list", "--json", env=pool.env).stdout)["versions"]}
    assert run_cli("unload", "v1.1.0", env=pool.env).returncode == 0
    deadline = time.monotonic() + 30
    while "v1.1.0" in pool.status()["versions"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with Client(pool.endpoint) as client, pytest.raises(UnknownVersion):
        client.similarity([("a", "b")], version="v1.1.0")


def test_a_hung_old_worker_is_escalated_reaped_and_its_requests_rerun(
    pool_factory, models: dict[str, Path], reference: dict[str, Reference]
) -> None:
    pool = pool_factory(models["v1"])
    frozen = pool.worker_pids()[0]
    load = Load(pool.endpoint, in_flight=16).start()
    time.sleep(0.5)
    os.kill(frozen, signal.SIGSTOP)  # hung: reads nothing, answers nothing, ignores STOP
    try:
        code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]),
                             "--strategy", "surge", "--drain-timeout", "1")
    finally:
        load.stop(timeout=120)
    assert code == 0, reply
    assert reply["rotation"]["timings"]["draining"] > config.DRAIN_GRACE_S
    assert reaped([frozen])
    assert load.errors() == [] and load.lost == 0
    assert_scores_match_versions(load, reference)
    events = [e for e in pool.status()["events"] if e.get("pid") == frozen]
    assert events[-1]["event"] == "exited" and events[-1]["exit_code"] == -signal.SIGKILL


def test_load_beside_then_rotate_only_switches(pool_factory, models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"])
    assert run_cli("versions", "add", "v2", "--path", str(models["v2"]), env=pool.env
                   ).returncode == 0
    loaded = run_cli("load", "v2", "--json", env=pool.env)
    assert loaded.returncode == 0, loaded.stderr
    pool.process.wait_ready(pool.endpoint, workers=2, version="v2", timeout=60)
    with Client(pool.endpoint) as client:
        assert client.similarity([("a", "b")], version="v2").version == "v2"
        assert client.similarity([("a", "b")]).version == "v1"
    again = run_cli("load", "v2", "--json", env=pool.env)
    assert again.returncode == 1 and "already loaded" in again.stdout
    load = Load(pool.endpoint, in_flight=32).start()
    code, reply = rotate(pool, "--version", "v2")
    load.stop()
    assert code == 0, reply
    rot = reply["rotation"]
    assert "already loaded" in rot["strategy_reason"]
    assert rot["timings"]["loading"] < 1.0 and rot["timings"]["health_check"] < 1.0
    assert load.errors() == [] and load.lost == 0
    assert {w["version"] for w in pool.status()["workers"]} == {"v2"}


def test_the_quality_gate_rolls_back_a_version_that_scores_badly_under_load(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    # Labels upside down: the new version's Spearman on them is negative, under the floor.
    inverted = labelled_file(tmp_path / "inverted.tsv", identical_label=0, distinct_label=2)
    # 33 pairs, over --max-pairs: each version scores it in probes of 12, 12 and 9.
    fair = labelled_file(tmp_path / "fair.tsv", identical_label=2, distinct_label=0, repeats=3)
    pool = pool_factory(models["v1"], "--max-pairs", "12")
    load = Load(pool.endpoint, in_flight=32).start()
    code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]),
                         "--eval", str(inverted))
    assert code != 0, reply
    rot = reply["rotation"]
    assert rot["outcome"] == "rolled_back", rot
    quality = rot["quality"]
    assert not quality["passed"] and quality["spearman"] < 0 and quality["active_spearman"] < 0
    assert "quality gate: Spearman" in rot["reason"] and "below the floor 0.5" in rot["reason"]
    assert pool.status()["active"] == "v1"
    code, reply = rotate(pool, "--version", "v2", "--eval", str(fair))  # v2 is registered
    assert code == 0, reply
    quality = reply["rotation"]["quality"]
    assert quality["passed"] and quality["spearman"] == quality["active_spearman"] > 0.5
    assert quality["eval"] == str(fair) and quality["pairs"] == 33
    # Back to v1 behind the same set: v2 scored it when it came in, and is not asked again.
    code, reply = rotate(pool, "--version", "v1", "--eval", str(fair))
    load.stop()
    assert code == 0, reply
    assert reply["rotation"]["quality"]["active_spearman"] == quality["spearman"]
    assert reply["rotation"]["quality"]["active_from"] == "history"
    log = pool.process.log_path.read_text()
    assert "v2 scored" in log and "not scored again" in log
    assert load.lost == 0 and not load.errors()
    history = json.loads((pool.state_dir / "versions.json").read_text())["history"]
    assert [e["passed"] for e in history if e["event"] == "quality_gate"] == [False, True, True]


def test_an_eval_set_with_a_bad_line_is_refused_with_its_line_number(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("2\ta\ta\n7\tb\tc\n", encoding="utf-8")
    pool = pool_factory(models["v1"], workers=1)
    code, reply = rotate(pool, "--version", "v2", "--path", str(models["v2"]), "--eval",
                         str(bad))
    assert code != 0
    assert "line 2" in json.dumps(reply) and pool.status()["active"] == "v1"


def test_a_rotation_to_a_broken_or_resized_model_says_why_and_fails_nothing(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    # Weights a file check passes (pool.modeldir) but that do not fit their config.json.
    broken = weights_of_another_shape(models["v2"], tmp_path / "broken")
    wider = make_tiny_bert(tmp_path / "wider", seed=7, hidden_size=48)
    pool = pool_factory(models["v1"])
    load = Load(pool.endpoint, in_flight=32).start()
    code, reply = rotate(pool, "--version", "v3", "--path", str(broken))
    assert code != 0 and reply["rotation"]["outcome"] == "rolled_back", reply
    reason = reply["rotation"]["reason"]
    assert "while loading: ModelWeightsError: the weights do not fit config.json: " \
        "encoder.layer.0.intermediate.dense.bias is [64] in the checkpoint, [128] by the " \
        "config" in reason and str(broken) in reason, reason
    code, reply = rotate(pool, "--version", "v4", "--path", str(wider))
    assert code != 0 and reply["rotation"]["outcome"] == "rolled_back", reply
    assert "v4 answers 48-dimensional embeddings where v1 answers 32-dimensional" in \
        reply["rotation"]["reason"]
    load.stop()
    assert load.lost == 0 and not load.errors()
    status = pool.status()
    assert status["active"] == "v1"
    assert "48-dimensional" in status["rotation"]["reason"]  # the last rotation's
    history = json.loads((pool.state_dir / "versions.json").read_text())["history"]
    reasons = [e["reason"] for e in history if e["event"] == "rotation_finished"]
    assert "ModelWeightsError" in reasons[0] and "48-dimensional" in reasons[1]
    # The registry keeps both versions; its listing says how their rotations ended.
    listed = run_cli("versions", "list", "--json", env=pool.env)
    last = {v["version"]: v["last_rotation"] for v in json.loads(listed.stdout)["versions"]}
    assert last["v3"]["outcome"] == "rolled_back" and "do not fit" in last["v3"]["reason"]
    assert last["v4"]["outcome"] == "rolled_back" and last["v1"] is None
    shown = run_cli("versions", "list", env=pool.env).stdout
    assert "rolled_back" in shown and "ModelWeightsError" in shown, shown


def test_a_bake_switches_back_to_the_loaded_v1_when_v2_fails_some_inputs_under_load(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    # v2's tokenizer knows a character its model has no embedding for: requests with it fail
    # (an internal error), everything else (the health check's pairs too) works.
    poison = "毒"
    broken = make_tiny_bert(tmp_path / "v2-poisoned", seed=5, unknown_to_model=[poison])
    pool = pool_factory(models["v1"])
    old_pids = pool.worker_pids()
    texts = [*SENTENCES, f"今天{poison}天气真好"]
    load = ThreadLoad(pool.endpoint, texts, in_flight=32, max_rate=LOAD_RATE).start()
    time.sleep(2.0)  # the old version's baseline
    started = time.time()
    code, reply = rotate(pool, "--version", "v2", "--path", str(broken), "--strategy", "surge",
                         "--bake", "60")
    time.sleep(1.0)
    load.stop()
    assert code == 1, reply
    rot = reply["rotation"]
    assert rot["outcome"] == "rolled_back" and rot["reason"].startswith("bake: v2 failed")
    assert rot["bake"]["verdict"]["regressed"] and rot["timings"]["baking"] < 30
    assert pool.worker_pids() == old_pids, "v1's workers stayed loaded and serve again"
    assert pool.status()["active"] == "v1"
    registry = orjson.loads((pool.state_dir / "versions.json").read_bytes())
    assert registry["active"] == "v1"
    switched = [h["t"] for h in registry["history"] if h["event"] in ("switched",
                                                                      "switched_back")]
    assert len(switched) == 2
    # What reached producers: only errors of poisoned requests, only while v2 served.
    failed = [r for r in load.replies if r.code != "ok"]
    assert failed and load.lost == 0
    assert all(r.code == "internal" and poison in r.pairs[0][0] + r.pairs[0][1]
               for r in failed)
    assert all(switched[0] - 1 <= r.received <= switched[1] + 1 for r in failed)
    assert started < switched[0]
    after = [r for r in load.replies if r.received > switched[1] + 1]
    assert after and {r.body["version"] for r in after if r.code == "ok"} == {"v1"}
    assert all(r.code == "ok" for r in after)


def test_a_rotation_cut_off_by_its_pool_is_recorded_and_the_next_one_numbers_on(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"], workers=1)
    started = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--bake", "60",
                      "--no-wait", "--json", env=pool.env)
    assert started.returncode == 0, started.stdout + started.stderr
    first = json.loads(started.stdout)["rotation"]["id"]
    children = pool.children()
    os.kill(pool.process.pid, signal.SIGKILL)
    pool.process.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"the killed pool's processes lived on: {alive}"

    # Its control socket and pid file are left behind: a command says so at once.
    asked = time.monotonic()
    status = run_cli("status", "--json", env=pool.env)
    assert time.monotonic() - asked < 8
    error = json.loads(status.stdout)["error"]
    assert status.returncode == 1 and error["code"] == "not_running", status.stdout
    assert "left from a pool that exited without stopping" in error["message"]

    again = pool_factory(models["v1"], workers=1, state_dir=pool.state_dir)
    history = json.loads((pool.state_dir / "versions.json").read_text())["history"]
    cut = [e for e in history if e["event"] == "rotation_finished" and e["rotation"] == first]
    assert [e["outcome"] for e in cut] == ["interrupted"], history[-5:]
    # Refused ones take no id: one with a wrong argument is a usage error (exit 2), one the
    # pool's state forbids exits 1, each with its code.
    code, reply = rotate(again, "--version", "v2", "--canary", "150")
    assert (code, reply["error"]["code"]) == (2, "bad_request"), reply
    code, reply = rotate(again, "--version", "v1")
    assert (code, reply["error"]["code"]) == (1, "refused"), reply
    code, reply = rotate(again, "--version", "v2", "--path", str(models["v2"]))
    assert code == 0 and reply["rotation"]["id"] == first + 1, reply

    # A graceful stop during a bake: the command following it says where it was cut off.
    with cli_in_background("rotate", "--version", "v1", "--bake", "60", env=again.env) \
            as follower:
        wait_for(lambda: (again.status()["rotation"] or {}).get("phase") == "baking",
                 what="the rotation's bake")
        assert run_cli("stop", env=again.env).returncode == 0
        said = follower.communicate(timeout=60)
    assert follower.returncode == 1, said
    assert f"the pool stopped during rotation {first + 2} to v1" in said[1], said
    history = json.loads((pool.state_dir / "versions.json").read_text())["history"]
    last = [e for e in history if e["event"] == "rotation_finished"][-1]
    assert last["rotation"] == first + 2 and last["outcome"] == "interrupted", last
