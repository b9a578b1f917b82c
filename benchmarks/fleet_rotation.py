"""A fleet rotation's length and the fleet's latency during it (issue #17's targets).

POOLS pools (tiny BERTs the tests' fixtures make, 1 worker each) on one machine, producers on
one failover AsyncClient over all of them at RATE requests/s. Measured, interleaved ROUNDS
times: one pool's own `pool rotate` (the unit), then `pool fleet rotate --bake BAKE` of all
of them; reported: the fleet rotation's seconds against POOLS x one rotation + BAKE, and the
producers' p50/p99 during the rollout against the steady seconds before it, and that p99
split: calls sent while some pool loaded its new worker (its rotation's start to its switch)
and the others.

Usage: python benchmarks/fleet_rotation.py [POOLS] [BAKE] [ROUNDS]   (RATE=..., NICENESS=... in
the env: requests/s over the fleet, the pools' --load-niceness; PIN=N: pool i and every process
it starts on N cores of its own (the i-th N, wrapping around), a machine per pool as far as this
machine's cores go, and from N=2 its passes on the last of them (--cpu-affinity auto);
CPU_QUOTA=0.5: each pool and every process it starts in a cgroup of its own, held to that many
cores' time as a Kubernetes pod's CPU limit holds it: root, tooling.cgroups)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import (  # noqa: E402
    SENTENCES,
    RunningPool,
    make_tiny_bert,
    start_pool,
    stop_pool,
)
from tooling.cgroups import LimitedGroup, cpu_limited  # noqa: E402
from tooling.loadgen import FailoverProducers  # noqa: E402

RATE = float(os.environ.get("RATE", "300"))  # requests/s over the whole fleet
NICENESS = os.environ.get("NICENESS")  # the pools' --load-niceness (default: the pool's)
PIN = int(os.environ.get("PIN") or 0)  # cores per pool (0: the kernel places them)
CPU_QUOTA = float(os.environ.get("CPU_QUOTA", "0"))  # cores per pool (0: no limit)
IN_FLIGHT = 16
STEADY_S = 5.0
PRE_SWITCH = ("spawning", "loading", "health_check")  # a new worker loads beside the old


def cli(*args: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "cli.main", *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    return json.loads(done.stdout)


def start_placed(index: int, path: Path, group: LimitedGroup | None,
                 *extra: str) -> RunningPool:
    """A pool of one worker; with PIN, it (and what it forks: workers, a rotation's new
    ones) inherits this process's affinity to its PIN cores while it starts, and from 2 cores
    pins its passes to the last; in `group`, if given, likewise."""
    cores = sorted(os.sched_getaffinity(0))
    if PIN:
        os.sched_setaffinity(0, {cores[(index * PIN + k) % len(cores)] for k in range(PIN)})
    pinned = ("--cpu-affinity", "auto") if PIN > 1 else ()  # 1 thread: on the last core
    try:
        return start_pool(path, *extra, *pinned, workers=1,
                          prefix=group.prefix if group else ())
    finally:
        os.sched_setaffinity(0, cores)


def pre_switch_spans(report: dict, rollout_start: float) -> list[tuple[float, float]]:
    """Each pool's seconds from its rotation's start to its switch (monotonic), when a new
    worker loads and is checked on the pool's machine."""
    spans = []
    for pool in report["pools"]:
        if pool.get("started_s") is None:
            continue
        timings = (pool.get("rotation") or {}).get("timings") or {}
        start = rollout_start + pool["started_s"]
        spans.append((start, start + sum(timings.get(p, 0.0) for p in PRE_SWITCH)))
    return spans


def p99_split(producers: FailoverProducers, started: float, ended: float,
              spans: list[tuple[float, float]]) -> dict[str, float | None]:
    """The rollout's p99 while some pool loaded its new worker (`spans`), and the rest."""
    def loading(sent: float) -> bool:
        return any(a <= sent < b for a, b in spans)

    return {"loading": producers.where(loading).get("p99_ms"),
            "else": producers.where(
                lambda sent: started <= sent < ended and not loading(sent)).get("p99_ms")}


