"""What a worker tells the supervisor about itself: its READY info and its heartbeats.

Typed records in both processes; JSON only on the backend socket between them.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

# Upper bounds of the batch-size histogram (pairs or texts per forward pass); workers count
# into these and report with heartbeats.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    """Sent once, when the worker has loaded and warmed up its model."""

    version: str
    worker_id: str
    pid: int
    capacity: int
    max_batch: int
    device: str
    load_seconds: float = 0.0
    dtype: str = "none"  # "none": the echo model
    graph: str = "none"  # how forward passes run: "traced" or "eager" (pool.runtime.Encoder)
    pooling: str = "none"  # how token vectors make a sentence's: mean, cls, max, lasttoken
    prompt: str = ""  # the model's default prompt's name, before a text naming none ("": none)
    graph_note: str = ""  # why --graph auto stayed eager
    fused_linears: int = 0  # linears a CPU bf16 graph runs through oneDNN (pool.fusion)
    fusion_note: str = ""  # why a CPU bf16 graph kept torch's linears
    dim: int = 0  # 0: the echo model, which has no scores to judge
    warm_up_seconds: float = 0.0
    max_length: int = 0
    gpu_memory_bytes: int = 0
    # What the pass planner weighs against padding (pool.runtime; measured at load on CPU).
    pass_overhead_tokens: int = 0

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> ReadyInfo:
        return cls(**known_fields(cls, raw))


@dataclass(slots=True)
class BatchStats:
    """A worker's running totals of how well batching and dedupe work (every heartbeat)."""

    batches: int = 0
    requests: int = 0
    texts: int = 0
    unique_texts: int = 0
    failed_batches: int = 0
    batch_items: int = 0  # pairs or texts, summed over batches
    # Where the time goes (pool.passes): the device thread computing or waiting for work,
    # and per request, summed: router to this worker's intake (the router's queue and the
    # transit), queued in the worker for a pass, and the pass it was in.
    device_busy_s: float = 0.0
    device_idle_s: float = 0.0
    request_transit_s: float = 0.0
    request_queued_s: float = 0.0
    request_pass_s: float = 0.0
    busy_percent: float = 0.0  # device busy over the last heartbeat interval
    # per bucket of BATCH_SIZE_BUCKETS, plus one for larger batches
    batch_size_counts: list[int] = field(
        default_factory=lambda: [0] * (len(BATCH_SIZE_BUCKETS) + 1))

    def count_times(self, busy_s: float, idle_s: float, transit_s: float, queued_s: float,
                    pass_s: float) -> None:
        self.device_busy_s += busy_s
        self.device_idle_s += idle_s
        self.request_transit_s += transit_s
        self.request_queued_s += queued_s
        self.request_pass_s += pass_s

    def count_batch(self, requests: int, texts: int, unique_texts: int, items: int) -> None:
        self.batches += 1
        self.requests += requests
        self.texts += texts
        self.unique_texts += unique_texts
        self.batch_items += items
        self.batch_size_counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, items)] += 1

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> BatchStats:
        return cls(**known_fields(cls, raw))

    def as_dict(self) -> dict:
        return asdict(self)


def known_fields(record: type, raw: bytes) -> dict[str, Any]:
    """The JSON object `raw`, keeping the keys `record` has: a newer worker may say more."""
    doc = orjson.loads(raw)
    return {name: doc[name] for name in record.__dataclass_fields__ if name in doc}
