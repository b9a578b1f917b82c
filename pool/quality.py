"""How good a model's similarity scores are on a labelled set of sentence pairs.

The pure computation behind `pool calibrate` and a rotation's quality gate: reading a labelled
pairs file, rank correlation (Spearman), ranking quality (AUC), the seed's three verdicts and
how often they agree with the labels, and the thresholds that would agree best. Python and
numpy only: no torch, no sockets; the scores come from wherever the caller got them.

Labels (pool/data/zh_pairs.tsv, docs/quality-data.md):
  2  same meaning         -> "very similar"
  1  same topic, not same -> "related"
  0  unrelated            -> "unrelated"

A broken model still gets a report: Spearman is NaN when its scores (or the labels) are all
equal, and the report writes it as null. A gate must therefore test `passes_spearman_gate`,
not `value < minimum` (NaN compares False with everything). A set without a class AUC needs
is a data fault: `auc` raises, the report says null. Scores must be finite numbers: a NaN
score is a model fault and raises ValueError.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router import client

UNRELATED = 0
RELATED = 1
SAME_MEANING = 2
LABELS = (UNRELATED, RELATED, SAME_MEANING)

# The seed's words (declared with router.client.verdict, which `pool similarity` uses).
VERDICT_OF_LABEL = {
    SAME_MEANING: client.VERDICT_VERY_SIMILAR,
    RELATED: client.VERDICT_RELATED,
    UNRELATED: client.VERDICT_UNRELATED,
}

# Scores are cosine similarities; thresholds outside this range could never be crossed.
MIN_SCORE = -1.0
MAX_SCORE = 1.0

FIELDS_PER_LINE = 3  # label, text_a, text_b
COMMENT_PREFIX = "#"
BYTE_ORDER_MARK = "\ufeff"

# The packaged default set, inside the `pool` package so that it ships in the wheel.
DEFAULT_PAIRS_PACKAGE = "pool"
DEFAULT_PAIRS_RESOURCE = "data/zh_pairs.tsv"
# Its diagnostic companion: minimal pairs, reported beside it, never used to fit thresholds.
HARD_PAIRS_RESOURCE = "data/zh_pairs_hard.tsv"

ScoreArray = npt.NDArray[np.float64]


class PairsFileError(ValueError):
    """A labelled pairs file that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class LabelledPair:
    label: int  # one of LABELS
    text_a: str
    text_b: str
    line: int  # 1-based line number in the file it came from, for messages


# ---------------------------------------------------------------------------- reading


def parse_pairs(content: str | bytes, source: str = "<text>") -> list[LabelledPair]:
    """Parse `label<TAB>text_a<TAB>text_b` lines; `source` names the file in error messages.

    Blank lines and lines starting with `#` are skipped; a trailing `\\r` (a file saved on
    Windows) and spaces around the fields are ignored.
    """
    text = decode_utf8(content, source) if isinstance(content, bytes) else content
    # A byte-order mark, as some Windows editors write, is not part of the first label.
    text = text.removeprefix(BYTE_ORDER_MARK)
    pairs: list[LabelledPair] = []
    # Not str.splitlines(): it also splits on characters such as U+2028 and U+001C that may
    # sit inside a text, and the line numbers would then disagree with an editor's.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith(COMMENT_PREFIX):
            continue
        pairs.append(parse_line(line, source, number))
    if not pairs:
        raise PairsFileError(f"{source}: no pairs (only blank lines and # comments)")
    return pairs


def parse_line(line: str, source: str, number: int) -> LabelledPair:
    where = f"{source}: line {number}"
    fields = line.split("\t")
    if len(fields) != FIELDS_PER_LINE:
        raise PairsFileError(
            f"{where}: expected {FIELDS_PER_LINE} tab-separated fields "
            f"(label, text_a, text_b), found {len(fields)}")
    label_field, text_a, text_b = (field.strip() for field in fields)
    if label_field not in {str(label) for label in LABELS}:
        raise PairsFileError(
            f"{where}: label {label_field!r} is not one of 0 (unrelated), 1 (same topic), "
            f"2 (same meaning)")
    for name, text in (("text_a", text_a), ("text_b", text_b)):
        if not text:
            raise PairsFileError(f"{where}: {name} is empty")
    return LabelledPair(label=int(label_field), text_a=text_a, text_b=text_b, line=number)


