"""Health checks of a freshly loaded version, judged in the supervisor (no torch here).

The probe is a real similarity request sent through the backend socket to each new worker:
golden pairs, every golden text against itself, and any pairs the registry has expected
scores for. A worker takes traffic only if every score is finite in [-1, 1], texts score
~1 with themselves, and expected scores match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

GOLDEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("今天天气真好", "今日阳光明媚"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌"),
    ("The weather is lovely today", "It is sunny and warm outside"),
)
SELF_SIMILARITY_MIN = 0.99
TOLERANCE_FP32 = 1e-3
TOLERANCE_HALF = 0.02  # fp16 / bf16 weights move scores by up to ~1e-2


@dataclass(frozen=True)
class Expectation:
    """Scores a version must reproduce (from `pool versions add --expect golden.json`)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tolerance: float | None = None

    @classmethod
    def from_dict(cls, doc: dict | None) -> Expectation:
        if not doc:
            return cls()
        pairs = [(str(a), str(b)) for a, b in doc["pairs"]]
        scores = [float(x) for x in doc["scores"]]
        if len(pairs) != len(scores):
            raise ValueError(f"expect: {len(pairs)} pairs but {len(scores)} scores")
        return cls(pairs, scores, doc.get("tolerance"))

    def to_dict(self) -> dict:
        return {"pairs": [list(x) for x in self.pairs], "scores": self.scores,
                "tolerance": self.tolerance}


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
    if status != b"ok":
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
