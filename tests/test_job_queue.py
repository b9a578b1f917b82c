"""How a worker's device thread takes its next pass out of the job queue (pool.passes):
max_batch pairs, the --max-batch-tokens budget, the wait to fill a batch, the pipeline's
half passes, the stop."""

from __future__ import annotations

import itertools
import threading
import time

import orjson
from hypothesis import given
from hypothesis import strategies as st

from pool.passes import (
    PIPELINE_MIN_SIZE,
    PIPELINE_WINDOW_PASSES,
    DeviceThread,
    Job,
    JobQueue,
    echo_answer,
    pipelined_limit,
    worth_pipelining,
)
from pool.reports import BatchStats
from pool.worker import chunks_of_texts
from router import protocol
from router.client import Embeddings, decode_reply


def job(n: int, size: int = 1, tokens: int = 10) -> Job:
    return Job(seq=n.to_bytes(8, "little"), op=b"similarity", texts=["a", "b"] * size,
               size=size, tokens=tokens)


def numbers(jobs: list[Job] | None) -> list[int]:
    assert jobs is not None
    return [int.from_bytes(j.seq, "little") for j in jobs]


def test_a_pass_takes_up_to_max_batch_pairs_in_order_and_the_last_request_may_go_over() -> None:
    queue = JobQueue()
    queue.put([job(1, size=3), job(2, size=3), job(3, size=1)])
    assert numbers(queue.take(max_size=4, wait_s=0)) == [1, 2]  # 6 pairs: never split a request
    assert numbers(queue.take(max_size=4, wait_s=0)) == [3]


def test_the_token_budget_stops_a_pass_short_and_a_long_request_runs_alone() -> None:
    queue = JobQueue()
    queue.put([job(1, tokens=40), job(2, tokens=50), job(3, tokens=500), job(4, tokens=10)])
    assert numbers(queue.take(64, 0, max_tokens=100)) == [1, 2]
    assert numbers(queue.take(64, 0, max_tokens=100)) == [3]  # over the budget alone
    assert numbers(queue.take(64, 0, max_tokens=100)) == [4]


def test_a_pass_waits_up_to_wait_s_for_company_then_goes() -> None:
    queue = JobQueue()
    queue.put([job(1)])
    later = threading.Timer(0.05, lambda: queue.put([job(2)]))
    later.start()
    start = time.monotonic()
    assert numbers(queue.take(64, wait_s=0.3)) == [1, 2]  # the second came within the wait
    assert 0.29 <= time.monotonic() - start < 3.0
    later.join()


def test_a_full_pass_does_not_wait() -> None:
    queue = JobQueue()
    queue.put([job(1, size=2), job(2, size=2)])
    start = time.monotonic()
    assert numbers(queue.take(4, wait_s=5.0)) == [1, 2]
    assert time.monotonic() - start < 1.0


def test_a_closed_queue_is_emptied_first_then_ends() -> None:
    queue = JobQueue()
    queue.put([job(1), job(2), job(3)])
    queue.close()
    assert numbers(queue.take(2, wait_s=5.0)) == [1, 2]
    assert numbers(queue.take(2, wait_s=5.0)) == [3]  # closed: no wait for company
    assert queue.take(2, wait_s=5.0) is None


def test_a_waiting_take_wakes_on_a_put_and_on_close() -> None:
    queue = JobQueue()
    threading.Timer(0.05, lambda: queue.put([job(7)])).start()
    assert numbers(queue.take(1, wait_s=0)) == [7]
    threading.Timer(0.05, queue.close).start()
    assert queue.take(1, wait_s=0) is None


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 300)), min_size=1, max_size=30),
       st.integers(1, 16), st.sampled_from([0, 50, 200, 1000]))
def test_passes_cover_the_queue_in_order_and_each_is_as_full_as_the_rules_allow(
    specs: list[tuple[int, int]], max_size: int, max_tokens: int,
) -> None:
    queue = JobQueue()
    queue.put([job(i, size, tokens) for i, (size, tokens) in enumerate(specs)])
    queue.close()
    passes = []
    while (taken := queue.take(max_size, 0, max_tokens)) is not None:
        passes.append(taken)
        left = sum(size for size, _ in specs) - sum(j.size for p in passes for j in p)
        assert queue.queued_size() == left  # the kept total is what is still queued
    assert [n for p in passes for n in numbers(p)] == list(range(len(specs)))
    for i, taken in enumerate(passes):
        size = sum(j.size for j in taken)
        tokens = sum(j.tokens for j in taken)
        assert sum(j.size for j in taken[:-1]) < max_size  # only the last may go over
        if max_tokens and len(taken) > 1:
            assert tokens <= max_tokens
        if i + 1 < len(passes):  # the next request would have broken a rule
            nxt = passes[i + 1][0]
            assert size >= max_size or (max_tokens and tokens + nxt.tokens > max_tokens)


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60),
       st.integers(min_value=1, max_value=64))
