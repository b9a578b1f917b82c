"""Operations on a live pool: status and health JSON, Prometheus metrics over HTTP, logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from cli.ops import system_line, version_troubles
from pool.health import (
    DEGRADED,
    FAILED,
    HEALTHY,
    Expectation,
    VersionFacts,
    assess_pool,
    assess_version,
)
from pool.judge import Traffic
from pool.metrics import (
    UNLOADED_KEEP_S,
    BatchTotals,
    PoolMetrics,
    RecentReplies,
    ReplyTally,
    bucket_quantile,
)
from pool.reports import BATCH_SIZE_BUCKETS, BatchStats
from router import protocol
from router.client import Client, UnknownVersion
from router.protocol import POOL_FAULTS
from tests.modelstub import weights_of_another_shape
from tests.support import RunningPool, run_cli, short_tmpdir, wait_for

PAIR = ("今天天气真好", "今日阳光明媚")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def health(pool: RunningPool, *args: str) -> tuple[int, dict]:
    done = run_cli("health", "--json", *args, env=pool.env)
    return done.returncode, json.loads(done.stdout)


def send_bad_bodies(endpoint: str, n: int) -> None:
    """Well-framed requests whose bodies a worker rejects (bad_request, version v1)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for i in range(n):
            sock.send_multipart([b"", protocol.PROTOCOL, f"bad-{i}".encode(),
                                 protocol.OP_SIMILARITY, b"", b"{not json"])
        for _ in range(n):
            assert sock.poll(30_000), "no reply to a bad body"
            frames = sock.recv_multipart()
            assert frames[3] == protocol.STATUS_ERROR
    finally:
        sock.close()


@pytest.mark.slow
def test_status_metrics_and_json_logs_on_a_live_pool(pool_factory, models: dict[str, Path]
                                                     ) -> None:
    pool = pool_factory(models["v1"], "--metrics-port", "0", "--log-json")
    before = pool.status()["requests"]  # start-up pings
    with Client(pool.endpoint, timeout=30) as client:
        for _ in range(30):
            client.similarity([PAIR])
        for _ in range(10):
            client.embed(["今天天气真好"])
        for _ in range(5):
            with pytest.raises(UnknownVersion):
                client.similarity([PAIR], version="nope")
    send_bad_bodies(pool.endpoint, 5)
    time.sleep(2.5)  # a heartbeat and a metrics refresh

    st = pool.status()
    for key in ("uptime_s", "active", "canary", "queue_depth", "requests_per_s", "rotation",
                "workers", "system", "metrics_url", "log_file", "versions", "requests"):
        assert key in st, key
    assert st["active"] == "v1" and st["requests_per_s"] > 0
    assert st["latency_ms"]["p99"] >= st["latency_ms"]["p50"] > 0
    assert st["requests"]["ok"] - before["ok"] == 40
    assert st["requests"]["errors_by_code"] == {"unknown_version": 5, "bad_request": 5}
    assert len(st["workers"]) == 2
    for w in st["workers"]:
        assert w["state"] == "ready" and w["device"] == "cpu" and w["rss_bytes"] > 0
        for key in ("pid", "version", "inflight", "served", "errors", "restarts",
                    "last_heartbeat_s", "gpu_memory_bytes"):
            assert key in w, key
    assert {"cpu_percent", "memory_percent", "gpus", "gpu_error"} <= set(st["system"])
    rich = run_cli("status", env=pool.env)
    assert rich.returncode == 0, rich.stderr
    words = " ".join(rich.stdout.split())  # rich wraps lines when stdout is a pipe
    for text in ("active v1", "limits: 1024 pairs/request",
                 "workers start by forkserver and load at nice +10",
                 "crash loops retried every 60s", f"metrics {st['metrics_url']}"):
        assert text in words, (text, rich.stdout)

    m = scrape(st["metrics_url"])
    assert sample(m, "zeropool_requests_total", version="v1", op="similarity",
                  status="ok") == 30
    assert sample(m, "zeropool_requests_total", version="v1", op="embed", status="ok") == 10
    assert sample(m, "zeropool_requests_total", version="none", op="similarity",
                  status="unknown_version") == 5
    assert sample(m, "zeropool_requests_total", version="v1", op="similarity",
                  status="bad_request") == 5
    assert sample(m, "zeropool_request_duration_seconds_count", version="v1",
                  op="similarity") == 35
    assert sample(m, "zeropool_workers", version="v1", state="ready") == 2
    assert sample(m, "zeropool_queue_depth", version="v1") == 0
    assert sample(m, "zeropool_batch_size_count", version="v1") >= 1
    # 40 answered requests of one item each, plus the health probes' pairs
    assert sample(m, "zeropool_batch_size_sum", version="v1") >= 40
    assert ("zeropool_system_memory_total_bytes", ()) in m

    done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--json",
                   env=pool.env)
    assert done.returncode == 0, done.stdout + done.stderr
    m = scrape(st["metrics_url"])
    assert sample(m, "zeropool_rotations_total", outcome="done") == 1
    assert sample(m, "zeropool_rotation_phase_seconds_count", phase="draining") == 1
    wait_for(lambda: sample(scrape(st["metrics_url"]), "zeropool_workers", version="v2",
                            state="ready") == 2, what="v2 workers in the metrics")

    records = [json.loads(line) for line in Path(st["log_file"]).read_text().splitlines()]
    console = (pool.state_dir / "console.log").read_text().splitlines()
    workers = [json.loads(line) for line in console if '"worker"' in line]
    assert any(r["message"].startswith("ready: version v1") for r in workers), console[-5:]
    phases = [r for r in records if r.get("event") == "rotation_phase"]
    assert [r["to_phase"] for r in phases][-1] == "done"
    assert all(isinstance(r["seconds"], float | int) for r in phases)


