"""Bad input to the `pool` commands: a clear error and an exit code that means something
(2: usage), never a traceback; and the bench's own promises (its clock, its exit code, its
report), checked without a pool (a zmq.proxy with echo workers stands in where one must
answer)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import typer
import zmq
from rich.console import Console
from typer.testing import CliRunner, Result

from cli.common import local_model_path, pool_model_path
from cli.fleet_commands import fleet_path_option
from cli.loadtest import save_files
from cli.main import app
from cli.versions import registry_command
from pool.control import PID_FILE, ControlTarget
from pool.registry import Registry
from router.failover import bind_problem, endpoint_problem
from router.keys import ClientKeys, create_keys
from tests.modelstub import model_stub
from tests.support import free_port, run_cli
from tooling.bench import BenchResult, RotationWatch, build_report, plot_report, run_failures
from tooling.loadgen import LoadSpec, ProxyBaseline, Samples, run_load

ROOT = Path(__file__).resolve().parent.parent
STAMP_SLACK_S = 0.01  # a load's send time past its deadline: the stamp, not a late send


def invoke(*args: str) -> Result:
    """`pool ARGS...` in this process: fast, and an exception escaping the command (what a
    user would see as a traceback) stays in `result.exception`."""
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"`pool {' '.join(args)}` raised {result.exception!r}"
    return result


def json_error(result: Result, code: str = "usage") -> str:
    """The JSON error object a --json command put on stdout (and nothing else); its message."""
    reply = json.loads(result.stdout)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    return reply["error"]["message"]


def fake_model(directory: Path) -> Path:
    """What the registry checks a model directory by (pool.modeldir), and no more."""
    return model_stub(directory)


# -- endpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "says"), [
    ("127.0.0.1:5611", "no scheme"),
    ("tcp://127.0.0.1", "has no port"),
    ("tcp://h:notaport", "port 'notaport' is not a number"),
    ("foo://bar", "unsupported scheme foo://"),
    ("dns://host", "has no port"),
    ("", "is empty"),
    ("tcp://a:1, ,foo://x", "unsupported scheme foo://"),
])
def test_a_malformed_endpoint_is_a_usage_error_that_names_the_problem(endpoint: str,
                                                                     says: str) -> None:
    result = invoke("ping", "-e", endpoint, "--timeout", "1", "--json")
    assert result.exit_code == 2
    assert says in json_error(result)


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5555", "tcp://pool-a:5555", "tcp://[::1]:5555", "ipc:///tmp/zp.sock",
    "dns://pool.default.svc:5555", "tcp://10.0.0.1;pool-a:5555",
])
def test_the_endpoints_a_client_connects_to_pass_the_check(endpoint: str) -> None:
    assert endpoint_problem(endpoint) is None


@pytest.mark.parametrize("command", [
    ["similarity", "a", "b"], ["embed", "a"], ["calibrate", "v1"], ["bench", "--duration", "1"],
])
def test_every_client_command_checks_its_endpoint_before_connecting(command: list[str]) -> None:
    result = invoke(*command, "-e", "tcp://127.0.0.1", "--json")
    assert result.exit_code == 2
    assert "has no port" in json_error(result)


@pytest.mark.parametrize(("bind", "says"), [
    ("foo", "no scheme"),
    ("tcp://127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),  # libzmq: 34463
    ("tcp://127.0.0.1", "'127.0.0.1' has no port"),
    ("dns://pool:5555", "unsupported scheme dns://"),
    ("ipc://", "no socket path"),
])
def test_serve_refuses_a_bind_it_cannot_listen_on_before_starting_anything(
        tmp_path: Path, bind: str, says: str) -> None:
    result = invoke("serve", "--model", "echo", "--bind", bind,
                    "--state-dir", str(tmp_path / "state"))
    assert result.exit_code == 2
    assert f"--bind {bind}: {says}" in result.stderr
    assert not (tmp_path / "state" / PID_FILE).exists()  # no server started


@pytest.mark.parametrize("bind", ["tcp://*:5555", "tcp://127.0.0.1:5555", "tcp://eth0:5555",
                                  "tcp://[::1]:5555", "ipc:///tmp/zp.sock"])
def test_the_endpoints_a_pool_listens_on_pass_the_bind_check(bind: str) -> None:
    assert bind_problem(bind) is None


def test_pool_http_refuses_a_bad_endpoint_before_it_says_it_listens() -> None:
    done = run_cli("http", "-e", "foo://x", "--json", env=dict(os.environ), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "unsupported scheme" in json.loads(done.stdout)["error"]["message"]  # only that
    assert "Traceback" not in done.stderr


@pytest.fixture
def operator_keys(tmp_path: Path) -> list[str]:
    create_keys(tmp_path / "keys", "server")
    create_keys(tmp_path / "keys", "operator")
    return ["--server-key", str(tmp_path / "keys" / "server.key"),
            "--client-key", str(tmp_path / "keys" / "operator.key_secret")]


@pytest.mark.parametrize(("pool", "says"), [
    ("tcp://a:1,tcp://b:2", "one control endpoint only"),
    ("tcp://a", "has no port"),
    ("tcp://a:port", "not a number"),
    ("ipc:///tmp/x.sock", "expected a tcp://HOST:PORT"),
])
def test_pool_is_one_well_formed_tcp_endpoint(pool: str, says: str,
                                              operator_keys: list[str]) -> None:
    result = invoke("status", "--pool", pool, *operator_keys, "--json")
    assert result.exit_code == 2
    assert says in json_error(result)


def test_a_fleet_names_its_malformed_pool(operator_keys: list[str]) -> None:
    result = invoke("fleet", "status", "--pools", "tcp://a:1,tcp://b", *operator_keys, "--json")
    assert result.exit_code == 2
    assert "tcp://b: 'b' has no port" in json_error(result)


# -- paths ---------------------------------------------------------------------------------------


def test_a_relative_model_path_reaches_a_local_pool_absolute_and_a_remote_one_as_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operator_keys: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m2").mkdir()
    local = ControlTarget.local(tmp_path / "state")
    # The pool runs in a working directory of its own: "m2" there is another directory.
    assert pool_model_path(local, "m2", False) == str(tmp_path / "m2")
    assert pool_model_path(local, "missing", False) == str(tmp_path / "missing")
    assert local_model_path("../m2") == str(tmp_path.parent / "m2")  # bench --rotate-path
    keys = ClientKeys.from_files(operator_keys[1], operator_keys[3])
    remote = ControlTarget.remote("tcp://pool-a:5556", keys)
    assert pool_model_path(remote, "m2", False) == "m2"  # a path on the pool's machine
    # A fleet may mix both: a directory that exists here is named absolutely, as --eval is.
    assert fleet_path_option("m2") == str(tmp_path / "m2")
    assert fleet_path_option("missing") == "missing"


# -- files the commands write --------------------------------------------------------------------


def test_serve_with_a_state_dir_it_cannot_write_is_a_usage_error(tmp_path: Path) -> None:
    model, file = fake_model(tmp_path / "m1"), tmp_path / "file"
    file.write_text("")
    result = invoke("serve", "--path", str(model), "--state-dir", str(file))
    assert result.exit_code == 2
    assert f"{file} exists and is not a directory" in result.stderr
    result = invoke("serve", "--path", str(model), "--state-dir", "/proc/zp-nowhere")
    assert result.exit_code == 2 and "/proc/zp-nowhere" in result.stderr


def test_keygen_into_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for directory in (tmp_path / "file", tmp_path / "file" / "sub"):
        result = invoke("keygen", str(directory), "--json")
        assert result.exit_code == 2
        assert str(directory) in json_error(result)


@pytest.mark.parametrize(("option", "path", "says"), [
    ("--plot", "/nonexist/p.png", "directory /nonexist does not exist"),
    ("--json-file", "{tmp}", "is a directory"),
])
def test_bench_checks_its_output_files_before_the_run(option: str, path: str, says: str,
                                                      tmp_path: Path) -> None:
    # Nothing listens there: a run would wait out its preflight ping first.
    result = invoke("bench", "-e", f"ipc://{tmp_path}/none.sock", "--duration", "1", option,
                    path.format(tmp=tmp_path), "--json")
    assert result.exit_code == 2
    assert says in json_error(result)


def test_a_report_whose_files_cannot_be_written_is_out_first_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = BenchResult({"requests": 1}, empty_samples(), 0.0)
    with pytest.raises(typer.Exit) as ended:
        save_files(result, tmp_path / "gone" / "r.json", None, Console(stderr=True), True)
    assert ended.value.exit_code == 1
    assert "the report is out, but its files are not" in capsys.readouterr().err


def test_demo_whose_pool_never_serves_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    result = invoke("demo", "--path", str(tmp_path / "nonexist"), "--rotate-path",
                    str(fake_model(tmp_path / "m2")), "--plot", str(tmp_path / "d.png"),
                    "--json")
    assert result.exit_code == 1
    assert "nonexist is not a directory" in json_error(result, "error")


# -- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "says"), [
    ([1, 2], "not a JSON array"),
    ({"versions": ["v1"]}, '"versions" is not an object (a JSON array)'),
    ({"versions": {"v1": "/models/v1"}}, "version 'v1' has no path"),
    ({"current_version": 1, "versions": {}}, '"current_version" is not a version name'),
])
def test_versions_import_of_another_shape_is_a_bad_request(doc: object, says: str,
                                                           tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(doc))
    state = tmp_path / "state"
    result = invoke("versions", "import", str(seed), "--state-dir", str(state), "--json")
    assert result.exit_code == 2
    assert says in json_error(result, "bad_request")
    assert not state.exists()
    with pytest.raises(ValueError, match=re.escape(says)):
        Registry(state).import_seed(doc)


def test_an_import_that_fails_half_way_changes_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    doc = {"current_version": "a", "versions": {"a": {"path": str(fake_model(tmp_path / "a"))},
                                                "b": {"path": str(tmp_path / "missing")}}}
    with pytest.raises(ValueError, match="is not a directory"):
        registry.import_seed(doc)
    assert registry.listing() == [] and registry.active is None


@pytest.mark.parametrize(("golden", "says"), [
    ([1], "a JSON array, not an object"),
    ({"pairs": 5, "scores": []}, '"pairs" is not a list'),
    ({"pairs": [["a"]], "scores": [0.5]}, '"pairs"[0] is not [text_a, text_b]'),
    ({"pairs": [["a", "b"]], "scores": ["high"]}, '"scores"[0] is not a number'),
    ({"pairs": [["a", "b"]], "scores": [True]}, '"scores"[0] is not a number'),
    ({"pairs": [["a", "b"]], "scores": []}, "1 pairs but 0 scores"),
    ({"pairs": [], "scores": [], "tolerance": "1%"}, '"tolerance" is not a number'),
])
def test_an_expect_file_of_another_shape_is_refused_before_it_is_sent(
        golden: object, says: str, tmp_path: Path) -> None:
    expect = tmp_path / "golden.json"
    expect.write_text(json.dumps(golden))
    state = tmp_path / "state"
    result = invoke("versions", "add", "v3", "--path", str(fake_model(tmp_path / "m")),
                    "--expect", str(expect), "--state-dir", str(state), "--json")
    assert result.exit_code == 2
    assert says in json_error(result, "bad_request")
    assert not state.exists()


def test_an_offline_edit_that_trips_on_its_input_is_a_bad_request(tmp_path: Path) -> None:
    def edit(_: Registry) -> None:
        raise TypeError("'int' object is not iterable")

    with pytest.raises(typer.Exit) as ended:
        registry_command(ControlTarget.local(tmp_path), "versions_add", True, edit)
    assert ended.value.exit_code == 2
    assert not (tmp_path / "versions.json").exists()


def test_versions_list_writes_nothing_and_says_when_the_state_dir_is_missing(
        tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    result = invoke("versions", "list", "--state-dir", str(missing), "--json")
    assert result.exit_code == 2
    assert f"no state directory {missing}" in json_error(result)
    assert not missing.exists()
    result = invoke("versions", "list", "--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["versions"] == []
    assert list(tmp_path.iterdir()) == []  # no versions.json for a read


def test_a_version_no_pool_can_list_says_its_last_rotation_from_the_history(
        tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.put_version("v2", str(fake_model(tmp_path / "m")))
    registry.log("rotation_started", rotation=7, target="v2", source="v1")
    registry.log("rotation_finished", rotation=7, target="v2", outcome="rolled_back",
                 reason="health check: v2 scored 0.1 against 0.9")
    registry.save()
    result = invoke("versions", "list", "--state-dir", str(tmp_path), "--json")
    last = json.loads(result.stdout)["versions"][0]["last_rotation"]
    assert (last["id"], last["outcome"]) == (7, "rolled_back") and "0.9" in last["reason"]
    result = invoke("versions", "list", "--state-dir", str(tmp_path))
    assert "v2: rotation 7 rolled_back: health check: v2 scored 0.1 against 0.9" in \
        result.stdout, result.stdout


def test_an_unknown_packaged_evaluation_set_is_named_as_one(tmp_path: Path) -> None:
    result = invoke("versions", "add", "v2", "--path", str(fake_model(tmp_path / "m")),
                    "--eval", "builtin:nosuch", "--state-dir", str(tmp_path), "--json")
    assert result.exit_code != 0
    assert "unknown built-in evaluation set 'builtin:nosuch'; known: builtin:zh-pairs" in \
        json.dumps(json.loads(result.stdout)), result.stdout


@pytest.mark.parametrize("labels", [[2, 2, 1], [0, 1], [1]])
def test_calibrate_will_not_save_thresholds_a_set_cannot_place(labels: list[int],
                                                               tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{label}\ta{i}\tb{i}\n" for i, label in enumerate(labels)))
    # No pool is asked: the set is refused before anything is scored or saved.
    result = invoke("calibrate", "v1", "--pairs", str(pairs), "--save", "--state-dir",
                    str(tmp_path), "--json")
    assert result.exit_code == 2
    message = json_error(result, "unfit_pairs")
    assert "thresholds fitted on it would mean nothing" in message
    assert ("2 (same meaning)" in message) == (2 not in labels)
    assert ("0 (unrelated)" in message) == (0 not in labels)
    assert not (tmp_path / "versions.json").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["similarity", "only-one"], "Missing argument"),
    (["status", "--bogus"], "No such option: --bogus"),
    (["similarity", "a", "b", "--timeout", "0"], "'--timeout'"),
    (["health", "--wait", "-1"], "'--wait'"),
])
def test_a_usage_error_under_json_is_json(args: list[str], says: str) -> None:
    done = run_cli(*args, "--json", env=dict(os.environ), timeout=60)
    assert done.returncode == 2, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is False and reply["error"]["code"] == "usage"
    assert says in reply["error"]["message"], reply


def test_a_text_of_invalid_utf8_is_a_bad_request_not_a_traceback() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as listener:
        listener.bind(endpoint)  # something listens; the text fails before it is sent
        # "\udcff": how Python hands over an argument byte 0xff (os.fsencode gives it back).
        done = run_cli("similarity", "\udcff\udcfe", "x", "--endpoint", endpoint, "--json",
                       env=dict(os.environ), timeout=60)
        assert not listener.poll(100), "nothing was sent"
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "bad_request" and "cannot be sent as JSON" in error["message"]


@pytest.mark.parametrize(("endpoint", "says"), [
    ("ipc://{tmp}/gone.sock", "no socket file there"),
    ("tcp://127.0.0.1:{port}", "connection refused"),
])
def test_a_client_command_where_nothing_listens_fails_at_once(endpoint: str, says: str,
                                                               tmp_path: Path) -> None:
    endpoint = endpoint.format(tmp=tmp_path, port=free_port())
    started = time.monotonic()
    result = invoke("similarity", "a", "b", "--endpoint", endpoint, "--json")
    assert result.exit_code == 1 and time.monotonic() - started < 5
    assert says in json_error(result, "not_running")


# -- the bench's report and exit code --------------------------------------------------------


def empty_samples() -> Samples:
    return Samples(np.empty(0), np.empty(0), [], [])


def test_bench_refuses_a_rotation_the_run_would_end_before(tmp_path: Path) -> None:
    result = invoke("bench", "-e", f"ipc://{tmp_path}/none.sock", "--duration", "2",
                    "--rotate-at", "3", "--rotate-to", "v2", "--json")
    assert result.exit_code == 2
    assert "--rotate-at 3 is not within the run's --duration 2" in json_error(result,
                                                                             "bad_request")


def test_an_empty_run_still_plots(tmp_path: Path) -> None:
    report = build_report(LoadSpec(endpoint="ipc:///none"), empty_samples(), None, 0.0)
    plot_report(empty_samples(), report, 0.0, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_counts_the_producers_that_ran_and_errors_apart_from_lost(
        tmp_path: Path) -> None:
    nan = math.nan
    samples = Samples(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.01, nan, 0.01, 0.01]),
                      ["ok", "lost", "overloaded", "ok"], ["v1", "", "", "v2"])
    watch = RotationWatch(tmp_path, at=0.15, target="v2", path=None, started=0.15,
                          finished=0.35, record={"outcome": "done"})
    spec = LoadSpec(endpoint="ipc:///none", concurrency=1, producers=4)
    report = build_report(spec, samples, watch, 0.0)
    assert report["producers"] == 1  # one request in flight: one producer ran
    phases = report["rotation"]["phases"]
    assert phases["during"] == {**phases["during"], "requests": 2, "errors": 1, "lost": 1}
    assert sum(p["errors"] for p in phases.values()) == sum(report["errors"].values()) == 1
    assert sum(p["lost"] for p in phases.values()) == report["lost"] == 1


def rotation_report(record: dict, error: str | None = None) -> dict:
    return {"requests": 10, "lost": 0, "seconds": 2.0,
            "rotation": {"record": record, "error": error}}


@pytest.mark.parametrize(("report", "says"), [
    ({"requests": 0, "lost": 0, "seconds": 0.3}, "no request was sent"),
    ({"requests": 5, "lost": 5, "seconds": 1.0}, "none of the 5 requests sent was answered"),
    (rotation_report({}, "unknown version 'nope'"), "the rotation failed: unknown version"),
    (rotation_report({"target": "v2", "outcome": "rolled_back", "reason": "quality gate"}),
     "the rotation to v2 ended rolled_back: quality gate"),
    ({"requests": 10, "lost": 0, "seconds": 2.0}, "before the rotation was due"),
])
def test_a_run_that_fell_short_says_why(report: dict, says: str) -> None:
    assert any(says in failure for failure in run_failures(report, rotation_asked=True))


def test_a_run_with_its_rotation_done_has_nothing_to_say() -> None:
    assert run_failures(rotation_report({"target": "v2", "outcome": "done"}), True) == []
    assert run_failures({"requests": 10, "lost": 0, "seconds": 2.0}, False) == []


def test_the_load_clock_starts_when_every_producer_is_ready(tmp_path: Path) -> None:
    proxy = ProxyBaseline(str(tmp_path), workers=1)
    starts: list[float] = []
    ticks: list[float] = []
    try:
        spec = LoadSpec(endpoint=proxy.endpoint, concurrency=4, duration_s=1.0, producers=2)
        samples = run_load(spec, lambda *_: None, ticks.append, starts.append)
    finally:
        proxy.close()
    assert starts == [samples.started]
    # Spawning a producer takes 0.4-0.9 s; timed from before it, a 1 s run sent its first
    # request 0.6 s in. From the start now: at once, and on until the deadline.
    # (A request let through just before the deadline is stamped as it goes, microseconds
    # later: 1.0000055 s was seen.)
    first, last = samples.sent.min() - samples.started, samples.sent.max() - samples.started
    assert 0 <= first < 0.25 and 0.75 < last <= 1.0 + STAMP_SLACK_S
    assert ticks and 0 < ticks[0] < 1.0
    assert samples.outcome.count("ok") == len(samples.outcome) > 0


CTRL_C_SCRIPT = """
import sys
from tooling.loadgen import LoadSpec, run_load

