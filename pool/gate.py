"""The quality gate of a rotation: a labelled set scored through the new version's workers
before it takes traffic (issue #16).

A version may carry an evaluation set (`pool versions add --eval FILE`, `pool rotate --eval
FILE`), or the pool one for every rotation (`pool serve --eval FILE`). The rotation's health
check then also scores it through one new worker and, where one serves, one worker of the
active version, and rolls the rotation back when the new version's Spearman against the
labels is below `--min-spearman`, or more than `--max-spearman-drop` below the active
version's on the same pairs. Both figures go into the rotation's record and history.

Pure computation and records: the rotation state machine (pool.rotation) sends the probes
and hands the answers here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from pool.builtin import BUILTIN_PREFIX
from pool.quality import (
    DEFAULT_PAIRS_RESOURCE,
    LabelledPair,
    PairsFileError,
    load_packaged_pairs,
    passes_spearman_gate,
    read_pairs,
    spearman,
)
from router.bodies import DEFAULT_MAX_PAIRS

DEFAULT_MIN_SPEARMAN = 0.5
DEFAULT_MAX_SPEARMAN_DROP = 0.05
# A serving version scores the set a few pairs at a time, one request answered before the
# next goes: each of its worker's passes then carries at most this much of the set besides
# its traffic. The whole set in one request stalled every request queued behind it for one
# long pass (219 pairs through MiniLM on 2 busy cores: 1.2-1.4 s; docs/benchmarks.md).
ACTIVE_CHUNK_PAIRS = 16
# Sets shipped with zeropool, by name (an --eval FILE may name one instead of a path).
PACKAGED_SETS = {f"{BUILTIN_PREFIX}zh-pairs": DEFAULT_PAIRS_RESOURCE}  # named as models are
FIGURE_DIGITS = 4
# Scores are ranked at this many decimals: two passes of one model differ by float noise
# (~1e-7, with the pass's width and kernels), and noise must not make or break the ties that
# identical texts (scores of 1.0) form, which move a Spearman by ~2e-3 on a small set.
RANK_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class QualityGate:
    """What a rotation's new version must score on a labelled set to take traffic."""

    source: str  # the file, or a packaged set's name
    pairs: tuple[LabelledPair, ...]
    min_spearman: float = DEFAULT_MIN_SPEARMAN
    max_drop: float = DEFAULT_MAX_SPEARMAN_DROP
    max_request_pairs: int = DEFAULT_MAX_PAIRS  # the pool's --max-pairs: no probe is larger

    def probes(self, chunk_pairs: int) -> list[tuple[int, bytes]]:
        """The set as similarity requests of at most `chunk_pairs` pairs (and of at most
        max_request_pairs), in order: (pairs, body) each."""
        size = max(1, min(chunk_pairs, self.max_request_pairs))
        return [(len(part), orjson.dumps({"pairs": [[p.text_a, p.text_b] for p in part]}))
                for part in (self.pairs[at:at + size] for at in range(0, len(self.pairs), size))]

    @property
    def digest(self) -> str:
        """What the set holds (labels and texts), in 16 hex digits: a file edited since is
        another set."""
        text = "\n".join(f"{p.label}\t{p.text_a}\t{p.text_b}" for p in self.pairs)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def judge(self, new_scores: list[float], active_scores: list[float] | None,
              active_spearman: float | None = None) -> GateResult:
        """Pass or fail, with the figures: the new version's Spearman, and the active
        version's on the same pairs, from its scores where it answered, else as known from
        an earlier gate (`active_spearman`)."""
        labels = [p.label for p in self.pairs]
        new = spearman(np.round(new_scores, RANK_DECIMALS), labels)
        active = active_spearman if active_scores is None else \
            spearman(np.round(active_scores, RANK_DECIMALS), labels)
        reason = None
        if not passes_spearman_gate(new, self.min_spearman):
            reason = (f"quality gate: Spearman {_shown(new)} on {self.source} "
                      f"({len(labels)} pairs) is below the floor {self.min_spearman:g}")
        elif active is not None and not math.isnan(active) \
                and new < active - self.max_drop:
            reason = (f"quality gate: Spearman {_shown(new)} on {self.source} is more than "
                      f"{self.max_drop:g} below the active version's {_shown(active)}")
        return GateResult(self.source, len(labels), _rounded(new), _rounded(active),
                          self.min_spearman, self.max_drop, reason,
                          active_remembered=active_scores is None and active is not None)

    def unscored(self, why: str) -> GateResult:
        """A failed gate whose set the new version did not score."""
        return GateResult(self.source, len(self.pairs), None, None, self.min_spearman,
                          self.max_drop, f"quality gate: {why}")