def decode_utf8(content: bytes, source: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise PairsFileError(
            f"{source}: line {line}: not UTF-8 (byte 0x{content[error.start]:02x}); "
            f"save the file as UTF-8") from None


def read_pairs(path: str | os.PathLike[str]) -> list[LabelledPair]:
    """Read a labelled pairs file (for text already in memory, `parse_pairs`)."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise PairsFileError(f"{os.fspath(path)}: cannot read: {error.strerror}") from None
    return parse_pairs(content, os.fspath(path))


def load_default_pairs() -> list[LabelledPair]:
    """The packaged Chinese set, pool/data/zh_pairs.tsv (docs/quality-data.md)."""
    return load_packaged_pairs(DEFAULT_PAIRS_RESOURCE)


def load_hard_pairs() -> list[LabelledPair]:
    """The packaged Chinese minimal pairs, pool/data/zh_pairs_hard.tsv (docs/quality-data.md).

    A diagnostic of what cosine similarity cannot see (swapped roles, antonyms, negation, one
    changed word), to report beside the default set; not for fitting thresholds or a gate.
    """
    return load_packaged_pairs(HARD_PAIRS_RESOURCE)


def load_packaged_pairs(resource_name: str) -> list[LabelledPair]:
    resource = resources.files(DEFAULT_PAIRS_PACKAGE).joinpath(resource_name)
    return parse_pairs(resource.read_bytes(), f"{DEFAULT_PAIRS_PACKAGE}/{resource_name}")


# ---------------------------------------------------------------------------- figures


def checked_scores(scores: Sequence[float] | ScoreArray, labels: Sequence[int] | npt.NDArray[Any],
                   ) -> tuple[ScoreArray, ScoreArray]:
    """Both as float arrays, after checking they pair up and every score is a number."""
    score_array = np.asarray(scores, dtype=np.float64)
    label_array = np.asarray(labels, dtype=np.float64)
    if score_array.ndim != 1 or label_array.ndim != 1:
        raise ValueError("scores and labels must be flat sequences")
    if len(score_array) != len(label_array):
        raise ValueError(f"{len(score_array)} scores for {len(label_array)} labels")
    if len(score_array) == 0:
        raise ValueError("no scores")
    for name, values in (("score", score_array), ("label", label_array)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{name} {values[bad[0]]} at index {bad[0]} is not a finite number")
    return score_array, label_array


def checked_labels(labels: ScoreArray) -> npt.NDArray[np.int64]:
    unknown = np.flatnonzero(~np.isin(labels, LABELS))
    if len(unknown):
        raise ValueError(f"label {labels[unknown[0]]} at index {unknown[0]} is not 0, 1 or 2")
    return labels.astype(np.int64)


def average_ranks(values: ScoreArray) -> ScoreArray:
    """1-based ranks; equal values share the mean of the ranks they span (labels tie a lot)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group_of = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(values))  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of starts+1 .. ends, 1-based
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group_of]
    return ranks


def spearman(scores: Sequence[float] | ScoreArray, labels: Sequence[float] | npt.NDArray[Any],
             ) -> float:
    """Spearman's rank correlation: Pearson's of the average ranks, in [-1, 1].

    NaN when the scores or the labels are all equal: there is no order to correlate.
    """
    score_array, label_array = checked_scores(scores, labels)
    score_ranks = average_ranks(score_array)
    label_ranks = average_ranks(label_array)
    score_dev = score_ranks - score_ranks.mean()
    label_dev = label_ranks - label_ranks.mean()
    # Equal values get bit-identical ranks, so a constant side has deviations exactly 0.
    spread = math.sqrt(float(score_dev @ score_dev) * float(label_dev @ label_dev))
    if spread == 0.0:
        return math.nan
    return min(1.0, max(-1.0, float(score_dev @ label_dev) / spread))


