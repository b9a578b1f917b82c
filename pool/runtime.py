"""The model runtime: one transformers encoder on one device, the seed's score semantics.

Mean pooling over the attention mask, L2 normalisation, cosine. Texts are deduplicated,
sorted by token length and run in chunks padded only to their own longest text, so a batch
of mixed lengths wastes little compute on padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoTokenizer

# Texts per forward pass after sorting by length; bounds activation memory on long inputs.
DEFAULT_CHUNK_TEXTS = 128
# Pairs a fresh version must score sensibly before it takes traffic.
GOLDEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("今天天气真好", "今日阳光明媚"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌"),
    ("The weather is lovely today", "It is sunny and warm outside"),
)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[dtype]


@dataclass(frozen=True)
class HealthReport:
    golden_scores: list[float]
    self_similarity: list[float]
    seconds: float


class Encoder:
    """Loads one model version and turns texts into normalised sentence embeddings."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "auto",
        chunk_texts: int = DEFAULT_CHUNK_TEXTS,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.max_length = _max_length(self.tokenizer, self.model.config)
        self.chunk_texts = chunk_texts
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised embeddings (float32, on CPU), one row per text, in input order."""
        if not texts:
            return torch.empty((0, self.dim))
        ids = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, add_special_tokens=True
        )["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty((len(texts), self.dim))
        for start in range(0, len(order), self.chunk_texts):
            chunk = order[start : start + self.chunk_texts]
            out[chunk] = self._forward([ids[i] for i in chunk])
        return out

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        input_ids = input_ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return normalize(mean_pool(hidden.float(), mask)).cpu()

    def similarity(self, pairs: list[tuple[str, str]]) -> list[float]:
        unique = list(dict.fromkeys(t for pair in pairs for t in pair))
        index = {t: i for i, t in enumerate(unique)}
        vectors = self.embed(unique)
        a = vectors[[index[x] for x, _ in pairs]]
        b = vectors[[index[y] for _, y in pairs]]
        return (a * b).sum(dim=1).tolist()

    def health_check(self) -> HealthReport:
        """Warm the model up on golden pairs and report what a supervisor needs to judge it."""
        start = time.perf_counter()
        golden = self.similarity(list(GOLDEN_PAIRS))
        texts = [t for pair in GOLDEN_PAIRS for t in pair]
        selfsim = self.similarity([(t, t) for t in texts])
        return HealthReport(golden, selfsim, time.perf_counter() - start)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def _max_length(tokenizer, config) -> int:
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return int(min(x for x in limits if x and x < 1_000_000))