def run_rounds(pools_n: int, bake: float, rounds: int, versions: dict[str, Path],
               placed: list[LimitedGroup | None], extra: tuple[str, ...],
               ) -> tuple[list[dict], list[float]]:
    """Start the pools and the producers, run the rounds, stop them: each round's figures,
    and the seconds each pool's cgroup was throttled."""
    pools = [start_placed(index, versions["v1"], group, *extra)
             for index, group in enumerate(placed)]
    producers = FailoverProducers([p.endpoint for p in pools], SENTENCES, IN_FLIGHT,
                                  RATE).start()
    names = ",".join(str(p.state_dir) for p in pools)
    results = []
    try:
        current = "v1"
        for round_ in range(rounds):
            # The unit: one pool's own rotation, there and back (the fleet stays on `current`).
            other = "v3" if current != "v3" else "v2"
            env = pools[0].env
            one = cli("rotate", "--version", other, "--path", str(versions[other]), env=env)
            cli("rotate", "--version", current, env=env)
            unit = one["rotation"]["total_s"]
            target = "v2" if current != "v2" else "v1"
            time.sleep(STEADY_S)
            started = time.monotonic()
            report = cli("fleet", "rotate", "--pools", names, "--version", target, "--path",
                         str(versions[target]), "--bake", str(bake), env=env)["report"]
            ended = time.monotonic()
            current = target
            results.append({
                "round": round_ + 1, "one_rotation_s": unit,
                "fleet_s": round(ended - started, 2),
                "expected_s": round(pools_n * unit + bake, 2),
                "steady": producers.window(started - STEADY_S, started),
                "during": producers.window(started, ended),
                # Where the slow calls were: while some pool loaded its new worker, or not.
                "during_p99_ms": p99_split(producers, started, ended, pre_switch_spans(
                    report, ended - report["seconds"])),
                "outcome": report["outcome"]})
            r = results[-1]
            print(f"round {r['round']}: fleet {r['fleet_s']} s vs {pools_n} x {unit} s + "
                  f"{bake} s = {r['expected_s']} s; p99 steady {r['steady'].get('p99_ms')} "
                  f"ms, during {r['during'].get('p99_ms')} ms (a pool loading "
                  f"{r['during_p99_ms']['loading']}, else {r['during_p99_ms']['else']}); errors "
                  f"{r['during']['errors']}; {r['outcome']}", flush=True)
        # Seconds each pool's cgroup was held back by its limit (its loading and serving).
        throttled = [round(group.throttled_s(), 2) for group in placed if group]
    finally:
        producers.stop()
        for pool in pools:
            stop_pool(pool)
    return results, throttled


def main() -> None:
    pools_n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    bake = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    models = Path(tempfile.mkdtemp(prefix="zp-fleet-models-"))
    versions = {f"v{i}": make_tiny_bert(models / f"v{i}", seed=i) for i in range(1, 4)}
    extra = ("--load-niceness", NICENESS) if NICENESS else ()
    with ExitStack() as groups:  # left last: a cgroup goes once the pool in it has exited
        placed = [groups.enter_context(cpu_limited(f"zp-fleet-{os.getpid()}-{index}",
                                                   CPU_QUOTA)) if CPU_QUOTA else None
                  for index in range(pools_n)]
        results, throttled = run_rounds(pools_n, bake, rounds, versions, placed, extra)
    ratios = [r["during"]["p99_ms"] / r["steady"]["p99_ms"] for r in results
              if r["steady"].get("p99_ms") and r["during"].get("p99_ms")]
    print(json.dumps({"pools": pools_n, "bake_s": bake, "rate": RATE, "pinned": PIN,
                      "cpu_quota": CPU_QUOTA or None, "throttled_s": throttled,
                      "rounds": results,
                      "p99_during_over_steady": [round(x, 2) for x in ratios],
                      "median_ratio": round(statistics.median(ratios), 2) if ratios else None},
                     indent=2))


if __name__ == "__main__":
    main()
