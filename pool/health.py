"""Health checks of a freshly loaded version, judged in the supervisor (no torch here).

The probe is a real similarity request sent through the backend socket to each new worker:
golden pairs, every golden text against itself, and any pairs the registry has expected
scores for. A worker takes traffic only if every score is finite in [-1, 1], texts score
~1 with themselves, and expected scores match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.protocol import STATUS_OK

GOLDEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("今天天气真好", "今日阳光明媚"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌"),
    ("The weather is lovely today", "It is sunny and warm outside"),
)
# The probe is a request like any other, so the pool's size limits must admit it.
PROBE_MIN_PAIRS = 3 * len(GOLDEN_PAIRS)  # golden pairs + each golden text against itself
PROBE_MIN_TEXT_CHARS = max(len(t) for pair in GOLDEN_PAIRS for t in pair)
SELF_SIMILARITY_MIN = 0.99
TOLERANCE_FP32 = 1e-3
TOLERANCE_HALF = 0.02  # fp16 / bf16 weights move scores by up to ~1e-2


def json_kind(value: Any) -> str:
    """A JSON value's type as JSON names it."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def expect_problem(doc: Any) -> str | None:
    """What is wrong with a golden document's shape; None when nothing is."""
    if not isinstance(doc, dict):
        return f"a JSON {json_kind(doc)}, not an object"
    pairs, scores = doc.get("pairs"), doc.get("scores")
    if not isinstance(pairs, list):
        return '"pairs" is not a list'
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(text, str) for text in pair)):
            return f'"pairs"[{i}] is not [text_a, text_b]'
    if not isinstance(scores, list):
        return '"scores" is not a list'
    for i, score in enumerate(scores):
        if not is_number(score):
            return f'"scores"[{i}] is not a number'
    if len(pairs) != len(scores):
        return f"{len(pairs)} pairs but {len(scores)} scores"
    if doc.get("tolerance") is not None and not is_number(doc["tolerance"]):
        return '"tolerance" is not a number'
    return None


EXPECT_SHAPE = '{"pairs": [[text_a, text_b], ...], "scores": [number, ...], "tolerance": number}'


@dataclass(frozen=True)
class Expectation:
    """Scores a version must reproduce (from `pool versions add --expect golden.json`)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tolerance: float | None = None

    @classmethod
    def from_dict(cls, doc: Any) -> Expectation:
        """The registry's / an --expect file's document; ValueError saying what is wrong."""
        if doc is None or doc == {}:
            return cls()
        problem = expect_problem(doc)
        if problem is not None:
            raise ValueError(f"expect: {problem}; expected {EXPECT_SHAPE}")
        return cls([(a, b) for a, b in doc["pairs"]], [float(x) for x in doc["scores"]],
                   doc.get("tolerance"))


@dataclass(frozen=True, slots=True)
class GoldenCheck:
    """The result of one golden probe of a version (at load, then every minute)."""

    ok: bool
    reason: str | None
    worker: str
    at: float  # wall clock

    def as_dict(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "worker": self.worker, "at": self.at}


def probe_pairs(expect: Expectation) -> list[tuple[str, str]]:
    texts = [t for pair in GOLDEN_PAIRS for t in pair]
    return [*GOLDEN_PAIRS, *((t, t) for t in texts), *expect.pairs]


def probe_body(expect: Expectation) -> bytes:
    return orjson.dumps({"pairs": [list(x) for x in probe_pairs(expect)]})


def judge_probe(status: bytes, body: bytes, expect: Expectation, dtype: str) -> str | None:
    """Why the probe's reply disqualifies the worker, or None if it passes."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "probe reply is not JSON"
    if status != STATUS_OK:
        return f"probe failed: {doc.get('code')}: {doc.get('message')}"
    scores = doc.get("scores", [])
    if len(scores) != len(probe_pairs(expect)):
        return f"probe returned {len(scores)} scores for {len(probe_pairs(expect))} pairs"
    for x in scores:
        if not (isinstance(x, float | int) and math.isfinite(x) and -1.0001 <= x <= 1.0001):
            return f"score {x} is not a finite number in [-1, 1]"
    n_golden, n_self = len(GOLDEN_PAIRS), 2 * len(GOLDEN_PAIRS)
    for x in scores[n_golden : n_golden + n_self]:
        if x < SELF_SIMILARITY_MIN:
            return f"a text scores {x:.4f} against itself (expected >= {SELF_SIMILARITY_MIN})"
    half = dtype in ("float16", "bfloat16")
    tolerance = expect.tolerance or (TOLERANCE_HALF if half else TOLERANCE_FP32)
    for (a, b), got, want in zip(expect.pairs, scores[n_golden + n_self :], expect.scores,
                                 strict=True):
        if abs(got - want) > tolerance:
            return (f"golden score of ({a!r}, {b!r}) is {got:.4f}, expected {want:.4f} "
                    f"± {tolerance}")
    return None