@dataclass(frozen=True, slots=True)
class GateResult:
    source: str
    pairs: int
    spearman: float | None  # None: undefined (constant scores)
    active_spearman: float | None  # None: no active version answered
    min_spearman: float
    max_drop: float
    reason: str | None  # why it failed; None: passed
    active_remembered: bool = False  # active_spearman is from its own gate, not scored now

    @property
    def passed(self) -> bool:
        return self.reason is None

    @property
    def active_from(self) -> str | None:
        if self.active_spearman is None:
            return None
        return "history" if self.active_remembered else "scored"

    def as_dict(self) -> dict[str, Any]:
        return {"eval": self.source, "pairs": self.pairs, "spearman": self.spearman,
                "active_spearman": self.active_spearman, "active_from": self.active_from,
                "min_spearman": self.min_spearman,
                "max_spearman_drop": self.max_drop, "passed": self.passed,
                "reason": self.reason}


@dataclass(slots=True)
class GateRun:
    """One version's scoring of the set: its probes, sent to one worker one at a time (the
    next when the last is answered), the scores so far, or why it stopped."""

    worker: bytes
    probes: list[tuple[int, bytes]]  # (pairs, body), in the set's order
    progressed_at: float  # the clock when it last sent a probe: what "overdue" counts from
    scores: list[float] = field(default_factory=list)
    answered: int = 0  # probes answered
    failure: str | None = None

    @property
    def done(self) -> bool:
        return self.failure is not None or self.answered == len(self.probes)

    def next_probe(self) -> bytes:
        return self.probes[self.answered][1]

    def take_answer(self, status: bytes, body: bytes) -> None:
        """The answer to the probe in flight: its scores, or the run stops with why."""
        try:
            self.scores += scores_of(status, body, self.probes[self.answered][0])
        except ValueError as exc:
            self.failure = str(exc)
            return
        self.answered += 1


def read_eval_set(spec: str) -> tuple[LabelledPair, ...]:
    """A labelled TSV file, or a packaged set by name; PairsFileError (a ValueError, with
    the line number) if it does not parse."""
    if spec in PACKAGED_SETS:
        return tuple(load_packaged_pairs(PACKAGED_SETS[spec]))
    if spec.startswith(BUILTIN_PREFIX):
        raise PairsFileError(f"unknown built-in evaluation set {spec!r}; known: "
                             f"{', '.join(PACKAGED_SETS)}")
    return tuple(read_pairs(spec))


def scores_of(status: bytes, body: bytes, pairs: int) -> list[float]:
    """The scores of a similarity reply to the gate's probe; ValueError saying why not."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"a reply that is not a JSON object: {body[:80]!r}")
    if status != b"ok":
        raise ValueError(f"{doc.get('code', 'error')}: {doc.get('message', '')}")
    scores = doc.get("scores")
    if not isinstance(scores, list) or len(scores) != pairs:
        raise ValueError(f"expected {pairs} scores, got {type(scores).__name__}")
    # orjson writes a NaN as null: a model that answers NaN for a pair fails its gate.
    if not all(isinstance(score, (int, float)) and math.isfinite(score) for score in scores):
        raise ValueError("a score that is not a finite number (NaN or infinite from the "
                         "model)")
    return [float(score) for score in scores]


def _rounded(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, FIGURE_DIGITS)


def _shown(value: float) -> str:
    return "undefined (constant scores)" if math.isnan(value) else f"{value:.3f}"