def tick(elapsed):  # the load runs: every producer is past its start
    if not ticked:
        ticked.append(elapsed)
        print("started", flush=True)

ticked = []
spec = LoadSpec(endpoint=sys.argv[1], concurrency=4, duration_s=60, producers=2)
try:
    run_load(spec, lambda *_: None, tick)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_stops_every_producer_at_once_without_a_traceback(tmp_path: Path) -> None:
    # A terminal's Ctrl-C: SIGINT to the whole process group, producers included.
    run = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, f"ipc://{tmp_path}/none.sock"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert run.stdout is not None and run.stdout.readline() == "started\n"
        producers = psutil.Process(run.pid).children(recursive=True)
        interrupted = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert time.monotonic() - interrupted < 5  # not each producer's 60 s, nor a 10 s join
    assert "interrupted" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    _, alive = psutil.wait_procs(producers, timeout=5)
    assert not alive


def test_only_a_single_endpoint_is_judged_unreachable_before_the_request(tmp_path: Path) -> None:
    from cli.common import nobody_listens

    missing = f"ipc://{tmp_path}/none.sock"
    assert nobody_listens(missing) == "no socket file there"
    # A list is the failover client's to try, whatever its first entry.
    assert nobody_listens(f"{missing},tcp://127.0.0.1:1") == ""
    assert nobody_listens(f"{missing},{missing}") == ""