# -- the health report (`pool health`) ----------------------------------------------------

HEALTHY, DEGRADED, FAILED = "healthy", "degraded", "failed"
SEVERITY = {HEALTHY: 0, DEGRADED: 1, FAILED: 2}  # also `pool health`'s exit status
ERROR_RATE_DEGRADED = 0.05  # share of pool-fault replies over the recent window
ERROR_RATE_MIN_REPLIES = 20  # fewer replies than this say nothing about a rate
HEARTBEAT_STALE_S = 5.0  # a ready worker silent this long is suspect (killed at 30 s)


@dataclass
class VersionFacts:
    """What the supervisor and router know about one version, as health reads it."""

    version: str
    workers_wanted: int
    workers: list[dict]  # supervisor.worker_rows() of this version
    failed: str | None
    crash_loop: str | None  # kept apart from `failed` while some worker still serves
    ever_ready: bool
    recent_crashes: int
    replies_by_code: dict[str, int]  # over the recent window
    golden: dict | None
    pool_faults: frozenset[str]


def assess_version(f: VersionFacts) -> dict:
    """healthy / degraded / failed with the reasons, for one version."""
    failed: list[str] = []
    degraded: list[str] = []
    ready = [w for w in f.workers if w["state"] == "ready"]
    if f.failed:
        failed.append(f.failed)
    elif f.workers_wanted and not ready:
        (failed if f.ever_ready else degraded).append(
            "no worker is ready" if f.ever_ready else "loading")
    elif len(ready) < f.workers_wanted:
        degraded.append(f"{len(ready)} of {f.workers_wanted} workers ready")
    if f.crash_loop and not f.failed:
        degraded.append(f.crash_loop)
    for w in ready:
        silent = w.get("last_heartbeat_s")
        if silent is not None and silent > HEARTBEAT_STALE_S:
            degraded.append(f"worker {w['id']} silent for {silent:.0f}s")
    if f.recent_crashes:
        degraded.append(f"{f.recent_crashes} worker crash(es) in the last minute")
    total = sum(f.replies_by_code.values())
    faults = {k: n for k, n in f.replies_by_code.items() if k in f.pool_faults}
    rate = sum(faults.values()) / total if total else 0.0
    if total >= ERROR_RATE_MIN_REPLIES and rate > ERROR_RATE_DEGRADED:
        detail = ", ".join(f"{k} {n}" for k, n in sorted(faults.items()))
        degraded.append(f"error rate {rate:.0%} in the last minute ({detail})")
    if f.golden is not None and not f.golden["ok"]:
        failed.append(f"golden check failed on {f.golden['worker']}: {f.golden['reason']}")
    status = FAILED if failed else DEGRADED if degraded else HEALTHY
    return {"status": status, "reasons": failed + degraded,
            "loading": not failed and degraded == ["loading"],
            "workers_ready": len(ready), "workers_wanted": f.workers_wanted,
            "replies_last_minute": total, "error_rate": round(rate, 4), "golden": f.golden}


def assess_pool(versions: dict[str, dict], active: str | None, stopping: bool) -> dict:
    """The pool's health: the active version's, and at most degraded for the others."""
    reasons: list[str] = []
    worst = HEALTHY
    if stopping:
        worst = DEGRADED
        reasons.append("the pool is stopping")
    if active is None or active not in versions:
        return {"status": FAILED, "reasons": [*reasons, "no version is active"]}
    for name, report in versions.items():
        status = report["status"]
        if name != active and report.get("loading"):
            continue  # a rotation's or `pool load`'s new version on its way: nothing wrong
        if name != active and status == FAILED:
            status = DEGRADED  # pinned traffic to it fails; unpinned traffic is served
        if name == active and status == HEALTHY and not report["workers_ready"]:
            # It wants none now (a rolling rotation of one worker retired it first): its
            # requests only queue until the new version serves.
            status = DEGRADED
            report = {**report, "reasons": ["no worker is ready"]}
        if status != HEALTHY:
            reasons += [f"{name}: {r}" for r in report["reasons"]]
        if SEVERITY[status] > SEVERITY[worst]:
            worst = status
    return {"status": worst, "reasons": reasons}
