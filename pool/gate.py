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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from pool.quality import (
    DEFAULT_PAIRS_RESOURCE,
    LabelledPair,
    load_packaged_pairs,
    passes_spearman_gate,
    read_pairs,
    spearman,
)

DEFAULT_MIN_SPEARMAN = 0.5
DEFAULT_MAX_SPEARMAN_DROP = 0.05
# Sets shipped with zeropool, by name (an --eval FILE may name one instead of a path).
PACKAGED_SETS = {"builtin:zh-pairs": DEFAULT_PAIRS_RESOURCE}
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

    def probe_body(self) -> bytes:
        """The similarity request that scores the whole set in one pass."""
        return orjson.dumps({"pairs": [[p.text_a, p.text_b] for p in self.pairs]})

    def judge(self, new_scores: list[float], active_scores: list[float] | None,
              ) -> GateResult:
        """Pass or fail, with the figures: the new version's Spearman, and the active
        version's on the same pairs where it answered."""
        labels = [p.label for p in self.pairs]
        new = spearman(np.round(new_scores, RANK_DECIMALS), labels)
        active = None if active_scores is None else \
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
                          self.min_spearman, self.max_drop, reason)

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

    @property
    def passed(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {"eval": self.source, "pairs": self.pairs, "spearman": self.spearman,
                "active_spearman": self.active_spearman, "min_spearman": self.min_spearman,
                "max_spearman_drop": self.max_drop, "passed": self.passed,
                "reason": self.reason}


def read_eval_set(spec: str) -> tuple[LabelledPair, ...]:
    """A labelled TSV file, or a packaged set by name; PairsFileError (a ValueError, with
    the line number) if it does not parse."""
    if spec in PACKAGED_SETS:
        return tuple(load_packaged_pairs(PACKAGED_SETS[spec]))
    return tuple(read_pairs(spec))


def scores_of(status: bytes, body: bytes, pairs: int) -> list[float]:
    """The scores of a similarity reply to the gate's probe; ValueError saying why not."""
    doc = orjson.loads(body)
    if status != b"ok":
        raise ValueError(f"{doc.get('code', 'error')}: {doc.get('message', '')}")
    scores = doc.get("scores")
    if not isinstance(scores, list) or len(scores) != pairs:
        raise ValueError(f"expected {pairs} scores, got {type(scores).__name__}")
    return [float(score) for score in scores]


def _rounded(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, FIGURE_DIGITS)


def _shown(value: float) -> str:
    return "undefined (constant scores)" if math.isnan(value) else f"{value:.3f}"
