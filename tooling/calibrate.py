"""`pool calibrate`'s engine: a labelled pairs file scored through a live pool, pinned to one
version, and what pool.quality makes of the scores.

The pairs go in requests of `batch_pairs` (a few dozen: one request is one worker's share,
and a long set spreads over the workers, IN_FLIGHT requests at a time). The version's
current thresholds are the ones its workers answered with (the reply's "thresholds"), so
the accuracy reported is that of the verdicts producers see now. No printing here: the CLI
prints, and a `progress` callback hears how many pairs are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pool.quality import LabelledPair, QualityReport, Thresholds, evaluate
from pool.thresholds import thresholds_to_json
from router.client import Client, NoReply, Similarity, UnknownVersion, ZeroPoolError

DEFAULT_BATCH_PAIRS = 32
IN_FLIGHT = 4  # requests outstanding at once: enough to keep a few workers busy
PING_TIMEOUT_S = 5.0  # is the pool there and the version serving, before sending the set


class CalibrationError(ZeroPoolError):
    """The pool answered, but not as calibration needs (another version, a short reply)."""

    code = "calibration"


@dataclass(frozen=True, slots=True)
class Calibration:
    version: str
    pairs_file: str
    report: QualityReport  # its `thresholds`: what the version's workers answered with


def check_serving(client: Client, version: str) -> None:
    """Fail fast: NoReply when no pool answers, UnknownVersion when `version` is not served."""
    try:
        client.ping(version=version, timeout=PING_TIMEOUT_S)
    except NoReply:
        raise NoReply(f"no pool answered at {client.endpoint} within {PING_TIMEOUT_S:g}s: "
                      "is `pool serve` running there?") from None
    except UnknownVersion as exc:
        raise UnknownVersion(f"{exc.message}: calibrate a version the pool serves "
                             "(`pool status`), or `pool load` it first") from None


def batches_of(pairs: Sequence[LabelledPair], size: int) -> list[list[tuple[str, str]]]:
    return [[(p.text_a, p.text_b) for p in pairs[start:start + size]]
            for start in range(0, len(pairs), size)]


def score_pairs(client: Client, pairs: Sequence[LabelledPair], version: str,
                batch_pairs: int = DEFAULT_BATCH_PAIRS,
                progress: Callable[[int], None] = lambda done: None,
                ) -> tuple[list[float], Thresholds]:
    """Every pair's score from `version`, and the thresholds its workers answered with.
    Raises the first request's error (a ZeroPoolError) if any failed."""
    scores: list[float] = []
    answered: Thresholds | None = None
    batches = batches_of(pairs, batch_pairs)
    for start in range(0, len(batches), IN_FLIGHT):
        group = batches[start:start + IN_FLIGHT]
        for sent, result in zip(group, client.similarity_many(group, version=version,
                                                              in_flight=IN_FLIGHT), strict=True):
            checked = checked_result(result, sent, version)
            scores.extend(checked.scores)
            answered = answered or Thresholds(high=checked.thresholds.high,
                                              low=checked.thresholds.low)
        progress(len(scores))
    assert answered is not None  # parse_pairs never gives an empty set
    return scores, answered


def checked_result(result: Similarity | ZeroPoolError, sent: list[tuple[str, str]],
                   version: str) -> Similarity:
    if isinstance(result, ZeroPoolError):
        raise result
    if result.version != version:
        raise CalibrationError(f"asked {version}, answered by {result.version}")
    if len(result.scores) != len(sent):
        raise CalibrationError(f"{len(result.scores)} scores for {len(sent)} pairs")
    return result


def calibrate(client: Client, version: str, pairs: Sequence[LabelledPair], pairs_file: str,
              batch_pairs: int = DEFAULT_BATCH_PAIRS,
              progress: Callable[[int], None] = lambda done: None) -> Calibration:
    check_serving(client, version)
    scores, answered = score_pairs(client, pairs, version, batch_pairs, progress)
    report = evaluate(scores, [p.label for p in pairs], answered)
    return Calibration(version, pairs_file, report)


def calibration_document(cal: Calibration) -> dict[str, Any]:
    """The JSON `pool calibrate --json` prints (thresholds as [high, low], as everywhere)."""
    r = cal.report
    return {"version": cal.version, "pairs_file": cal.pairs_file, "pairs": r.n,
            "label_counts": {str(label): n for label, n in r.label_counts.items()},
            "spearman": r.spearman, "auc": r.auc,
            "thresholds": thresholds_to_json(r.thresholds), "accuracy": r.accuracy,
            "fitted_thresholds": thresholds_to_json(r.fitted_thresholds),
            "fitted_accuracy": r.fitted_accuracy}
