"""Fixtures only: the tiny models, their reference computations, and real pools. What the
tests import as a library (start_pool, Reference, run_cli, ...) is tests/support.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support import Reference, RunningPool, make_tiny_bert, start_pool, stop_pool

# Speed is measured in benchmarks, never asserted: with the suite's processes sharing two
# cores, a correct example can take longer than hypothesis's 200 ms default deadline.
settings.register_profile("zeropool", deadline=None)
settings.load_profile("zeropool")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"v1": make_tiny_bert(root / "v1", seed=1), "v2": make_tiny_bert(root / "v2", seed=2)}


@pytest.fixture(scope="session")
def reference(models: dict[str, Path]) -> dict[str, Reference]:
    return {name: Reference(path) for name, path in models.items()}


@pytest.fixture
def pool_factory() -> Iterator[Callable[..., RunningPool]]:
    started: list[RunningPool] = []

    def factory(*args: object, **kwargs: object) -> RunningPool:
        pool = start_pool(*args, **kwargs)  # type: ignore[arg-type]
        started.append(pool)
        return pool

    yield factory
    for pool in started:
        if pool.process.proc.poll() is None:
            stop_pool(pool)


@pytest.fixture(scope="module")
def pool(models: dict[str, Path]) -> Iterator[RunningPool]:
    """One shared 2-worker pool serving the tiny v1 model."""
    running = start_pool(models["v1"])
    yield running
    assert stop_pool(running) == 0
