"""The built-in models' verdict thresholds (pool.builtin.MINILM_THRESHOLDS, E5_THRESHOLDS),
computed: pool/data/zh_pairs.tsv scored in-process in fp32 by each built-in, as a worker
scores it (raw texts, mean pooling, cosine), then pool.quality.evaluate at the seed's
thresholds and at the fitted ones. One JSON line per model:

    PYTHONPATH=. python benchmarks/calibrate_builtins.py [--model builtin:minilm ...]
        [--prompt-name query]   (one of the model's prompts before every text)

builtin:multilingual-e5-small is converted into the model cache on first use (~10-30 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from typing import Any

from pool.builtin import BUILTIN_PREFIX, BUILTINS, builtin_thresholds, resolve_model_path
from pool.quality import (
    SEED_THRESHOLDS,
    LabelledPair,
    evaluate,
    fit_thresholds,
    load_default_pairs,
    load_hard_pairs,
    verdict_accuracy,
)
from pool.thresholds import thresholds_to_json

SCORE_BATCH_PAIRS = 64  # pairs per forward pass: any size gives the same fp32 scores
FIGURE_DIGITS = 4
SCORE_THREADS = 1  # leaves the other core to whatever else runs; scores are the same
# Held-out accuracy: thresholds fitted on all folds but one, verdicts counted on that one,
# over shuffled repeats. Fitting and scoring on the same pairs flatters a fit.
FOLDS, FOLD_REPEATS = 5, 20


def calibrate(spec: str, prompt_name: str | None = None) -> dict[str, Any]:
    import torch

    from pool.runtime import Encoder

    started = time.perf_counter()
    path = resolve_model_path(spec)
    torch.set_num_threads(SCORE_THREADS)
    encoder = Encoder(path, dtype="float32", graph="eager")
    prompt = encoder.prompts.text_of(prompt_name)
    pairs = [prompted(p, prompt) for p in load_default_pairs()]
    scores = scored(encoder, pairs)
    report = evaluate(scores, [p.label for p in pairs], SEED_THRESHOLDS)
    stored = builtin_thresholds(path)
    hard = [prompted(p, prompt) for p in load_hard_pairs()]
    hard_report = evaluate(scored(encoder, hard), [p.label for p in hard],
                           stored or SEED_THRESHOLDS)
    return {
        "model": spec, "prompt": prompt, "pairs": report.n, "spearman": rounded(report.spearman),
        "auc": rounded(report.auc), "score_min": rounded(min(scores)),
        "score_max": rounded(max(scores)),
        "seed_thresholds": thresholds_to_json(report.thresholds),
        "seed_accuracy": rounded(report.accuracy),
        "fitted_thresholds": [rounded(x) for x in thresholds_to_json(report.fitted_thresholds)],
        "fitted_accuracy": rounded(report.fitted_accuracy),
        "held_out_accuracy": rounded(held_out_accuracy(scores, [p.label for p in pairs])),
        # What pool.builtin holds now, and its accuracy here (after rounding the constants).
        "stored_thresholds": None if stored is None else thresholds_to_json(stored),
        "stored_accuracy": None if stored is None else rounded(
            evaluate(scores, [p.label for p in pairs], stored).accuracy),
        # The minimal-edit contrasts (role swaps, antonyms, negations): what cosine
        # similarity cannot see; verdicts at the stored thresholds.
        "hard_pairs": hard_report.n, "hard_spearman": rounded(hard_report.spearman),
        "hard_accuracy": rounded(hard_report.accuracy),
        "seconds": round(time.perf_counter() - started, 1),
    }


def prompted(pair: LabelledPair, prompt: str) -> LabelledPair:
    """The pair as a worker feeds it with `prompt` (pool.worker.decode_job)."""
    return dataclasses.replace(pair, text_a=prompt + pair.text_a, text_b=prompt + pair.text_b)


def scored(encoder: Any, pairs: list[LabelledPair]) -> list[float]:
    scores: list[float] = []
    for start in range(0, len(pairs), SCORE_BATCH_PAIRS):
        chunk = pairs[start:start + SCORE_BATCH_PAIRS]
        scores += encoder.similarity([(p.text_a, p.text_b) for p in chunk])
    return scores


def held_out_accuracy(scores: list[float], labels: list[int]) -> float:
    """Verdict accuracy of thresholds fitted without the pairs they judge (k-fold)."""
    rng = random.Random(0)
    right = total = 0
    for _ in range(FOLD_REPEATS):
        order = list(range(len(scores)))
        rng.shuffle(order)
        for fold in range(FOLDS):
            test = set(order[fold::FOLDS])
            train = [i for i in order if i not in test]
            fitted = fit_thresholds([scores[i] for i in train], [labels[i] for i in train])
            judged = sorted(test)
            right += round(verdict_accuracy([scores[i] for i in judged],
                                            [labels[i] for i in judged], fitted) * len(judged))
            total += len(judged)
    return right / total


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, FIGURE_DIGITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append",
                        help="a built-in (default: every one)")
    parser.add_argument("--prompt-name", help="one of the model's prompts, before every text "
                        "(default: the model's default prompt, if any)")
    args = parser.parse_args()
    for spec in args.model or [BUILTIN_PREFIX + name for name in BUILTINS]:
        print(json.dumps(calibrate(spec, args.prompt_name), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