def test_an_intake_is_tokenised_in_runs_of_at_most_max_texts_in_order(
    sizes: list[int], max_texts: int
) -> None:
    jobs = [Job(seq=bytes([i % 256]), op=b"s", texts=["t"] * n, size=n)
            for i, n in enumerate(sizes)]
    parts = chunks_of_texts(jobs, max_texts)
    assert [job for part in parts for job in part] == jobs
    assert all(part for part in parts)
    for part in parts:
        assert len(part) == 1 or sum(len(job.texts) for job in part) <= max_texts
    # Each run is as long as the bound allows: the next job would not have fitted.
    for part, following in itertools.pairwise(parts):
        assert sum(len(job.texts) for job in part) + len(following[0].texts) > max_texts


def test_a_pass_takes_half_of_what_the_worker_held_lately_so_the_rest_is_prepared_meanwhile(
        ) -> None:
    assert pipelined_limit(64, [64]) == 32  # 64 in flight: two halves take turns
    assert pipelined_limit(64, [33]) == 17
    assert pipelined_limit(64, [300, 10]) == 64  # a deep queue: full passes
    assert pipelined_limit(64, [PIPELINE_MIN_SIZE - 1]) == 64  # light load: all of it at once
    assert pipelined_limit(64, []) == 64
    # The peak of the window: one pass that found the next half still being tokenised does
    # not halve the one after.
    assert pipelined_limit(64, [64, 32, 40]) == 32


def test_the_device_thread_splits_a_closed_loop_in_two_and_keeps_the_split() -> None:
    queue = JobQueue()
    device = DeviceThread(queue, "v1", max_batch=64, max_wait_ms=0, embed=None,
                          stats=BatchStats())
    costs(device, prep_s=0.35e-3, pass_s=1e-3)  # a tiny model: tokenising is a third of it
    queue.put([job(n) for n in range(64)])  # 64 in flight, all at the worker
    assert numbers(device._next_batch()) == list(range(32))
    assert numbers(device._next_batch()) == list(range(32, 64))  # the first half is out
    # The first half is back, but the intake has tokenised only 16 of it so far.
    queue.put([job(n) for n in range(64, 80)])
    assert numbers(device._next_batch()) == list(range(64, 80))
    # 48 held now (32 queued, 16 out) would make passes of 24: the window keeps 32.
    queue.put([job(n) for n in range(80, 112)])
    assert numbers(device._next_batch()) == list(range(80, 112))
    # Light load for a whole window: the split is forgotten; a burst is halved afresh.
    for n in range(200, 200 + PIPELINE_WINDOW_PASSES + 1):
        queue.put([job(n)])
        assert numbers(device._next_batch()) == [n]
    queue.put([job(n) for n in range(300, 324)])
    assert len(device._next_batch() or []) == 13  # (24 queued + 1 out) / 2


def costs(device: DeviceThread, prep_s: float, pass_s: float) -> None:
    """What the worker measured per text: decoding and tokenising, and computing."""
    device.note_preparation(prep_s * 10, 10)
    device._note_pass(pass_s * 2, [job(0)])  # one pair: two texts


def test_halving_pays_only_where_preparing_is_a_real_share_of_computing() -> None:
    assert worth_pipelining(0.35e-3, 1e-3)  # a 2-layer BERT
    assert not worth_pipelining(0.012e-3, 0.9e-3)  # MiniLM on a CPU: tokenising is ~1%
    assert not worth_pipelining(None, 1e-3) and not worth_pipelining(1e-3, None)  # unknown
    queue = JobQueue()
    device = DeviceThread(queue, "v1", max_batch=64, max_wait_ms=0, embed=None,
                          stats=BatchStats())
    queue.put([job(n) for n in range(64)])
    assert len(device._next_batch() or []) == 64  # nothing measured yet: whole passes
    costs(device, prep_s=0.012e-3, pass_s=0.9e-3)
    queue.put([job(n) for n in range(64)])
    assert len(device._next_batch() or []) == 64
    # The costs are smoothed: one odd measure does not flip the choice.
    device.note_preparation(0.2e-3, 1)  # a slow intake, 17x the usual
    assert not worth_pipelining(device.prep_s_per_text, device.pass_s_per_text)


def test_full_passes_take_up_to_max_batch_every_time() -> None:
    queue = JobQueue()
    device = DeviceThread(queue, "v1", max_batch=64, max_wait_ms=0, embed=None,
                          stats=BatchStats(), pipelined=False)  # --passes full
    queue.put([job(n) for n in range(100)])
    assert numbers(device._next_batch()) == list(range(64))
    assert numbers(device._next_batch()) == list(range(64, 100))


def test_the_echo_model_answers_each_op_in_its_own_shape() -> None:
    """Transport only, but a client reads the answer as it reads a real one."""
    embed = Job(b"1", protocol.OP_EMBED, ["a", "b", "c"], 3)
    pairs = Job(b"2", protocol.OP_SIMILARITY, ["a", "b", "c", "d"], 2)
    assert echo_answer(embed, "v1") == {"embeddings": [[], [], []], "dim": 0, "version": "v1",
                                        "tokens": [0, 0, 0]}
    assert echo_answer(pairs, "v1") == {"scores": [0.0, 0.0], "version": "v1"}
    decoded = decode_reply(protocol.OP_EMBED, [protocol.PROTOCOL, b"id", protocol.STATUS_OK,
                                               orjson.dumps(echo_answer(embed, "v1"))])
    assert isinstance(decoded, Embeddings) and decoded.dim == 0
    assert len(decoded.embeddings) == 3