def passes_spearman_gate(value: float, minimum: float) -> bool:
    """Whether a quality gate lets the model through; an undefined (NaN) Spearman does not."""
    return not math.isnan(value) and value >= minimum


def auc(scores: Sequence[float] | ScoreArray, labels: Sequence[int] | npt.NDArray[Any],
        positive: int = SAME_MEANING, negative: int = UNRELATED) -> float:
    """The probability that a `positive` pair scores above a `negative` one, ties counting half
    (Mann-Whitney U over the number of positive-negative pairs). Other labels are left out.

    Raises ValueError when the set has no positive or no negative pair.
    """
    score_array, label_array = checked_scores(scores, labels)
    positives = score_array[label_array == positive]
    negatives = score_array[label_array == negative]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"AUC needs pairs labelled {positive} and {negative}: "
                         f"found {len(positives)} and {len(negatives)}")
    # With average ranks in the pooled scores, a tie between a positive and a negative adds
    # exactly one half to U: the O(n log n) form of the pairwise count.
    ranks = average_ranks(np.concatenate((positives, negatives)))
    n_pos, n_neg = len(positives), len(negatives)
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


# ---------------------------------------------------------------------------- verdicts


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Cut points on the score: above `high` "very similar", above `low` "related"."""

    high: float
    low: float

    def __post_init__(self) -> None:
        for name, value in (("high", self.high), ("low", self.low)):
            if not math.isfinite(value) or not MIN_SCORE <= value <= MAX_SCORE:
                raise ValueError(f"{name} threshold {value} is outside [{MIN_SCORE:g}, "
                                 f"{MAX_SCORE:g}], the range of a cosine similarity")
        if not self.low < self.high:
            raise ValueError(f"low threshold {self.low} must be below high threshold {self.high}")

    def __str__(self) -> str:
        """The form parse_thresholds reads back, exactly: "HIGH,LOW"."""
        return f"{self.high!r},{self.low!r}"


SEED_THRESHOLDS = Thresholds(high=client.VERY_SIMILAR, low=client.RELATED)


def parse_thresholds(flag: str) -> Thresholds:
    """Thresholds from a CLI flag written "HIGH,LOW", e.g. "0.92,0.86"."""
    parts = [part.strip() for part in flag.split(",")]
    if len(parts) != 2:
        raise ValueError(f"thresholds {flag!r}: expected two numbers HIGH,LOW "
                         f"(e.g. {SEED_THRESHOLDS}), found {len(parts)}")
    values: list[float] = []
    for name, part in zip(("high", "low"), parts, strict=True):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"thresholds {flag!r}: {name} {part!r} is not a number") from None
        if not math.isfinite(value):  # float() accepts "nan" and "inf"
            raise ValueError(f"thresholds {flag!r}: {name} {part!r} is not a finite number")
        values.append(value)
    high, low = values
    if not low < high:
        raise ValueError(f"thresholds {flag!r}: HIGH ({high:g}) must be above LOW ({low:g})")
    try:
        return Thresholds(high=high, low=low)
    except ValueError as error:
        raise ValueError(f"thresholds {flag!r}: {error}") from None


def verdict(score: float, thresholds: Thresholds = SEED_THRESHOLDS) -> str:
    if not math.isfinite(score):
        raise ValueError(f"score {score} is not a finite number")
    return VERDICT_OF_LABEL[int(predicted_labels(np.array([score]), thresholds)[0])]


def clip_scores(scores: ScoreArray) -> ScoreArray:
    """Scores within [-1, 1]: a cosine can come out a rounding error past either end, and
    thresholds cannot be placed there (a high of 1 means nothing is "very similar")."""
    return np.clip(scores, MIN_SCORE, MAX_SCORE)


def predicted_labels(scores: ScoreArray, thresholds: Thresholds) -> npt.NDArray[np.int64]:
    """The label each score's verdict stands for: 2 above high, 1 above low, else 0."""
    clipped = clip_scores(scores)
    return (clipped > thresholds.low).astype(np.int64) + (clipped > thresholds.high)


