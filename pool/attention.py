"""Attention for a CPU graph's narrow passes: the softmax in fp32, written for the width.

A pass of short sentences spends much of its attention in the softmax over rows as long as
the pass is wide, and torch's CPU softmax is slow and uneven there ([64, 12, W, W], one
thread): bf16 0.8-5.0 ms from W = 12 to 30; fp32 0.23-0.86 ms from W = 16 but 2.0-2.3 ms
below 16, where a softmax written out of max, exp and sum takes 0.34 ms (and 2.8 ms at 24).
So a CPU encoder traces a graph per width band (pool.runtime.Encoder): up to
NARROW_PASS_TOKENS the written-out softmax, up to SHORT_PASS_TOKENS torch's in fp32, wider
the model's own attention (SDPA's flash kernel). multilingual-e5-small bf16, 64 texts, a
whole pass: 1.09x at 12 tokens, 1.06x at 17, 1.25x at 24, 1.29x at 30 against the plain
attention in bf16 (docs/benchmarks.md, session 20). In fp32 the band below 16 gains alike.

Registered with transformers under NARROW and SHORT, with its plain (additive) mask; a
model whose attention does not go through transformers' registry keeps its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

NARROW = "zeropool_narrow"
SHORT = "zeropool_short"
NARROW_PASS_TOKENS = 15  # torch's fp32 softmax is slow below a 16-lane vector
SHORT_PASS_TOKENS = 32  # wider, SDPA's flash kernel wins (session 12's measurements)


def written_out_softmax(scores: torch.Tensor) -> torch.Tensor:
    top = scores.amax(dim=-1, keepdim=True)
    weights = (scores - top).exp()
    return weights / weights.sum(dim=-1, keepdim=True)


def _attention(softmax: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """transformers' eager attention, with its scores and softmax in fp32."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0,
                  **_kwargs: Any) -> tuple[torch.Tensor, None]:
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
        if attention_mask is not None:
            scores = scores + attention_mask  # additive: 0, or the dtype's most negative
        weights = softmax(scores).to(value.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), None

    return attention


@functools.cache  # once a process: transformers' registries are global
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    for name, softmax in ((NARROW, written_out_softmax),
                          (SHORT, functools.partial(torch.softmax, dim=-1))):
        AttentionInterface.register(name, _attention(softmax))
        AttentionMaskInterface.register(name, eager_mask)
