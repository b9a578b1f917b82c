"""A CPU bf16 model's linears through oneDNN, with the feed-forward GELU folded into them.

In a bf16 BERT pass on a CPU with AMX, torch's `nn.Linear` is `addmm`, which first copies
the bias into its output (a tenth of a MiniLM pass), and the feed-forward GELU is a kernel
of its own over activations four times the hidden width, in bf16 slower than the matrix
product before it (a sixth of the pass). oneDNN's linear adds the bias and applies the
GELU as it writes its output (in fp32, rounded to bf16 once). MiniLM, one thread, 64-128
texts of ~17 tokens: 1.09-1.37x the passes of the plain graph; multilingual-e5-small
1.02-1.11x (docs/benchmarks.md, session 20). Embeddings move by up to 3e-3 (one rounding
fewer a layer), so the graph is checked against the model by cosine
(pool.runtime.embeddings_differ, MIN_COSINE).

Each linear's weight is reordered once into oneDNN's own blocked layout: given torch's
layout, oneDNN reorders it again on every call, a fixed cost of every pass (37 of 84 us of
a 13-row MiniLM feed-forward linear; ~1.3 ms of a 1-text MiniLM pass).

The encoder traces `fused_copy(model)`, a copy that shares the model's other weights; the
model itself stays as transformers runs it, the reference the graph is checked against.
fp32 keeps torch's own linears: MKL's are as fast, and fp32 keeps its exact contract.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import List, Optional, Union  # noqa: UP035 - TorchScript reads these names

import torch

# config.hidden_act -> oneDNN's GELU algorithm ("none": the exact, erf one). Other
# activations stay a kernel of their own after a fused linear.
GELU_ALGORITHMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                   "gelu_fast": "tanh"}


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                      post: str, algorithm: str) -> torch.Tensor:
    # Scripted so that a trace records the op: the tracer cannot type its empty list.
    scalars: List[Optional[Union[int, float, complex]]] = []  # noqa: UP006, UP007, UP045
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, scalars, algorithm)


@functools.cache  # compiled on first use: a GPU worker never does
def linear_pointwise() -> torch.jit.ScriptFunction:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation: the graphs are traced
        return torch.jit.script(_linear_pointwise)


class OneDnnLinear(torch.nn.Module):
    """`nn.Linear` as one oneDNN call, optionally followed by a GELU in the same call; its
    weight a copy in oneDNN's layout (an opaque MKLDNN tensor, which a trace and a freeze
    keep as it is)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("weight", packed, persistent=False)
        self.bias = linear.bias
        self.post = "none"
        self.algorithm = ""
        self._call = linear_pointwise()

    def fold_gelu(self, algorithm: str) -> None:
        self.post, self.algorithm = "gelu", algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, self.weight, self.bias, self.post, self.algorithm)


def fusable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` gets oneDNN linears: CPU bf16, where oneDNN
    runs bf16 (torch asks for AVX-512; without it --dtype bfloat16 keeps torch's)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and \
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fused_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of `model` sharing its weights but the linears', every `nn.Linear` a
    OneDnnLinear and each feed-forward GELU folded into the linear before it; and how many
    linears moved."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fused = copy.deepcopy(model, memo=shared)
    gelu = GELU_ALGORITHMS.get(str(getattr(model.config, "hidden_act", "")))
    moved = 0
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, OneDnnLinear(child))
                moved += 1
        # The transformers feed-forward: `intermediate_act_fn(dense(x))` (BERT, XLM-R, MPNet).
        dense = getattr(module, "dense", None)
        if gelu and isinstance(dense, OneDnnLinear) and hasattr(module, "intermediate_act_fn"):
            dense.fold_gelu(gelu)
            module.intermediate_act_fn = torch.nn.Identity()
    return fused, moved

