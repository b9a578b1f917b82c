"""`pool fleet` on real pools: three `pool serve` processes under load, each pool named by its
state directory (remote pools by endpoint are tests/test_remote_control.py's)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pool.join import fleet_version
from router.client import NoReply
from router.keys import create_keys
from tests.support import (
    SENTENCES,
    Load,
    RunningPool,
    cli_in_background,
    free_port,
    labelled_file,
    run_cli,
    short_tmpdir,
    wait_for,
)
from tooling.loadgen import FailoverProducers

pytestmark = pytest.mark.slow
LOAD_RATE = 100.0  # per pool: three pools and their loads share the CI's two cores


def fleet(pools: list[RunningPool], *args: str, timeout: float = 240) -> tuple[int, dict]:
    names = ",".join(str(pool.state_dir) for pool in pools)
    done = run_cli("fleet", *args, "--pools", names, "--json", env=pools[0].env,
                   timeout=timeout)
    return done.returncode, json.loads(done.stdout) if done.stdout else {"err": done.stderr}


def three_pools(pool_factory, models: dict[str, Path]) -> list[RunningPool]:
    return [pool_factory(models["v1"], workers=1) for _ in range(3)]


def loads_on(pools: list[RunningPool]) -> list[Load]:
    return [Load(pool.endpoint, in_flight=8, max_rate=LOAD_RATE).start() for pool in pools]


def test_a_fleet_rotation_under_load_fails_nothing_and_reports_each_pool(
    pool_factory, models: dict[str, Path]
) -> None:
    pools = three_pools(pool_factory, models)
    producers = FailoverProducers([pool.endpoint for pool in pools], SENTENCES,
                                  in_flight=16, rate=3 * LOAD_RATE).start()
    time.sleep(1.5)
    code, reply = fleet(pools, "rotate", "--version", "v2", "--path", str(models["v2"]),
                        "--bake", "2")
    finished = time.monotonic()
    time.sleep(0.5)
    producers.stop()
    assert code == 0, reply
    report = reply["report"]
    assert report["outcome"] == "done" and report["source"] == "v1"
    assert [p["phase"] for p in report["pools"]] == ["done"] * 3
    canary = report["pools"][0]["rotation"]
    assert canary["bake"]["seconds"] == 2 and "baking" in canary["timings"]
    assert report["pools"][1]["started_s"] >= report["pools"][0]["finished_s"]
    assert report["traffic"] and not report["canary"]["regressed"]
    assert producers.errors() == [] and len(producers.answers) > 300
    assert producers.versions() == {"v1", "v2"}
    assert producers.versions(since=finished) == {"v2"}
    assert {pool.status()["active"] for pool in pools} == {"v2"}
    code, status = fleet(pools, "status")
    assert code == 0 and {row["active"] for row in status["pools"]} == {"v2"}
    assert all(row["lease"] is None for row in status["pools"]), "leases released"


def test_a_version_failing_its_check_on_the_second_pool_leaves_the_fleet_on_v1(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    pools = three_pools(pool_factory, models)
    # The second pool expects v2 to score a pair as it never does: its health check fails.
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"pairs": [["今天天气真好", "今日阳光明媚"]],
                                  "scores": [-0.5], "tolerance": 0.01}))
    for i, pool in enumerate(pools):
        expect = ["--expect", str(golden)] if i == 1 else []
        added = run_cli("versions", "add", "v2", "--path", str(models["v2"]), *expect,
                        env=pool.env)
        assert added.returncode == 0, added.stderr
    loads = loads_on(pools)
    time.sleep(1.0)
    code, reply = fleet(pools, "rotate", "--version", "v2")
    for load in loads:
        load.stop()
    assert code == 1, reply
    report = reply["report"]
    assert report["outcome"] == "rolled_back"
    assert str(pools[1].state_dir) in report["reason"] and "expected -0.5000" in report["reason"]
    assert [p["phase"] for p in report["pools"]] == ["rolled_back", "rolled_back", "waiting"]
    assert [pool.status()["active"] for pool in pools] == ["v1", "v1", "v1"]
    for load in loads:
        assert load.errors() == [] and load.lost == 0


def test_a_canary_below_the_fleets_quality_gate_rolls_back_and_stops_the_rollout(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    # Labels upside down: v2's Spearman on them is negative, under the floor.
    inverted = labelled_file(tmp_path / "inverted.tsv", identical_label=0, distinct_label=2)
    pools = [pool_factory(models["v1"], workers=1) for _ in range(2)]
    code, reply = fleet(pools, "rotate", "--version", "v2", "--path", str(models["v2"]),
                        "--eval", str(inverted))
    assert code == 1, reply
    report = reply["report"]
    assert report["outcome"] == "rolled_back"
    assert "quality gate: Spearman" in report["reason"] and "below the floor" in report["reason"]
    assert [p["phase"] for p in report["pools"]] == ["rolled_back", "waiting"]
    assert [pool.status()["active"] for pool in pools] == ["v1", "v1"]


def test_a_second_fleet_rotation_or_a_plain_rotate_is_refused_while_one_runs(
    pool_factory, models: dict[str, Path]
) -> None:
    pools = [pool_factory(models["v1"], workers=1) for _ in range(2)]
    names = ",".join(str(pool.state_dir) for pool in pools)
    with cli_in_background("fleet", "rotate", "--pools", names, "--version", "v2", "--path",
                           str(models["v2"]), "--bake", "3", "--json",
                           env=pools[0].env) as first:
        wait_for(lambda: all(pool.status()["lease"] for pool in pools), 60,
                 "the first rollout did not lease its pools")
        code, reply = fleet(pools, "rotate", "--version", "v3", "--path", str(models["v2"]))
        assert code == 1 and "leased to fleet-" in reply["error"]["message"], reply
        assert "nothing was changed" in reply["error"]["message"]
        plain = run_cli("rotate", "--version", "v3", "--path", str(models["v2"]), "--json",
                        env=pools[1].env)
        assert plain.returncode == 1 and "leased to fleet-" in plain.stdout
        out, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out
    assert json.loads(out)["report"]["outcome"] == "done"
    assert [pool.status()["active"] for pool in pools] == ["v2", "v2"]
    assert all(pool.status()["lease"] is None for pool in pools)


def test_a_fleet_with_a_pool_mid_rotation_is_refused_untouched(
    pool_factory, models: dict[str, Path]
) -> None:
    pools = [pool_factory(models["v1"], workers=1) for _ in range(2)]
    held = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--no-wait",
                   "--json", env=pools[1].env)
    assert held.returncode == 0, held.stderr
    code, reply = fleet(pools, "rotate", "--version", "v2", "--path", str(models["v2"]))
    assert code == 1 and "is rotating" in reply["error"]["message"]
    assert "nothing was changed" in reply["error"]["message"]
    assert pools[0].status()["active"] == "v1"


def test_a_fleet_of_remote_pools_on_their_own_addresses_rotates_over_curve(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    """Two pools as two machines: each on its own loopback address, control over TCP for
    the operator's key only; the fleet commands reach them by endpoint."""
    keys, operators = tmp_path / "keys", tmp_path / "operators"
    operators.mkdir()
    for name in ("server", "operator", "stranger"):
        create_keys(keys, name)
    shutil.copy(keys / "operator.key", operators)
    controls = []
    pools = []
    for host in ("127.0.0.2", "127.0.0.3"):
        control = f"tcp://{host}:{free_port(host)}"
        controls.append(control)
        pools.append(pool_factory(models["v1"], "--control-bind", control,
                                  "--control-secret-key", str(keys / "server.key_secret"),
                                  "--operator-keys", str(operators), workers=1))
    loads = loads_on(pools)
    as_operator = ["--server-key", str(keys / "server.key"),
                   "--client-key", str(keys / "operator.key_secret")]
    names = ",".join(controls)
    done = run_cli("fleet", "rotate", "--pools", names, "--version", "v2", "--path",
                   str(models["v2"]), *as_operator, "--json", env=pools[0].env, timeout=240)
    for load in loads:
        load.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)["report"]
    assert [p["name"] for p in report["pools"]] == controls
    assert [p["phase"] for p in report["pools"]] == ["done", "done"]
    assert [pool.status()["active"] for pool in pools] == ["v2", "v2"]
    for load in loads:
        assert load.errors() == [] and load.lost == 0
    # And back: every pool returns to the version the fleet served before.
    done = run_cli("fleet", "rollback", "--pools", names, *as_operator, "--json",
                   env=pools[0].env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)["report"]
    assert (report["source"], report["target"]) == ("v2", "v1")
    assert [pool.status()["active"] for pool in pools] == ["v1", "v1"]
    # A key that is not an operator's reaches no pool: a clear error, nothing changed.
    done = run_cli("fleet", "status", "--pools", names, "--server-key",
                   str(keys / "server.key"), "--client-key", str(keys / "stranger.key_secret"),
                   "--json", env=pools[0].env)
    rows = json.loads(done.stdout)["pools"]
    assert done.returncode == 1 and not any(row["reachable"] for row in rows)
    assert all("refused" in row["error"] for row in rows), rows
    done = run_cli("fleet", "status", "--pools", names, "--json", env=pools[0].env)
    assert done.returncode == 2 and "operator's keys" in done.stdout



