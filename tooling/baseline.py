"""In-process baselines on the same model, device and thread budget as a pool, for
`pool bench`.

  seed     the seed article's code: one pair per padded forward pass (`.half().cuda()` on
           a GPU, as the seed does)
  batched  zeropool's own runtime in one process: batches of `batch` pairs, in the pool's
           dtype

Both run on the attention kernels a pool's workers use (pool.runtime.plan_free_attention) and
are timed after an untimed warm-up: the comparison is about batching and processes, not
about first-call costs or kernel choice, and a warm baseline is the harder one to beat.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence

WARM_UP_S = 1.0
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"  # read by the Rust tokenizer at every batch


@contextlib.contextmanager
def tokenizer_threads(threads: int) -> Iterator[None]:
    """Inside, the Rust tokenizer runs on one thread when `threads` is 1, as a worker with
    `--tokenizer-threads 1` does (the default on CPU); else (more, or 0: unknown) on its own
    pool of every core. Without it a baseline tokenised on every core against a worker's one."""
    before = os.environ.get(PARALLELISM_ENV)
    if threads == 1:
        os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM_ENV, None)
        else:
            os.environ[PARALLELISM_ENV] = before


def seed_pairs_per_s(path: str, threads: int, seconds: float,
                     pairs: Sequence[tuple[str, str]], device: str = "cpu") -> float:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pool.runtime import plan_free_attention

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if device.startswith("cuda"):
        plan_free_attention()
        model = model.half().to(device)

    @torch.inference_mode()
    def similarity(a: str, b: str) -> float:
        enc = tokenizer([a, b], padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return float((emb[0] * emb[1]).sum())

    def step(done: int) -> int:
        similarity(*pairs[done % len(pairs)])
        return 1

    return _pairs_per_s(step, seconds)


def batched_pairs_per_s(path: str, threads: int, seconds: float,
                        pairs: Sequence[tuple[str, str]], batch: int = 64,
                        device: str = "cpu", dtype: str = "auto") -> float:
    import torch

    from pool.runtime import Encoder

    torch.set_num_threads(threads)
    encoder = Encoder(path, device=device, dtype=dtype)

    def step(done: int) -> int:
        i = done % len(pairs)
        chunk = list(pairs[i : i + batch])
        encoder.similarity(chunk)
        return len(chunk)

    return _pairs_per_s(step, seconds)


def _pairs_per_s(step: Callable[[int], int], seconds: float) -> float:
    """Pairs per second of `step(pairs done so far) -> pairs it did`, after WARM_UP_S."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < WARM_UP_S:
        done += step(done)
    warm, start = done, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step(done)
    return (done - warm) / (time.perf_counter() - start)
