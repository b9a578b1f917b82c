"""The figures in docs/quality-data.md, computed from a labelled pairs file:

    python -m tooling.pairs_stats [FILE]

(default: the packaged pool/data/zh_pairs.tsv, then the packaged diagnostic
pool/data/zh_pairs_hard.tsv)

Pairs per topic and label (topics from the file's `# topic: NAME` comments, which start
the pairs whose text_a is about NAME), text lengths, what the texts contain, and a
character-overlap baseline scored with pool.quality: how far a model that only counts
shared characters gets, which the hard cases are there to keep low.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from pool import quality

TOPIC_COMMENT = re.compile(r"^#\s*topic:\s*(?P<topic>.+?)\s*$")
# Upper ends (inclusive) of the text-length buckets, in characters; the last is open.
LENGTH_BUCKETS = (4, 8, 15, 25, 39)
FULL_WIDTH_PUNCTUATION = set("，。？！：；、“”‘’《》（）…")
LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")


def topics_by_line(text: str) -> dict[int, str]:
    """The topic section each line number falls in."""
    topic, topics = "(none)", {}
    for number, line in enumerate(text.split("\n"), start=1):
        match = TOPIC_COMMENT.match(line)
        if match:
            topic = match["topic"]
        topics[number] = topic
    return topics


def length_bucket(length: int) -> str:
    low = 1
    for high in LENGTH_BUCKETS:
        if length <= high:
            return f"{low}-{high}"
        low = high + 1
    return f"{low}+"


def character_overlap(text_a: str, text_b: str) -> float:
    """Jaccard similarity of the two texts' character sets, punctuation left out."""
    chars_a = {c for c in text_a if c.isalnum()}
    chars_b = {c for c in text_b if c.isalnum()}
    return len(chars_a & chars_b) / max(1, len(chars_a | chars_b))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(text: str, source: str) -> str:
    pairs = quality.parse_pairs(text, source)
    topics = topics_by_line(text)
    labels = quality.LABELS[::-1]
    out = [f"{len(pairs)} pairs in {source}", ""]

    per_topic: dict[str, Counter[int]] = {}
    for pair in pairs:
        per_topic.setdefault(topics[pair.line], Counter())[pair.label] += 1
    total = Counter(pair.label for pair in pairs)
    out.append(markdown_table(
        ["topic", *(f"label {label}" for label in labels), "pairs"],
        [[topic, *(counts[label] for label in labels), sum(counts.values())]
         for topic, counts in per_topic.items()]
        + [["**all**", *(total[label] for label in labels), len(pairs)]]))
    out.append("")

    texts = [text for pair in pairs for text in (pair.text_a, pair.text_b)]
    lengths = Counter(length_bucket(len(text)) for text in texts)
    buckets = [length_bucket(high) for high in LENGTH_BUCKETS] + [length_bucket(10**6)]
    out.append(markdown_table(["characters per text", *buckets, "shortest", "longest"],
                              [["texts", *(lengths[b] for b in buckets),
                                min(map(len, texts)), max(map(len, texts))]]))
    out.append("")

    out.append(markdown_table(["texts that contain", "count"], [
        ["full-width punctuation", sum(bool(FULL_WIDTH_PUNCTUATION & set(t)) for t in texts)],
        ["a question mark （？ or ?）", sum(("？" in t) or ("?" in t) for t in texts)],
        ["digits or Latin letters", sum(bool(LATIN_OR_DIGIT.search(t)) for t in texts)],
    ]))
    out.append("")

    overlaps = [character_overlap(pair.text_a, pair.text_b) for pair in pairs]
    mean_overlap = {label: sum(overlap for overlap, pair in zip(overlaps, pairs, strict=True)
                               if pair.label == label) / max(1, total[label])
                    for label in labels}
    out.append(markdown_table(["label", "mean character overlap (Jaccard)"],
                              [[label, f"{mean_overlap[label]:.2f}"] for label in labels]))
    out.append("")
    baseline = quality.evaluate(overlaps, [pair.label for pair in pairs])
    out.append(f"character-overlap baseline: Spearman {figure(baseline.spearman)}, "
               f"AUC {figure(baseline.auc)}, accuracy at the seed's thresholds "
               f"{baseline.accuracy:.3f}, fitted {baseline.fitted_thresholds} -> "
               f"{baseline.fitted_accuracy:.3f}")
    return "\n".join(out)


def figure(value: float | None) -> str:
    """A figure to three places; "null" where it is undefined (a set without label 0 has no
    AUC), as the JSON report writes it."""
    return "null" if value is None else f"{value:.3f}"


def packaged(resource_name: str) -> tuple[str, str]:
    resource = resources.files(quality.DEFAULT_PAIRS_PACKAGE).joinpath(resource_name)
    return resource.read_text(encoding="utf-8"), f"{quality.DEFAULT_PAIRS_PACKAGE}/{resource_name}"


def main(argv: Sequence[str]) -> None:
    if argv:
        path = Path(argv[0])
        print(report(path.read_text(encoding="utf-8"), str(path)))
        return
    print(report(*packaged(quality.DEFAULT_PAIRS_RESOURCE)))
    print()
    print(report(*packaged(quality.HARD_PAIRS_RESOURCE)))


if __name__ == "__main__":
    main(sys.argv[1:])