def test_a_pool_that_joins_later_starts_on_the_fleets_version(
    pool_factory, models: dict[str, Path], tmp_path: Path
) -> None:
    running = pool_factory(models["v1"], workers=1)
    code, reply = fleet([running], "rotate", "--version", "v2", "--path", str(models["v2"]))
    assert code == 0, reply
    # A new pod: its registry made from the model volume's model_versions.json says v1.
    state = short_tmpdir()
    seed = tmp_path / "model_versions.json"
    seed.write_text(json.dumps({"current_version": "v1", "versions": {
        "v1": {"path": str(models["v1"])}}}))
    env = {**running.env, "ZEROPOOL_STATE_DIR": str(state)}
    assert run_cli("versions", "import", str(seed), env=env).returncode == 0
    # v2 unknown here: the pod refuses rather than serve v1 beside the fleet's v2.
    done = run_cli("serve", "--join", running.endpoint, "--workers", "1", env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "the fleet serves v2, which is not registered here" in done.stderr
    assert "Traceback" not in done.stderr
    # The volume's file lists v2 too (as docs/deploy.md says to): it starts on v2.
    seed.write_text(json.dumps({"current_version": "v1", "versions": {
        "v1": {"path": str(models["v1"])}, "v2": {"path": str(models["v2"])}}}))
    done = run_cli("versions", "import", str(seed), env=env)
    assert done.returncode == 0, done.stderr
    joined = pool_factory(None, "--join", f"{running.endpoint},ipc:///tmp/zp-nobody.sock",
                          workers=1, state_dir=state)
    assert joined.status()["active"] == "v2"
    assert "join: the fleet serves v2; starting on it" in joined.process.log_tail()


def test_the_fleets_version_is_what_most_answering_peers_serve() -> None:
    answers = {"a": "v2", "b": "v2", "c": "v1"}

    def ping(endpoint: str) -> str:
        if endpoint not in answers:
            raise NoReply(f"no reply from {endpoint}")
        return answers[endpoint]

    assert fleet_version(["a", "b", "c", "gone"], ping) == "v2"
    assert fleet_version(["a", "c"], ping) is None  # a tie decides nothing
    assert fleet_version(["gone"], ping) is None  # the first pod of a fleet