@pytest.mark.slow
def test_health_exit_codes_follow_killed_workers_and_failed_versions(
        pool_factory, models: dict[str, Path], tmp_path: Path) -> None:
    pool = pool_factory(models["v1"])
    code, report = health(pool)
    assert (code, report["status"]) == (0, HEALTHY), report
    assert report["versions"]["v1"]["golden"]["ok"]
    assert {"cpu_percent", "gpus"} <= set(report["system"])

    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    code, report = wait_for(lambda: (r := health(pool))[0] == 1 and r, what="degraded")
    assert report["status"] == DEGRADED
    assert any("crash" in reason for reason in report["versions"]["v1"]["reasons"])

    broken = weights_of_another_shape(models["v2"], tmp_path / "broken")
    assert run_cli("versions", "add", "bad", "--path", str(broken), env=pool.env).returncode == 0
    assert run_cli("load", "bad", env=pool.env).returncode == 0
    code, report = wait_for(lambda: (r := health(pool, "--version", "bad"))[0] == 2 and r,
                            what="bad version failed")
    assert report["versions"]["bad"]["status"] == FAILED
    code, report = health(pool)
    assert code == 1, report  # the active version serves: the pool is degraded, not failed
    assert any(reason.startswith("bad:") for reason in report["pool"]["reasons"])

    code, report = health(pool, "--version", "v9")
    assert code == 2 and "v9 is not loaded" in report["error"]["message"]

    assert run_cli("stop", env=pool.env).returncode == 0
    pool.process.proc.wait(timeout=60)
    code, report = health(pool)
    assert code == 2 and report["error"]["code"] == "not_running"


