"""`pool demo`'s engine: a private pool serving English MiniLM as v1, sample pairs scored,
load with a rotation to the multilingual model as v2, the same pairs scored again by v2, a
clean stop. Nothing here prints: cli/demo.py shows each step as it comes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pool import config
from router.client import Client
from tooling.bench import run_failures
from tooling.launch import PrivatePool
from tooling.loadgen import LoadSpec

# The story: the seed's Chinese job served by an English model, then the multilingual one
# rotated in under load without a failed request.
FIRST_MODEL = config.ENGLISH_MODEL
SECOND_MODEL = config.DEFAULT_MODEL
# Chinese pairs, two of each kind, with the verdict a reader expects (the seed's job).
SAMPLE_PAIRS = [
    ("今天天气真好", "今日阳光明媚", "very similar"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票", "very similar"),
    ("今天天气真好", "明天可能会下雨", "related"),
    ("这家餐厅的菜很好吃", "这家餐厅周末要排队很久", "related"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌", "unrelated"),
    ("我的手机屏幕摔碎了", "今天天气真好", "unrelated"),
]
DEMO_SECONDS = 40.0
ROTATE_AT_S = 8.0
DEMO_IN_FLIGHT = 64
ROTATE_TO = "v2"
DEMO_EVAL = "builtin:zh-pairs"


@dataclass(frozen=True)
class Scored:
    """The sample pairs as one version scored them."""

    version: str
    rows: list[dict[str, Any]]  # {"a", "b", "expected", "score", "verdict"} per pair


def score_samples(client: Client) -> Scored:
    result = client.similarity([(a, b) for a, b, _ in SAMPLE_PAIRS])
    rows = [{"a": a, "b": b, "expected": expected, "score": score, "verdict": said}
            for (a, b, expected), score, said in zip(SAMPLE_PAIRS, result.scores,
                                                     result.verdicts, strict=True)]
    return Scored(result.version, rows)


def failures(bench: dict[str, Any]) -> int:
    """Requests of a bench report that got an error or no reply: the demo promises none."""
    return sum(bench["errors"].values()) + bench["lost"]


@dataclass
class Demo:
    """The demo's pool and its steps, in order: start, score, (the bench), close."""

    workers: int
    path: str  # v1's model directory
    pool: PrivatePool = field(init=False)

    def __post_init__(self) -> None:
        # The rotation passes the quality gate on the packaged Chinese set first. The load
        # is a closed loop, which leaves no CPU over: a new version loading at the default
        # nice +10 would wait on it for most of a minute, so it loads at the serving
        # priority (3 s of CPU for the multilingual model).
        self.pool = PrivatePool(self.workers, self.path,
                                extra=("--eval", DEMO_EVAL, "--load-niceness", "0"),
                                prefix="zp-demo-")

    @property
    def endpoint(self) -> str:
        return self.pool.endpoint

    def wait_ready(self) -> float:
        """Seconds until every worker answered."""
        started = time.monotonic()
        self.pool.wait_ready()
        return round(time.monotonic() - started, 2)

    def score(self) -> Scored:
        with Client(self.endpoint) as client:
            return score_samples(client)

    def bench_spec(self) -> LoadSpec:
        return LoadSpec(endpoint=self.endpoint, concurrency=DEMO_IN_FLIGHT,
                        duration_s=DEMO_SECONDS)

    def close(self) -> int:
        """Stop the pool; its exit code (0: a clean stop)."""
        return self.pool.close()


def exit_code(report: dict[str, Any]) -> int:
    """0 when the pool stopped cleanly, no request failed and the rotation to v2 was done."""
    clean = report["exit_code"] == 0 and failures(report["bench"]) == 0
    return 0 if clean and not run_failures(report["bench"], rotation_asked=True) else 1
