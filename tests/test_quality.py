"""pool.quality: the labelled pairs (file format, the packaged Chinese set) and the figures
computed from a model's scores, checked against brute-force references."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pool import quality
from pool.quality import (
    SEED_THRESHOLDS,
    LabelledPair,
    PairsFileError,
    QualityReport,
    Thresholds,
    auc,
    evaluate,
    fit_thresholds,
    load_default_pairs,
    load_hard_pairs,
    parse_pairs,
    parse_thresholds,
    passes_spearman_gate,
    read_pairs,
    spearman,
    verdict,
    verdict_accuracy,
)
from tooling import pairs_stats

REPO = Path(__file__).resolve().parent.parent
MIN_DEFAULT_PAIRS = 180
MIN_HARD_PAIRS = 30
MIN_LABEL_SHARE = 0.25
MIN_TOPICS = 10
SHORT_TEXT = 4  # characters
LONG_TEXT = 40
TOLERANCE = 1e-9
CLOSE_SCORES = 1e-12

# Scores on a coarse grid tie often (as labels do); free floats rarely. Both within a cosine's
# range.
GRID_SCORES = st.integers(-20, 20).map(lambda step: step / 20)
FREE_SCORES = st.floats(-1.0, 1.0, allow_nan=False)
SCORES = st.one_of(GRID_SCORES, FREE_SCORES)
LABEL_VALUES = st.sampled_from(quality.LABELS)


@st.composite
def scored_pairs(draw: st.DrawFn, min_size: int = 1, max_size: int = 60,
                 ) -> tuple[list[float], list[int]]:
    labels = draw(st.lists(LABEL_VALUES, min_size=min_size, max_size=max_size))
    scores = draw(st.lists(SCORES, min_size=len(labels), max_size=len(labels)))
    return scores, labels


# ---------------------------------------------------------------------------- references


def reference_average_ranks(values: list[float]) -> list[float]:
    return [1 + sum(other < value for other in values)
            + (sum(other == value for other in values) - 1) / 2 for value in values]


def reference_spearman(scores: list[float], labels: list[int]) -> float:
    xs, ys = reference_average_ranks(scores), reference_average_ranks([float(y) for y in labels])
    mean_x, mean_y = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    covariance = math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    spread_x = math.fsum((x - mean_x) ** 2 for x in xs)
    spread_y = math.fsum((y - mean_y) ** 2 for y in ys)
    if spread_x == 0 or spread_y == 0:
        return math.nan
    return covariance / math.sqrt(spread_x * spread_y)


def reference_auc(scores: list[float], labels: list[int], positive: int, negative: int) -> float:
    positives = [s for s, y in zip(scores, labels, strict=True) if y == positive]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == negative]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def reference_accuracy(scores: list[float], labels: list[int], thresholds: Thresholds) -> float:
    words = {2: "very similar", 1: "related", 0: "unrelated"}
    hits = sum(verdict(s, thresholds) == words[y] for s, y in zip(scores, labels, strict=True))
    return hits / len(labels)


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, abs_tol=TOLERANCE)


# ---------------------------------------------------------------------------- Spearman


@given(scored_pairs(min_size=2))
def test_spearman_matches_brute_force_with_average_ranks(data: tuple[list[float], list[int]]
                                                         ) -> None:
    scores, labels = data
    assert same_float(spearman(scores, labels), reference_spearman(scores, labels))


@given(st.lists(LABEL_VALUES, min_size=2), st.data())
def test_spearman_is_one_for_scores_ordered_as_the_labels(labels: list[int],
                                                          data: st.DataObject) -> None:
    assume(len(set(labels)) > 1)
    # Any strictly increasing score per label: equal labels, equal scores.
    levels = sorted(data.draw(st.lists(FREE_SCORES, min_size=3, max_size=3, unique=True)))
    scores = [levels[label] for label in labels]
    assert spearman(scores, labels) == pytest.approx(1.0, abs=TOLERANCE)
    assert spearman([-s for s in scores], labels) == pytest.approx(-1.0, abs=TOLERANCE)


MONOTONE = {
    "affine": lambda x: 5 * x - 3,
    "cube": lambda x: x**3,
    "exp": np.exp,
    "arctan": np.arctan,
}


@given(scored_pairs(min_size=2), st.sampled_from(sorted(MONOTONE)))
def test_spearman_is_unchanged_by_increasing_transforms(data: tuple[list[float], list[int]],
                                                        transform: str) -> None:
    scores, labels = data
    # Grid scores only: steps of 1/20 stay distinct through each transform in floats.
    grid = [round(s * 20) / 20 for s in scores]
    transformed = [float(MONOTONE[transform](s)) for s in grid]
    assert same_float(spearman(transformed, labels), spearman(grid, labels))


def test_spearman_is_nan_when_there_is_no_order() -> None:
    assert math.isnan(spearman([0.7, 0.7, 0.7], [0, 1, 2]))  # a model that says one thing
    assert math.isnan(spearman([0.1, 0.5, 0.9], [2, 2, 2]))  # a set with one label
    assert not passes_spearman_gate(math.nan, 0.0)
    assert passes_spearman_gate(0.6, 0.6)
    assert not passes_spearman_gate(0.59, 0.6)


@pytest.mark.parametrize(("scores", "labels", "message"), [
    ([0.1, math.nan], [0, 1], "score nan at index 1"),
    ([0.1, math.inf], [0, 1], "score inf at index 1"),
    ([0.1], [0, 1], "1 scores for 2 labels"),
    ([], [], "no scores"),
])
def test_figures_refuse_scores_that_are_not_numbers(scores: list[float], labels: list[int],
                                                    message: str) -> None:
    for figure in (spearman, auc, fit_thresholds, evaluate):
        with pytest.raises(ValueError, match=message):
            figure(scores, labels)


# ---------------------------------------------------------------------------- AUC


@given(scored_pairs(min_size=2), st.sampled_from([(2, 0), (2, 1), (1, 0)]))
def test_auc_matches_brute_force_pair_count(data: tuple[list[float], list[int]],
                                            classes: tuple[int, int]) -> None:
    scores, labels = data
    positive, negative = classes
    assume(positive in labels and negative in labels)
    assert auc(scores, labels, positive, negative) == pytest.approx(
        reference_auc(scores, labels, positive, negative), abs=TOLERANCE)


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    assert auc([0.5, 0.5], [2, 0]) == 0.5
    assert auc([0.9, 0.3, 0.6], [2, 0, 1]) == 1.0  # label 1 is left out by default
    with pytest.raises(ValueError, match="found 0 and 1"):
        auc([0.9, 0.3], [1, 0])


# ---------------------------------------------------------------------------- thresholds


def test_seed_thresholds_and_verdicts() -> None:
    assert Thresholds(high=0.85, low=0.5) == SEED_THRESHOLDS
    assert [verdict(s) for s in (0.86, 0.85, 0.51, 0.5, -1.0)] == [
        "very similar", "related", "related", "unrelated", "unrelated"]
    with pytest.raises(ValueError, match="not a finite number"):
        verdict(math.nan)


@pytest.mark.parametrize(("high", "low", "message"), [
    (0.5, 0.5, "low threshold 0.5 must be below high threshold 0.5"),
    (0.5, 0.8, "must be below"),
    (1.2, 0.5, "high threshold 1.2 is outside"),
    (0.5, -1.5, "low threshold -1.5 is outside"),
    (math.nan, 0.5, "high threshold nan is outside"),
])
def test_thresholds_are_validated(high: float, low: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Thresholds(high=high, low=low)


def test_parse_thresholds_reads_high_then_low() -> None:
    assert parse_thresholds("0.92,0.86") == Thresholds(high=0.92, low=0.86)
    assert parse_thresholds(" 1 , -1 ") == Thresholds(high=1.0, low=-1.0)
    assert parse_thresholds(str(SEED_THRESHOLDS)) == SEED_THRESHOLDS


@given(st.tuples(FREE_SCORES, FREE_SCORES).filter(lambda cut: cut[0] != cut[1]))
def test_thresholds_read_back_exactly(cuts: tuple[float, float]) -> None:
    thresholds = Thresholds(high=max(cuts), low=min(cuts))
    assert parse_thresholds(str(thresholds)) == thresholds


@pytest.mark.parametrize(("flag", "message"), [
    ("0.9", "expected two numbers HIGH,LOW .* found 1"),
    ("0.9,0.5,0.1", "found 3"),
    ("", "found 1"),
    ("high,0.5", "high 'high' is not a number"),
    ("0.9,", "low '' is not a number"),
    ("0.9,nan", "low 'nan' is not a finite number"),
    ("0.5,0.9", r"HIGH \(0.5\) must be above LOW \(0.9\)"),
    ("0.7,0.7", "must be above"),
    ("1.5,0.5", "high threshold 1.5 is outside"),
    ("0.5,-2", "low threshold -2.0 is outside"),
])
def test_parse_thresholds_errors(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_thresholds(flag)


@given(scored_pairs(), st.tuples(SCORES, SCORES).filter(lambda cut: cut[0] != cut[1]))
def test_verdict_accuracy_agrees_with_verdict(data: tuple[list[float], list[int]],
                                              cuts: tuple[float, float]) -> None:
    scores, labels = data
    thresholds = Thresholds(high=max(cuts), low=min(cuts))
    assert verdict_accuracy(scores, labels, thresholds) == pytest.approx(
        reference_accuracy(scores, labels, thresholds))


COARSE_GRID = [step / 10 for step in range(-10, 11)]


@given(scored_pairs())
def test_fitted_thresholds_beat_every_pair_on_a_grid(data: tuple[list[float], list[int]],
                                                     ) -> None:
    scores, labels = data
    fitted = fit_thresholds(scores, labels)
    assert -1 <= fitted.low < fitted.high <= 1
    best = verdict_accuracy(scores, labels, fitted)
    for low, high in itertools.combinations(COARSE_GRID, 2):
        assert best >= verdict_accuracy(scores, labels, Thresholds(high=high, low=low))


@given(scored_pairs(max_size=25))
def test_fitted_thresholds_are_the_exact_best(data: tuple[list[float], list[int]]) -> None:
    scores, labels = data
    # A threshold at a score, or at the next float above it, gives the same verdicts as any
    # threshold up to the next score: these cuts reach every way [-1, 1] can sort the pairs,
    # with room for low and high between the same two scores.
    cuts = sorted({cut for value in (-1.0, *scores)
                   for cut in (value, min(1.0, float(np.nextafter(value, 2.0))))})
    best = max(verdict_accuracy(scores, labels, Thresholds(high=high, low=low))
               for low, high in itertools.combinations(cuts, 2))
    assert verdict_accuracy(scores, labels, fit_thresholds(scores, labels)) == best


@given(scored_pairs())
def test_fitted_thresholds_are_deterministic_and_halfway(data: tuple[list[float], list[int]],
                                                         ) -> None:
    scores, labels = data
    fitted = fit_thresholds(scores, labels)
    assert fit_thresholds(list(reversed(scores)), list(reversed(labels))) == fitted
    # No score sits on a threshold, unless two are so close there is no float between or
    # it is 1, where "above 1" is nothing.
    ends = sorted({-1.0, 1.0, *scores})
    assume(all(b - a > CLOSE_SCORES for a, b in itertools.pairwise(ends)))
    assert not {fitted.low, fitted.high} & (set(scores) - {1.0})


def test_fitted_thresholds_sit_halfway_and_break_ties_as_documented() -> None:
    scores = [0.1, 0.2, 0.5, 0.6, 0.9, 0.95]
    labels = [0, 0, 1, 1, 2, 2]
    assert fit_thresholds(scores, labels) == Thresholds(high=0.75, low=0.35)
    # Separable between 0.1 and 0.6 either side of the related pair: the lowest gaps win.
    assert fit_thresholds([0.0, 0.5, 1.0], [0, 1, 2]) == Thresholds(high=0.75, low=0.25)
    # All scores equal: calling all of them unrelated, related or very similar scores the
    # same; a related band is kept, halfway to either end of the range.
    fitted = fit_thresholds([0.3, 0.3, 0.3], [0, 1, 2])
    assert (fitted.low, fitted.high) == pytest.approx((-0.35, 0.65))
    # No related pairs: low and high share the gap between the two classes, at its thirds.
    fitted = fit_thresholds([0.2, 0.8], [0, 2])
    assert (fitted.low, fitted.high) == pytest.approx((0.4, 0.6))
    # A cosine a rounding error above 1 counts as 1.
    fitted = fit_thresholds([0.2, 1.0000001], [1, 2])
    assert verdict_accuracy([0.2, 1.0000001], [1, 2], fitted) == 1.0
    assert verdict(1.0000001, Thresholds(high=1.0, low=0.5)) == "related"


# ---------------------------------------------------------------------------- report


def test_evaluate_reports_every_figure_as_json() -> None:
    scores = [0.1, 0.2, 0.5, 0.6, 0.9, 0.95, 0.3]
    labels = [0, 0, 1, 1, 2, 2, 1]
    report = evaluate(scores, labels, Thresholds(high=0.92, low=0.86))
    assert isinstance(report, QualityReport)
    assert report.n == 7
    assert report.label_counts == {0: 2, 1: 3, 2: 2}
    assert report.spearman == pytest.approx(reference_spearman(scores, labels))
    assert report.auc == 1.0
    assert report.accuracy == pytest.approx(3 / 7)  # 0.1 0.2 unrelated, 0.95 very similar
    assert report.fitted_accuracy == 1.0  # the labels are separable
    decoded = json.loads(report.to_json())
    assert decoded["label_counts"] == {"0": 2, "1": 3, "2": 2}
    assert decoded["thresholds"] == {"high": 0.92, "low": 0.86}
    assert decoded["fitted_thresholds"] == {"high": report.fitted_thresholds.high,
                                            "low": report.fitted_thresholds.low}


def test_evaluate_writes_undefined_figures_as_null() -> None:
    report = evaluate([0.4, 0.4, 0.4], [1, 1, 2])
    decoded = json.loads(report.to_json())
    assert decoded["spearman"] is None  # constant scores
    assert decoded["auc"] is None  # no unrelated pair
    assert decoded["label_counts"] == {"0": 0, "1": 2, "2": 1}
    with pytest.raises(ValueError, match=r"label 3\.0 at index 1 is not 0, 1 or 2"):
        evaluate([0.4, 0.4], [1, 3])


# ---------------------------------------------------------------------------- pairs files


def test_parse_pairs_skips_comments_and_blank_lines_and_keeps_line_numbers() -> None:
    content = "# header\n\n2\t今天天气真好\t今日阳光明媚\r\n   \n  # indented comment\n0\t a \tb \n"
    assert parse_pairs(content) == [
        LabelledPair(label=2, text_a="今天天气真好", text_b="今日阳光明媚", line=3),
        LabelledPair(label=0, text_a="a", text_b="b", line=6),
    ]
    # A byte-order mark is not part of the first line.
    assert parse_pairs("\ufeff1\ta\tb".encode())[0].label == 1
    assert parse_pairs("\ufeff1\ta\tb")[0].label == 1
    with pytest.raises(PairsFileError, match=r"line 2: not UTF-8 \(byte 0xfe\)"):
        parse_pairs(b"\xef\xbb\xbf1\ta\tb\n2\t\xfe\tc")


@pytest.mark.parametrize(("content", "message"), [
    ("# c\n2\ta\tb\n1\tonly two\n", "line 3: expected 3 tab-separated fields .* found 2"),
    ("2\ta\tb\tc\n", "line 1: expected 3 .* found 4"),
    ("2 a b\n", "line 1: expected 3 .* found 1"),
    ("\n\n3\ta\tb\n", "line 3: label '3' is not one of 0"),
    ("x\ta\tb\n", "line 1: label 'x' is not one of"),
    ("\ta\tb\n", "line 1: label '' is not one of"),
    ("2\ta\tb\n1\t\tb\n", "line 2: text_a is empty"),
    ("2\ta\t   \n", "line 1: text_b is empty"),
    ("# only a comment\n\n", "no pairs"),
    ("", "no pairs"),
    (b"2\ta\tb\n# ok\n2\t\xff\tc\n", r"line 3: not UTF-8 \(byte 0xff\)"),
    ("# GBK\n1\t今天\t明天\n".encode("gbk"), "line 2: not UTF-8"),
])
def test_parse_errors_name_the_source_and_line(content: str | bytes, message: str) -> None:
    with pytest.raises(PairsFileError, match=f"^pairs.tsv: {message}"):
        parse_pairs(content, "pairs.tsv")


def test_read_pairs_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.tsv"
    path.write_text("2\t你好\t您好\n1\t你好\n", encoding="utf-8")
    with pytest.raises(PairsFileError, match=f"^{path}: line 2: expected 3"):
        read_pairs(path)
    path.write_text("2\t你好\t您好\n", encoding="utf-8")
    assert read_pairs(str(path)) == [LabelledPair(2, "你好", "您好", 1)]
    with pytest.raises(PairsFileError, match=r"missing\.tsv: cannot read"):
        read_pairs(tmp_path / "missing.tsv")
    assert issubclass(PairsFileError, ValueError)


# ---------------------------------------------------------------------------- the packaged set


@pytest.fixture(scope="module")
def default_pairs() -> list[LabelledPair]:
    return load_default_pairs()


def test_default_set_is_big_and_balanced(default_pairs: list[LabelledPair]) -> None:
    assert len(default_pairs) >= MIN_DEFAULT_PAIRS
    counts = Counter(pair.label for pair in default_pairs)
    for label in quality.LABELS:
        assert counts[label] >= MIN_LABEL_SHARE * len(default_pairs), counts


def pair_lines(pairs: list[LabelledPair]) -> dict[frozenset[str], int]:
    """Each pair's line, keyed so that (a, b) and (b, a) are one pair; no repeats, no pair of
    identical texts."""
    seen: dict[frozenset[str], int] = {}
    for pair in pairs:
        assert pair.text_a != pair.text_b, f"line {pair.line}: the two texts are identical"
        key = frozenset((pair.text_a, pair.text_b))
        assert key not in seen, f"line {pair.line} repeats line {seen[key]}"
        seen[key] = pair.line
    return seen


def test_default_set_has_no_duplicate_or_trivial_pairs(default_pairs: list[LabelledPair]
                                                      ) -> None:
    pair_lines(default_pairs)


@pytest.mark.parametrize("resource", [quality.DEFAULT_PAIRS_RESOURCE,
                                      quality.HARD_PAIRS_RESOURCE])
def test_packaged_sets_are_package_data(resource: str) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11; the project allows 3.10
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"][quality.DEFAULT_PAIRS_PACKAGE]
    assert any(fnmatch(resource, pattern) for pattern in patterns)
    assert (REPO / "pool" / resource).is_file()


def test_default_set_spreads_over_topics_and_lengths() -> None:
    text = (REPO / "pool" / quality.DEFAULT_PAIRS_RESOURCE).read_text(encoding="utf-8")
    pairs = quality.parse_pairs(text)
    topics = pairs_stats.topics_by_line(text)
    per_topic = Counter(topics[pair.line] for pair in pairs)
    assert "(none)" not in per_topic and len(per_topic) >= MIN_TOPICS, per_topic
    lengths = [len(t) for pair in pairs for t in (pair.text_a, pair.text_b)]
    assert min(lengths) <= SHORT_TEXT and max(lengths) >= LONG_TEXT
    assert "Spearman" in pairs_stats.report(text, "zh_pairs.tsv")
    # Same-subject pairs share a subject's words, unrelated ones next to nothing.
    overlap = mean_overlap(pairs)
    assert overlap[quality.SAME_MEANING] > overlap[quality.UNRELATED]
    assert overlap[quality.RELATED] > overlap[quality.UNRELATED]


def mean_overlap(pairs: list[LabelledPair]) -> dict[int, float]:
    return {label: float(np.mean([pairs_stats.character_overlap(p.text_a, p.text_b)
                                  for p in pairs if p.label == label]))
            for label in quality.LABELS if any(p.label == label for p in pairs)}


# ---------------------------------------------------------------------------- the hard set


@pytest.fixture(scope="module")
def hard_pairs() -> list[LabelledPair]:
    return load_hard_pairs()


def test_hard_set_loads_minimal_pairs(hard_pairs: list[LabelledPair]) -> None:
    assert len(hard_pairs) >= MIN_HARD_PAIRS
    counts = Counter(pair.label for pair in hard_pairs)
    # Minimal edits: mostly ones that change the meaning, a few that keep it; none unrelated.
    assert set(counts) == {quality.RELATED, quality.SAME_MEANING}, counts
    assert counts[quality.RELATED] > counts[quality.SAME_MEANING]
    pair_lines(hard_pairs)


def test_hard_set_shares_no_pair_with_the_default_set(default_pairs: list[LabelledPair],
                                                      hard_pairs: list[LabelledPair]) -> None:
    default_lines = pair_lines(default_pairs)
    for key, line in pair_lines(hard_pairs).items():
        assert key not in default_lines, (
            f"zh_pairs_hard.tsv line {line} is zh_pairs.tsv line {default_lines[key]}")


def test_hard_set_is_made_of_edits_and_reports_without_an_auc(default_pairs: list[LabelledPair],
                                                              ) -> None:
    text = (REPO / "pool" / quality.HARD_PAIRS_RESOURCE).read_text(encoding="utf-8")
    pairs = quality.parse_pairs(text)
    topics = pairs_stats.topics_by_line(text)
    assert "(none)" not in {topics[pair.line] for pair in pairs}
    # One sentence edited into the other shares more characters than a paraphrase does.
    hard_overlap = mean_overlap(pairs)
    assert hard_overlap[quality.RELATED] > mean_overlap(default_pairs)[quality.SAME_MEANING]
    # No unrelated pairs, so no AUC: the report says null instead of failing.
    assert "AUC null" in pairs_stats.report(text, "zh_pairs_hard.tsv")