def verdict_accuracy(scores: Sequence[float] | ScoreArray,
                     labels: Sequence[int] | npt.NDArray[Any], thresholds: Thresholds) -> float:
    """The fraction of pairs whose verdict is their label's (2 very similar, 1 related, ...)."""
    score_array, label_array = checked_scores(scores, labels)
    truth = checked_labels(label_array)
    return float(np.mean(predicted_labels(score_array, thresholds) == truth))


@dataclass(frozen=True, slots=True)
class ScoreGaps:
    """[-1, 1] cut at the distinct scores: a threshold anywhere in one gap gives every pair
    the same verdict. Gap k is [lower[k], upper[k]), the last one closed at 1."""

    lower: ScoreArray
    upper: ScoreArray
    one_cut: ScoreArray  # a threshold in each gap, halfway across
    two_cuts: list[tuple[float, float] | None]  # low < high both in the gap, where it has room


def score_gaps(clipped: ScoreArray) -> ScoreGaps:
    distinct = np.unique(clipped)
    lower = np.concatenate(([MIN_SCORE], distinct))
    upper = np.concatenate((distinct, [MAX_SCORE]))
    if distinct[0] == MIN_SCORE:  # [-1, -1) holds no threshold
        lower, upper = lower[1:], upper[1:]
    last = len(lower) - 1

    def in_gap(gap: int, value: float) -> bool:
        return bool(lower[gap] <= value < upper[gap] or (gap == last and value == upper[gap]))

    one_cut: list[float] = []
    two_cuts: list[tuple[float, float] | None] = []
    for gap in range(len(lower)):
        width = upper[gap] - lower[gap]
        halfway = float(lower[gap] + width / 2)
        third, two_thirds = float(lower[gap] + width / 3), float(lower[gap] + width * 2 / 3)
        next_float = float(np.nextafter(lower[gap], np.inf))
        # Across a gap of a few adjacent floats, halfway and the thirds round onto its ends.
        one_cut.append(halfway if in_gap(gap, halfway) else float(lower[gap]))
        if third < two_thirds and in_gap(gap, third) and in_gap(gap, two_thirds):
            two_cuts.append((third, two_thirds))
        elif in_gap(gap, next_float):
            two_cuts.append((float(lower[gap]), next_float))
        else:
            two_cuts.append(None)
    return ScoreGaps(lower=lower, upper=upper, one_cut=np.array(one_cut), two_cuts=two_cuts)


def why_thresholds_cannot_be_fitted(labels: Iterable[int]) -> str:
    """Why pairs with these labels cannot place both thresholds; "" when they can. Each
    threshold needs pairs on both of its sides: without "same meaning" pairs the high one
    lands anywhere above the scores, without "unrelated" ones the low one anywhere below."""
    present = set(labels)
    missing = [f"{label} ({meaning})" for label, meaning in
               ((SAME_MEANING, "same meaning"), (UNRELATED, "unrelated")) if label not in present]
    if not missing:
        return ""
    return (f"the set has no pairs labelled {' and none labelled '.join(missing)}: "
            "thresholds fitted on it would mean nothing")