@pytest.mark.slow
def test_health_wait_outwaits_a_starting_pool_and_ends_at_once_on_what_waiting_cannot_cure(
        pool_factory, models: dict[str, Path]) -> None:
    state_dir = short_tmpdir()
    env = {**os.environ, "ZEROPOOL_STATE_DIR": str(state_dir)}
    started = time.monotonic()
    none = run_cli("health", "--wait", "1.5", "--json", env=env)
    assert none.returncode == 2 and time.monotonic() - started >= 1.5
    assert json.loads(none.stdout)["error"]["code"] == "not_running"

    # Asked before the pool exists: it answers once both workers have loaded.
    waiter = subprocess.Popen([sys.executable, "-m", "cli.main", "health", "--wait", "120",
                               "--json"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        pool = pool_factory(models["v1"], state_dir=state_dir, wait=False)
        stdout, _ = waiter.communicate(timeout=180)
    finally:
        waiter.kill()
    report = json.loads(stdout)
    assert waiter.returncode == 0 and report["status"] == HEALTHY, report
    assert report["versions"]["v1"]["workers_ready"] == 2

    started = time.monotonic()
    code, report = health(pool, "--version", "v9", "--wait", "60")
    assert code == 2 and "v9 is not loaded" in report["error"]["message"]
    assert time.monotonic() - started < 30  # an unknown version: no waiting it out


def test_metrics_port_in_use_is_a_clear_startup_error(models: dict[str, Path], tmp_path: Path
                                                      ) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = Path(f"/tmp/zp-metrics-{os.getpid()}")
        done = run_cli("serve", "--path", str(models["v1"]), "--workers", "1",
                       "--bind", f"ipc://{state}/front.sock", "--state-dir", str(state),
                       "--metrics-port", str(port), env=dict(os.environ), timeout=120)
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert not (state / "serve.pid").exists()


# -- the judgement, without processes ----------------------------------------------------------


def facts(**overrides: object) -> VersionFacts:
    ready = {"id": "v1-0-1", "state": "ready", "last_heartbeat_s": 0.5}
    base: dict = {"version": "v1", "workers_wanted": 2, "workers": [ready, {**ready,
                  "id": "v1-1-2"}], "failed": None, "crash_loop": None, "ever_ready": True,
                  "recent_crashes": 0, "replies_by_code": {"ok": 100}, "golden": {"ok": True},
                  "pool_faults": POOL_FAULTS}
    return VersionFacts(**{**base, **overrides})


@pytest.mark.parametrize(("overrides", "status", "reason"), [
    ({}, HEALTHY, None),
    ({"workers": []}, FAILED, "no worker is ready"),
    ({"workers": [], "ever_ready": False}, DEGRADED, "loading"),
    ({"failed": "crash loop"}, FAILED, "crash loop"),
    # One slot keeps crashing, the other serves: the version still answers.
    ({"crash_loop": "crash loop: 5 restarts", "recent_crashes": 5}, DEGRADED, "crash loop"),
    ({"recent_crashes": 1}, DEGRADED, "crash"),
    ({"replies_by_code": {"ok": 90, "internal": 10}}, DEGRADED, "error rate 10%"),
    ({"replies_by_code": {"ok": 90, "bad_request": 10}}, HEALTHY, None),  # producers' fault
    ({"replies_by_code": {"ok": 1, "timeout": 2}}, HEALTHY, None),  # too few to judge
    ({"golden": {"ok": False, "worker": "v1-0-1", "reason": "NaN"}}, FAILED, "golden"),
])
def test_version_health_rules(overrides: dict, status: str, reason: str | None) -> None:
    report = assess_version(facts(**overrides))
    assert report["status"] == status
    if reason:
        assert any(reason in r for r in report["reasons"]), report["reasons"]
    else:
        assert report["reasons"] == []


def test_pool_health_is_the_active_versions_and_others_only_degrade_it() -> None:
    healthy = assess_version(facts())
    failed = assess_version(facts(failed="boom"))
    assert assess_pool({"v1": healthy, "v2": failed}, "v1", False)["status"] == DEGRADED
    assert assess_pool({"v1": failed, "v2": healthy}, "v1", False)["status"] == FAILED
    assert assess_pool({"v1": healthy}, None, False)["status"] == FAILED
    assert assess_pool({"v1": healthy}, "v1", True)["status"] == DEGRADED
    loading = assess_version(facts(workers=[], ever_ready=False))
    assert loading["loading"]
    assert assess_pool({"v1": healthy, "v2": loading}, "v1", False)["status"] == HEALTHY
    assert assess_pool({"v1": loading}, "v1", False)["status"] == DEGRADED  # at start-up
    # A rolling rotation of one worker retires the active version's first: it wants none,
    # has none, and its requests only queue until v2 serves.
    retired = assess_version(facts(workers_wanted=0, workers=[]))
    gap = assess_pool({"v1": retired, "v2": loading}, "v1", False)
    assert gap["status"] == DEGRADED and gap["reasons"] == ["v1: no worker is ready"]


def test_a_golden_file_of_another_shape_is_a_clear_error() -> None:
    for doc, says in (([1, 2], "a JSON array, not an object"),
                      ({"pairs": 5, "scores": []}, '"pairs" is not a list'),
                      ({"pairs": [["a", "b"]]}, '"scores" is not a list'),
                      ({"pairs": [["a", "b"]], "scores": ["x"]}, '"scores"[0] is not')):
        with pytest.raises(ValueError, match=f"expect: {re.escape(says)}"):
            Expectation.from_dict(doc)
    with pytest.raises(ValueError, match="1 pairs but 2 scores"):
        Expectation.from_dict({"pairs": [["a", "b"]], "scores": [0.5, 0.5]})
    assert Expectation.from_dict({"pairs": [["a", "b"]], "scores": [0.5], "tolerance": 0.01}
                                 ).tolerance == 0.01


def test_batch_totals_keep_an_exited_workers_counts() -> None:
    counts = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
    counts[3] = 5
    row = SimpleNamespace(id="v1-0-1", version="v1",
                          batching=BatchStats(batch_size_counts=counts, batch_items=40))
    totals = BatchTotals()
    totals.update([row, SimpleNamespace(**{**vars(row), "id": "v1-1-2"})])
    totals.update([row])  # v1-1-2 exited
    assert totals.totals()["v1"] == ([0, 0, 0, 10, *[0] * (len(counts) - 4)], 80)


def test_reply_tally_and_recent_windows() -> None:
    tally = ReplyTally()
    recent = RecentReplies(tally)
    for second in range(100):
        for _ in range(3):
            tally.add("v1", b"similarity", "ok", 0.003)
        if second == 95:
            tally.add("v1", b"similarity", "internal", None)
        recent.record(float(second))
    assert tally.counts[("v1", b"similarity", "ok")] == 300
    assert sum(tally.buckets[("v1", b"similarity")]) == 300  # the error had no duration
    assert recent.per_second() == 3.1  # 30 ok and the one error in the last 10 s
    assert recent.by_code("v1") == {"ok": 180, "internal": 1}
    assert recent.by_code("v2") == {}
    latency = recent.latency_ms()  # every reply took 3 ms: in the (2 ms, 3 ms] bucket
    assert latency is not None and 2.0 < latency["p50"] < latency["p99"] <= 3.0


def test_a_versions_traffic_over_a_window_is_what_a_bake_judges() -> None:
    tally = ReplyTally()
    recent = RecentReplies(tally)
    for second in range(20):
        for _ in range(3):
            tally.add("v1", b"similarity", "ok", 0.003)
        if second >= 10:  # v2 from second 10: two fine replies, one pool fault, slower
            tally.add("v2", b"similarity", "ok", 0.018)
            tally.add("v2", b"similarity", "ok", 0.018)
            tally.add("v2", b"similarity", "internal", 0.018)
            tally.add("v2", b"similarity", "bad_request", None)  # the producer's fault
        recent.record(float(second))
    v2 = recent.traffic("v2", 14.0)  # the last five seconds
    # 3 replies a second it answered or fell short on (1 pool fault); the producer's bad
    # request is neither, and counts for nothing.
    assert (v2.requests, v2.errors, v2.latency_over) == (15, 5, 15)
    assert v2.p99_ms is not None and 15.0 < v2.p99_ms <= 20.0
    assert v2.p90_ms is not None and 15.0 < v2.p90_ms <= v2.p99_ms
    v1 = recent.traffic("v1", 14.0)
    assert (v1.requests, v1.errors) == (15, 0) and v1.p99_ms <= 3.0
    assert recent.traffic("v3", 14.0) == Traffic()
    assert RecentReplies(ReplyTally()).traffic("v1", 14.0) == Traffic()
    # Strict: nothing before `since`, so from the first record at or after it.
    assert recent.traffic("v2", 16.5, strict=True).requests == 6
    assert recent.traffic("v2", 19.5, strict=True) == Traffic()
    # One record alone is the version's whole past, not a window: a bake's first ticks
    # would judge v2 by errors it made before it was rolled back once.
    once = RecentReplies(tally)
    once.record(0.0)
    assert once.traffic("v2", 0.0) == Traffic()


def test_an_unloaded_version_leaves_the_metrics_and_the_windows_stay_right() -> None:
    """A pool rotated daily must not export every version it ever served; forgetting one
    must not make a window's counts fall (a negative requests/s), and a version loaded again
    counts from zero, as Prometheus reads a counter's reset."""
    metrics = PoolMetrics()
    try:
        tally, recent = metrics.replies, metrics.recent
        for _ in range(30):
            tally.add("v1", b"similarity", "ok", 0.003)
        tally.add("", b"similarity", "bad_request", None)  # no version took it
        recent.record(0.0)
        metrics.forget_unloaded({"v2"}, restarted={"v1"}, now=0.0)  # v1 unloaded at 0 s
        tally.add("v2", b"similarity", "ok", 0.003)
        recent.record(1.0)
        metrics.forget_unloaded({"v2"}, restarted={"v1"}, now=UNLOADED_KEEP_S - 1)
        assert "v1" in tally.versions() and metrics._exported("v1", UNLOADED_KEEP_S - 1)
        metrics.forget_unloaded({"v2"}, restarted={"v1"}, now=UNLOADED_KEEP_S)
        assert tally.versions() == {"", "v2"}  # v1's series are gone, the unversioned kept
        assert not metrics._exported("v1", UNLOADED_KEEP_S)  # its restarts too
        assert "v1" not in str(metrics._reply_families())
        for _ in range(2):
            tally.add("v2", b"similarity", "ok", 0.003)
        recent.record(2.0)  # the window still starts before v1 was forgotten
        assert recent.per_second() == 1.5  # v2's 3 replies over 2 s; v1's 30 not taken off
        tally.add("v1", b"similarity", "ok", 0.003)  # v1 loaded again
        metrics.forget_unloaded({"v1", "v2"}, restarted={"v1"}, now=UNLOADED_KEEP_S + 1)
        recent.record(3.0)
        assert recent.by_code("v1") == {"ok": 1}
        assert recent.traffic("v1", 0.0).requests == 1 and recent.traffic("v1", 0.0).p99_ms
        assert metrics._exported("v1", UNLOADED_KEEP_S + 1)
    finally:
        metrics.close()


def test_pings_and_refusals_are_no_latencies_and_pings_no_traffic() -> None:
    """A health probe's pings are not a version's traffic; a refusal has no latency, so the
    replies a p99 rests on are those timed."""
    tally = ReplyTally()
    recent = RecentReplies(tally)
    recent.record(0.0)
    for _ in range(700):
        tally.add("v1", b"similarity", "ok", 0.01)
    for _ in range(300):
        tally.add("v1", b"similarity", "overloaded", None)
        tally.add("v1", b"ping", "ok", None)
    recent.record(1.0)
    v1 = recent.traffic("v1", 0.0)
    assert (v1.requests, v1.errors, v1.latency_over) == (1000, 300, 700)


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert bucket_quantile(0.5, bounds, [0, 10, 0, 0]) == 1.5
    assert bucket_quantile(0.99, bounds, [50, 0, 50, 0]) == 3.96
    assert bucket_quantile(0.5, bounds, [0, 0, 0, 5]) == 4.0  # +Inf answers the top bound


def test_status_names_each_version_that_cannot_serve_or_keeps_crashing() -> None:
    status = {"versions": {
        "v1": {"failed": None, "crash_loop": None, "next_try_s": None},
        "v2": {"failed": "crash loop: 5 restarts", "crash_loop": "crash loop: 5 restarts",
               "next_try_s": 41.6},
        "v3": {"failed": "weights are corrupt", "crash_loop": None, "next_try_s": None},
        "v4": {"failed": None, "crash_loop": "crash loop: 6 restarts", "next_try_s": 3.0},
    }}
    assert version_troubles(status) == [
        "v2: crash loop: 5 restarts (next try in 42s)",
        "v3: weights are corrupt",
        "v4: crash loop: 6 restarts (next try in 3s)",
    ]


def test_a_gpu_that_does_not_report_its_load_is_still_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MIG instances and some vGPUs answer utilisation with NVML's Not Supported: the GPU is
    listed all the same (device choice and a surge rotation's room depend on it)."""
    from pool import system

    class NVMLError(Exception):
        pass

    def not_supported(handle: object) -> object:
        raise NVMLError("Not Supported")

    fake = SimpleNamespace(
        NVMLError=NVMLError, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 MIG 3g.40gb",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=40 * 2**30),
        nvmlDeviceGetUtilizationRates=not_supported)
    monkeypatch.setitem(system._NVML, "module", fake)
    gpus, error = system.gpu_stats()
    assert error is None and [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["load_percent"] is None and gpus[0]["memory_total_bytes"] == 40 * 2**30
    assert "load n/a" in system_line({"cpu_percent": 1.0, "cpu_count": 2, "memory_percent": 1.0,
                                      "memory_used_bytes": 0, "memory_total_bytes": 1,
                                      "gpus": gpus, "gpu_error": None})


def test_a_strict_span_leaves_out_everything_before_its_start() -> None:
    """A bake's settled latencies start after its first seconds: with records a second apart,
    a span counted back from the newest record would reach into them."""
    tally = ReplyTally()
    recent = RecentReplies(tally)
    switch = 100.0
    recent.record(switch - 0.3)
    for record_at in (switch + 0.7, switch + 1.7, switch + 2.7, switch + 3.7):
        for step in range(200):  # 200 replies a second, slow ones in the first 1.5 s
            at = record_at - 1 + step / 200
            tally.add("v2", b"similarity", "ok", 0.9 if at < switch + 1.5 else 0.01)
        recent.record(record_at)
    settled = recent.traffic("v2", switch + 2.0, strict=True)
    assert settled.latency_over == 200 and settled.p99_ms is not None
    assert settled.p99_ms <= 10.0  # only the replies after switch + 2.7
    assert recent.traffic("v2", switch).latency_over == 800  # since the switch: all of them
