"""In-process baselines on the same model, device and thread budget as a pool, for
`pool bench`.

  seed     the seed article's code: one pair per padded forward pass (`.half().cuda()` on
           a GPU, as the seed does)
  batched  zeropool's own runtime in one process: batches of `batch` pairs
"""

from __future__ import annotations

import time
from collections.abc import Sequence


def seed_pairs_per_s(path: str, threads: int, seconds: float,
                     pairs: Sequence[tuple[str, str]], device: str = "cpu") -> float:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if device.startswith("cuda"):
        model = model.half().to(device)

    @torch.inference_mode()
    def similarity(a: str, b: str) -> float:
        enc = tokenizer([a, b], padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return float((emb[0] * emb[1]).sum())

    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        similarity(*pairs[done % len(pairs)])
        done += 1
    return done / (time.perf_counter() - start)


def batched_pairs_per_s(path: str, threads: int, seconds: float,
                        pairs: Sequence[tuple[str, str]], batch: int = 64,
                        device: str = "cpu") -> float:
    import torch

    from pool.runtime import Encoder

    torch.set_num_threads(threads)
    encoder = Encoder(path, device=device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = done % len(pairs)
        encoder.similarity(list(pairs[i : i + batch]))
        done += min(batch, len(pairs) - i)
    return done / (time.perf_counter() - start)
