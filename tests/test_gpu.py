"""The CUDA fp16 path: real workers on a real GPU. Skipped where torch sees no GPU (CI).

Run on a GPU machine with `pytest tests/test_gpu.py` (benchmarks/gpu_check.sh does, with the
GPU benchmarks).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import psutil
import pytest
import torch

from pool.runtime import Encoder
from pool.system import gpu_stats
from router.client import Client
from tests.support import (
    SENTENCES,
    Load,
    Reference,
    RunningPool,
    run_cli,
    thread_niceness,
    wait_for,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FP16_TOLERANCE = 0.02  # the health gate's own tolerance for fp16 scores (docs/design.md)


def gpu_memory_used() -> int:
    gpus, error = gpu_stats()
    assert gpus, error
    return gpus[0]["memory_used_bytes"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_cuda_workers_serve_fp16_scores_close_to_the_fp32_seed(
    pool_factory, models: dict[str, Path], reference: dict[str, Reference], start_method: str
) -> None:
    pool = pool_factory(models["v1"], "--device", "cuda", "--start-method", start_method)
    status = pool.status()
    assert status["settings"]["start_method"] == start_method
    assert all(w["device"].startswith("cuda") for w in status["workers"]), status["workers"]
    assert all(w["gpu_memory_bytes"] > 0 for w in status["workers"]), status["workers"]
    pairs = list(itertools.combinations(SENTENCES, 2))
    with Client(pool.endpoint, timeout=30) as client:
        scores = client.similarity(pairs).scores
        vectors = client.embed(SENTENCES).embeddings
    for (a, b), score in zip(pairs, scores, strict=True):
        assert abs(score - reference["v1"].similarity(a, b)) < FP16_TOLERANCE, (a, b)
    for text, vector in zip(SENTENCES, vectors, strict=True):
        want = reference["v1"].embed([text])[0]
        assert torch.allclose(torch.tensor(vector), want, atol=FP16_TOLERANCE), text
    # The CUDA driver's threads were made before the niced load, so none inherited it.
    for pid in pool.worker_pids():
        niceness = thread_niceness(pid)
        assert set(niceness.values()) == {0}, niceness


def test_rotation_on_the_gpu_loses_nothing_and_gives_the_memory_back(
    pool_factory, models: dict[str, Path]
) -> None:
    pool: RunningPool = pool_factory(models["v1"], "--device", "cuda")
    before = gpu_memory_used()
    old_pids = pool.worker_pids()
    load = Load(pool.endpoint, in_flight=64).start()
    time.sleep(1.0)
    done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--json",
                   env=pool.env)
    time.sleep(1.0)
    load.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["rotation"]["outcome"] == "done"
    assert load.errors() == [] and load.lost == 0 and len(load.replies) > 200
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in old_pids), 30,
             "the old workers were not reaped")
    # The old version's memory went with its processes: back within 10% (plus the CUDA
    # context's rounding) of what the pool held before.
    wait_for(lambda: gpu_memory_used() <= before * 1.1 + 64 * 2**20, 30,
             f"GPU memory {gpu_memory_used()} did not come back to about {before}")


def test_unloading_a_version_frees_its_gpu_memory(pool_factory, models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"], "--device", "cuda")
    before = gpu_memory_used()
    assert run_cli("versions", "add", "v2", "--path", str(models["v2"]),
                   env=pool.env).returncode == 0
    assert run_cli("load", "v2", env=pool.env).returncode == 0
    wait_for(lambda: any(w["version"] == "v2" and w["state"] == "ready"
                         for w in pool.status()["workers"]), 120, "v2 did not load")
    assert gpu_memory_used() > before
    assert run_cli("unload", "v2", env=pool.env).returncode == 0
    wait_for(lambda: all(w["version"] == "v1" for w in pool.status()["workers"]), 60,
             "v2 workers did not exit")
    wait_for(lambda: gpu_memory_used() <= before * 1.1 + 64 * 2**20, 30,
             f"GPU memory {gpu_memory_used()} did not come back to about {before}")


def test_a_cuda_encoder_serves_new_shapes_without_cudnn_attention_plans(
    models: dict[str, Path], reference: dict[str, Reference]
) -> None:
    encoder = Encoder(str(models["v1"]), device="cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    # Shapes of every row count and length still score as the fp32 seed does.
    for rows in (1, 3, 8, 17):
        texts = [SENTENCES[(i + rows) % len(SENTENCES)] * (1 + i % 3) for i in range(rows)]
        vectors = encoder.embed(texts).float().cpu()
        want = reference["v1"].embed(texts)
        assert torch.allclose(vectors, want, atol=FP16_TOLERANCE), rows


def test_cuda_graphs_compute_what_the_eager_model_does_at_every_bucket_and_beyond(
    models: dict[str, Path]
) -> None:
    graphs = Encoder(str(models["v1"]), device="cuda")
    eager = Encoder(str(models["v1"]), device="cuda", graph="eager")
    assert graphs.graph == "cudagraphs", graphs.graph_note
    assert eager.graph == "eager"
    at_load = len(graphs._graphs)  # the load check's bucket only
    # Row counts on and between buckets, long and short texts, duplicates: the same
    # embeddings as eager passes, in order; buckets not yet captured are captured on use,
    # then the warm-up captures the rest of the common ones.
    for rows in (1, 2, 3, 17, 64, 65, 300, 1, 300):
        texts = [SENTENCES[(i * 7 + rows) % len(SENTENCES)] * (1 + (i + rows) % 9)
                 for i in range(rows)]
        got, want = graphs.embed(texts), eager.embed(texts)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=FP16_TOLERANCE), rows
        if rows == 300:
            assert len(graphs._graphs) > at_load
    graphs.warm_up()
    assert len(graphs._graphs) >= len(graphs._graphs.rows)


def test_a_pool_on_cuda_runs_cuda_graphs_and_says_so(
    pool_factory, models: dict[str, Path], reference: dict[str, Reference]
) -> None:
    pool = pool_factory(models["v1"], "--device", "cuda")
    assert {w["graph"] for w in pool.status()["workers"]} == {"cudagraphs"}
    pairs = list(itertools.combinations(SENTENCES, 2))
    with Client(pool.endpoint, timeout=30) as client:
        scores = client.similarity(pairs).scores
    for (a, b), score in zip(pairs, scores, strict=True):
        assert abs(score - reference["v1"].similarity(a, b)) < FP16_TOLERANCE, (a, b)
