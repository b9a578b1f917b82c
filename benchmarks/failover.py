"""The failover client's cost and its recovery (issue #17).

1. Requests/s of `AsyncClient([a, b])` (one DEALER per pool, least loaded, failover) against
   plain round-robin (one DEALER connected to both, as the client was before), every pool
   healthy; closed loop, CONCURRENCY in flight, one short pair per request (so the client, not
   the model, is what is measured), SECONDS each, ROUNDS interleaved.
2. With root: pool a on a machine of its own (a network namespace); its link is cut under
   load (no reset), then healed; then the whole pool is SIGKILLed. Reported: how long the
   requests a held were delayed (the slowest call sent around the cut / kill), failed calls,
   and how soon a took traffic again. The client's default heartbeats (0.5 s, timeout 3 s).

Usage: [CONCURRENCY=N] python benchmarks/failover.py [SECONDS] [ROUNDS]
The load runs in this process and shares the cores with both pools: compare the figures with
each other only.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.client import (  # noqa: E402
    AsyncClient,
    connect_dealer,
    decode_reply,
    encode_request,
)
from router.protocol import OP_SIMILARITY  # noqa: E402
from tests.support import SENTENCES, RunningPool, make_tiny_bert, start_pool  # noqa: E402
from tooling.loadgen import FailoverProducers  # noqa: E402
from tooling.netns import Machine, namespaces_unavailable  # noqa: E402

CONCURRENCY = int(os.environ.get("CONCURRENCY", "32"))
# The partition / kill load: paced so that the pools keep a core free (each call ~8 ms apart
# per producer, as its 5 ms pause after a ~3 ms call gave before).
LOSS_IN_FLIGHT = 16
LOSS_RATE = 2000.0
PAIR = ("今天天气真好", "今日阳光明媚")


class RoundRobin:
    """The client as it was: one DEALER connected to every pool (ZeroMQ's round-robin),
    replies matched by request_id."""

    def __init__(self, endpoints: list[str]) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        connect_dealer(self.sock, endpoints, None)
        self.ids = itertools.count(1)
        self.pending: dict[bytes, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def similarity(self) -> object:
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self.read())
        rid = next(self.ids).to_bytes(8, "big")
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        await self.sock.send_multipart(encode_request(rid, OP_SIMILARITY, None,
                                                      {"pairs": [list(PAIR)]}))
        try:
            return await future
        finally:
            del self.pending[rid]

    async def read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            future = self.pending.get(frames[1])
            if future is not None and not future.done():
                future.set_result(decode_reply(OP_SIMILARITY, frames))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.sock.close(linger=0)


async def closed_loop(call: object, seconds: float) -> tuple[float, float]:
    """(requests/s, the client's CPU µs per request: this process's CPU time over the run)."""
    done = 0
    deadline = time.monotonic() + seconds
    cpu = time.process_time()

    async def one_loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await call()  # type: ignore[operator]
            done += 1

    await asyncio.gather(*(one_loop() for _ in range(CONCURRENCY)))
    return done / seconds, (time.process_time() - cpu) / done * 1e6


async def failover_rate(endpoints: list[str], seconds: float) -> tuple[float, float]:
    async with AsyncClient(endpoints) as client:
        await client.similarity([PAIR])  # both connected before the clock starts
        return await closed_loop(lambda: client.similarity([PAIR]), seconds)


async def round_robin_rate(endpoints: list[str], seconds: float) -> tuple[float, float]:
    client = RoundRobin(endpoints)
    try:
        await client.similarity()
        return await closed_loop(client.similarity, seconds)
    finally:
        await client.close()


def throughput(endpoints: list[str], seconds: float, rounds: int) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"failover": [], "round-robin": []}
    for _ in range(rounds):
        runs["failover"].append(asyncio.run(failover_rate(endpoints, seconds)))
        runs["round-robin"].append(asyncio.run(round_robin_rate(endpoints, seconds)))
    for name, values in runs.items():
        rates, cpus = [r for r, _ in values], [c for _, c in values]
        print(f"{name:12s} " + " ".join(f"{v:7.0f}" for v in rates)
              + f"   mean {sum(rates) / len(rates):7.0f} req/s;"
              + f" client CPU {sum(cpus) / len(cpus):5.0f} µs/request")
    total = {name: sum(r for r, _ in values) for name, values in runs.items()}
    cost = 1 - total["failover"] / total["round-robin"]
    print(f"failover cost: {cost * 100:+.1f}% of round-robin's requests/s")


def losses(machine: Machine, pool_a: RunningPool, endpoints: list[str]) -> None:
    load = FailoverProducers(endpoints, SENTENCES, LOSS_IN_FLIGHT, LOSS_RATE).start()
    time.sleep(2)
    machine.cut()
    cut = time.monotonic()
    time.sleep(5)
    print(f"partition: calls sent up to 0.2 s before the cut or after it waited at most "
          f"{load.slowest(cut - 0.2):.2f} s (heartbeat timeout 3 s)")
    machine.heal()
    healed = time.monotonic()
    while time.monotonic() - healed < 15 and "a" not in load.versions(since=healed):
        time.sleep(0.05)
    back = min((a.sent + a.latency for a in load.answers
                if a.version == "a" and a.sent >= healed), default=None)
    print("healed: a answered again after " +
          (f"{back - healed:.2f} s" if back is not None else "more than 15 s"))
    time.sleep(1)
    os.killpg(pool_a.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(2)
    print(f"SIGKILL: calls in flight waited at most {load.slowest(killed - 0.2):.2f} s")
    load.stop(40)
    print(f"{len(load.answers)} calls, {len(load.errors())} failed")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    model = make_tiny_bert(Path(tempfile.mkdtemp(prefix="zpbench-")) / "tiny", seed=1)
    why_not = namespaces_unavailable()
    machines = [] if why_not else [Machine(n, 240 + i).create() for i, n in enumerate("ab")]
    pools: list[RunningPool] = []
    try:
        for i, name in enumerate("ab"):
            endpoint = machines[i].endpoint if machines else f"tcp://127.0.0.{i + 2}:5599"
            prefix = machines[i].prefix if machines else ()
            pools.append(start_pool(model, "--bind", endpoint, workers=1, version=name,
                                    wait=False, own_group=True, endpoint=endpoint,
                                    prefix=prefix))
        for pool in pools:
            pool.process.wait_ready(pool.endpoint, workers=1, timeout=120)
        endpoints = [pool.endpoint for pool in pools]
        print(f"pools {endpoints}, {CONCURRENCY} in flight, {seconds:g} s x {rounds}")
        throughput(endpoints, seconds, rounds)
        if why_not:
            print(f"losses not measured: {why_not}")
        else:
            losses(machines[0], pools[0], endpoints)
    finally:
        for pool in pools:
            if pool.process.proc.poll() is None:
                pool.process.stop(timeout=20)
            for child in pool.children():
                child.kill()
            shutil.rmtree(pool.state_dir, ignore_errors=True)
        for machine in machines:
            machine.delete()
        shutil.rmtree(model.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