def fit_thresholds(scores: Sequence[float] | ScoreArray,
                   labels: Sequence[int] | npt.NDArray[Any]) -> Thresholds:
    """The thresholds with the highest verdict accuracy on these pairs, exactly.

    Scores are clipped to [-1, 1] (clip_scores), and [-1, 1] is cut at each distinct score
    into gaps (score_gaps): thresholds anywhere in one gap give the same verdicts, so trying
    every gap for `low` with every gap at or above it for `high` is exhaustive. A threshold
    is placed halfway across its gap, so that a score a little off its place does not cross
    it; where low and high share a gap (no pair is best called "related"), at its thirds.

    Among equally accurate choices: low and high in different gaps (a "related" band kept)
    before both in one gap; then the lowest gap for high; then the lowest gap for low.
    O(n log n) for the sort, then one pass over the gaps.

    Fitted on the pairs it is then scored on, the accuracy is optimistic: report it beside
    the accuracy at thresholds chosen beforehand.
    """
    score_array, label_array = checked_scores(scores, labels)
    truth = checked_labels(label_array)
    clipped = clip_scores(score_array)
    gaps = score_gaps(clipped)

    # at_or_below[k][g]: how many pairs labelled k score <= a threshold in gap g.
    order = np.argsort(clipped, kind="stable")
    ordered_scores, ordered_truth = clipped[order], truth[order]
    positions = np.searchsorted(ordered_scores, gaps.one_cut, side="right")
    at_or_below = {label: np.concatenate(([0], np.cumsum(ordered_truth == label)))[positions]
                   for label in LABELS}
    # Correct verdicts with low in gap i, high in gap j >= i:
    #   unrelated <= low, low < related <= high, same meaning > high
    # = (below0[i] - below1[i]) + (below1[j] - below2[j]) + count2; for i == j the related
    # terms cancel, as they should. So one pass keeping the best i below each j.
    gain_low = at_or_below[UNRELATED] - at_or_below[RELATED]
    gain_high = at_or_below[RELATED] - at_or_below[SAME_MEANING]

    best: tuple[int, Thresholds] | None = None
    best_low = 0
    for high_gap in range(1, len(gaps.one_cut)):
        # Strict comparisons keep the first (lowest) gap among equals.
        if gain_low[high_gap - 1] > gain_low[best_low]:
            best_low = high_gap - 1
        correct = int(gain_low[best_low] + gain_high[high_gap])
        if best is None or correct > best[0]:
            best = (correct, Thresholds(high=float(gaps.one_cut[high_gap]),
                                        low=float(gaps.one_cut[best_low])))
    for gap, cuts in enumerate(gaps.two_cuts):
        correct = int(gain_low[gap] + gain_high[gap])
        if cuts is not None and (best is None or correct > best[0]):
            best = (correct, Thresholds(high=cuts[1], low=cuts[0]))
    # [-1, 1] makes two gaps or more, or one with room for two thresholds.
    assert best is not None
    return best[1]


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class QualityReport:
    """What `pool calibrate` prints and a rotation's quality gate judges."""

    n: int
    label_counts: dict[int, int]  # every label in LABELS, 0 where absent
    spearman: float | None  # None: undefined (all scores, or all labels, equal)
    auc: float | None  # same meaning over unrelated; None: the set lacks one of them
    thresholds: Thresholds
    accuracy: float  # verdict accuracy at `thresholds`
    fitted_thresholds: Thresholds
    fitted_accuracy: float  # on the same pairs it was fitted on: optimistic

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["label_counts"] = {str(label): count for label, count in self.label_counts.items()}
        return fields

    def to_json(self) -> str:
        # allow_nan=False: a NaN would make output that strict JSON parsers reject.
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)


def evaluate(scores: Sequence[float] | ScoreArray, labels: Sequence[int] | npt.NDArray[Any],
             thresholds: Thresholds = SEED_THRESHOLDS) -> QualityReport:
    score_array, label_array = checked_scores(scores, labels)
    truth = checked_labels(label_array)
    counts = {label: int(np.count_nonzero(truth == label)) for label in LABELS}
    rank_correlation = spearman(score_array, truth)
    has_auc_classes = counts[SAME_MEANING] > 0 and counts[UNRELATED] > 0
    fitted = fit_thresholds(score_array, truth)
    return QualityReport(
        n=len(truth),
        label_counts=counts,
        spearman=None if math.isnan(rank_correlation) else rank_correlation,
        auc=auc(score_array, truth) if has_auc_classes else None,
        thresholds=thresholds,
        accuracy=verdict_accuracy(score_array, truth, thresholds),
        fitted_thresholds=fitted,
        fitted_accuracy=verdict_accuracy(score_array, truth, fitted),
    )
