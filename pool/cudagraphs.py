"""CUDA graphs of a model's forward pass (and pooling), one per (rows, width) bucket.

On a GPU a small model's pass is bound by the CPU, not the device: transformers' Python and
some hundred kernel launches take longer than the kernels themselves, and a worker's intake
thread wants the same core (an H200 ran MiniLM ~5% busy at 5,350 pairs/s while the worker
used a whole core; docs/benchmarks.md, session 11). A captured graph replays all of a pass's
kernels in one launch with no Python in between.

A graph has fixed shapes, so a pass is padded up to the next bucket: extra rows are one pad
token each (their outputs are dropped), extra columns are masked out of attention and
pooling, as the width padding of eager passes always was. Graphs are captured at first use
of their bucket, the commonest ones (every row count at short widths) when the worker
warms up, so a request rarely waits for a capture.

All graphs share one memory pool. That is safe because they replay one at a time, on one
thread, and each output is copied off the device before the next replay: a graph captured
earlier may reuse, as scratch, memory that holds a later graph's output.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Rows (texts) per pass: steps of at most 1.5x, so padding costs at most a third of a pass.
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Widths (tokens): short sentences are the common case, so their buckets are finest.
WIDTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Past the last bucket above, steps of this (padding costs at most a third of a pass), whole
# multiples of BUCKET_ROUNDING.
BUCKET_STEP = 1.5
BUCKET_ROUNDING = 64
# Captured while the worker warms up: every row bucket at these widths (68 graphs).
WARM_WIDTHS = (16, 32, 48, 64)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Padder = Callable[[Sequence[Sequence[int]], int], tuple[np.ndarray, np.ndarray]]


def bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `value` (buckets ascending; the last holds all)."""
    return buckets[min(bisect.bisect_left(buckets, value), len(buckets) - 1)]


def buckets_up_to(limit: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """`buckets` below `limit`, on in steps of at most BUCKET_STEP (multiples of
    BUCKET_ROUNDING) past the last of them, then `limit` itself: the last bucket holds
    everything. A long-context model (8,192 tokens) must not pad a 600-token text to 8,192."""
    below = [b for b in buckets if b < limit]
    while below and below[-1] * BUCKET_STEP < limit:
        below.append(int(below[-1] * BUCKET_STEP) // BUCKET_ROUNDING * BUCKET_ROUNDING)
    return (*below, limit)


@dataclass(slots=True)
class Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # static inputs, [rows, width] on the device
    mask: torch.Tensor
    out: torch.Tensor  # static output, [rows, dim] float32


class CudaGraphs:
    """Runs `forward(ids, mask) -> vectors` through a captured graph per bucket."""

    def __init__(self, forward: Forward, device: torch.device, pad_id: int, max_rows: int,
                 max_length: int, padder: Padder) -> None:
        self._forward = forward
        self.device = device
        self.pad_id = pad_id
        self.rows = buckets_up_to(max_rows, ROW_BUCKETS)
        self.widths = buckets_up_to(max_length, WIDTH_BUCKETS)
        self._padder = padder
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, int], Captured] = {}
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._graphs)

    def padded(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """`ids` and their mask padded to their bucket: extra rows of one pad token each."""
        rows = bucket(len(ids), self.rows)
        width = bucket(max(map(len, ids)), self.widths)
        return self._padder(ids + [[self.pad_id]] * (rows - len(ids)), width)

    @torch.inference_mode()
    def run(self, ids: list[list[int]]) -> torch.Tensor:
        """Normalised vectors (float32, on the CPU) of `ids`, at most the largest row bucket."""
        matrix, mask = self.padded(ids)
        rows, width = (int(n) for n in matrix.shape)
        captured = self._graphs.get((rows, width))
        if captured is None:
            captured = self.capture(rows, width)
            # Its eager pass's peak stays in torch's cache otherwise: memory the pool reads
            # as used (a surge rotation's room) for the worker's whole life.
            torch.cuda.empty_cache()
        captured.ids.copy_(torch.from_numpy(matrix).pin_memory(), non_blocking=True)
        captured.mask.copy_(torch.from_numpy(mask).pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.out[:len(ids)].cpu()

    @torch.inference_mode()
    def warm(self, widths: Sequence[int] = WARM_WIDTHS) -> None:
        """Capture every row bucket at the given widths (those this model allows)."""
        for width in sorted({bucket(w, self.widths) for w in widths}):
            for rows in self.rows:
                if (rows, width) not in self._graphs:
                    self.capture(rows, width)

    @torch.inference_mode()
    def capture(self, rows: int, width: int) -> Captured:
        started = time.perf_counter()
        ids = torch.full((rows, width), self.pad_id, dtype=torch.int64, device=self.device)
        mask = torch.zeros((rows, width), dtype=torch.int64, device=self.device)
        mask[:, 0] = 1
        # One eager pass first, on a side stream as torch asks: kernel selection, cuBLAS
        # workspaces and lazy initialisation must not happen inside a capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(ids, mask)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(ids, mask)
        captured = Captured(graph, ids, mask, out)
        self._graphs[(rows, width)] = captured
        self.capture_seconds += time.perf_counter() - started
        return captured
