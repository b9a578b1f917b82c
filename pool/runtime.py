"""The model runtime: one transformers encoder on one device, the seed's score semantics.

Mean pooling over the attention mask, L2 normalisation, cosine. Texts are deduplicated,
sorted by token length and split into the forward passes that cost least: each pass is
padded only to its own longest text, and a pass has a fixed cost of its own, so short
texts go together with long ones only when another pass would cost more than the padding.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from pool import attention, config, fusion
from pool.attention import NARROW_PASS_TOKENS, SHORT_PASS_TOKENS
from pool.cudagraphs import CudaGraphs
from pool.health import GOLDEN_PAIRS
from pool.modeldir import DEFAULT_POOLING, max_seq_length_of, pooling_of, prompts_of

log = logging.getLogger("zeropool.runtime")

# Texts per forward pass after sorting by length; bounds activation memory on long inputs.
# A GPU pass costs about the same from one text to hundreds (launch-bound), and a GPU
# worker's batches are bounded by tokens as well (pool.config.GPU_MAX_BATCH_TOKENS).
CHUNK_TEXTS = {"cpu": 128, "cuda": 1024}
# CUDA: a pass's width is rounded up to a multiple of this. Tensor cores take fp16 in tiles
# of 8, and fewer distinct shapes mean fewer kernel selections; padding is masked out of
# attention and pooling, so embeddings do not change.
CUDA_WIDTH_MULTIPLE = 8
# CPU passes in bf16 / fp16 run oneDNN primitives, each made for one input shape: making one
# costs ~7 ms (a 384 -> 384 linear, AMX) and keeping it ~0.7 MB, and torch keeps up to 1,024
# in each of two caches (oneDNN's, ideep's). On every (rows, width) a stream of requests
# brings, a MiniLM bf16 worker's RSS grew from 0.5 to ~1.9 GB, and passes of new shapes made
# primitives all along. So those passes go on a grid of shapes: width up to a multiple of
# GRID_STEP (padding, masked), rows up to a multiple of the step of GRID_ROW_STEPS for
# their size (repeating a text of the pass): little padding, few shapes
# (docs/benchmarks.md, session 22). fp32 goes through MKL's GEMM, which keeps nothing per
# shape: no grid.
GRID_STEP = 4
GRID_ROW_STEPS = ((4, 1), (64, 4), (256, 16))  # (up to this many rows, step)
GRID_ROW_STEP_PAST = 64  # past the last of them
# The fixed cost of one forward pass (Python, dispatch, kernel launches), in the time it takes
# to compute this many tokens: what the pass planner weighs against padding. It is the
# model's own, so a CPU encoder measures it at load (Encoder.measure_pass_cost): a
# 2-layer BERT, whose passes are mostly overhead, ~160-280 tokens' worth; MiniLM at one
# thread 25-45 (fp32) and 27-110 (bf16) (benchmarks/forward_cost.py). CUDA: launches dominate
# small batches, so padding is nearly free (assumed; not measured yet).
FORWARD_OVERHEAD_TOKENS = {"cpu": 48, "cuda": 1024}
# The measurement: the best of a few passes of one row and of OVERHEAD_ROWS rows, each
# OVERHEAD_WIDTH tokens wide (short sentences, the case where the plan matters). Passes are
# repeated up to OVERHEAD_REPEATS times within OVERHEAD_BUDGET_S a shape (at least twice):
# ~15 ms of load for a 2-layer BERT, 0.25 s for MiniLM, 0.5 s (of 8) for multilingual-e5-small
# in fp32. The result is clamped to OVERHEAD_TOKENS_RANGE: no lower than the constant CPU
# passes were planned with before, since MiniLM planned as well at anything from 24 to 96 and
# a load beside busy workers measures low (a preempted bigger pass looks dearer per token); no
# higher than one padded pass for every batch of short texts.
OVERHEAD_WIDTH = 16
OVERHEAD_ROWS = 16
OVERHEAD_REPEATS = 9
OVERHEAD_BUDGET_S = 0.1
OVERHEAD_TOKENS_RANGE = (FORWARD_OVERHEAD_TOKENS["cpu"], 1024)
# Padded tokens per pass (a text alone may be more). A pass is the device thread's unit of
# progress, and a worker whose pass shows none for HEARTBEAT_S x HEARTBEAT_LIVENESS (30 s) is
# killed as hung: a CPU encoder sizes its passes to about CHUNK_SECONDS of compute as measured
# at load (16-token rows; long texts cost more a token, attention growing with width: ~1.5x
# for a 12-layer, 384-wide model at 512 tokens), within CHUNK_TOKENS_RANGE. Short sentences
# never reach it (128 rows of 16 tokens: 2,048). A GPU pass is bounded for its memory: 128
# texts of 512 tokens, where 1,024 of them once made one pass 32 times the batch budget.
CHUNK_SECONDS = 2.0
CHUNK_TOKENS_RANGE = (2_048, 65_536)
CHUNK_TOKENS = {"cpu": 16_384, "cuda": 65_536}  # when not measured


# CPU passes run the graph traced for their width (pool.attention): up to NARROW_PASS_TOKENS
# with a written-out fp32 softmax, up to SHORT_PASS_TOKENS with torch's fp32 softmax, wider
# with the model's own attention (SDPA's flash kernel, whose blocking costs more than it saves
# on short sentences: MiniLM bf16, session 12, plain attention 1.08x SDPA at ~13 tokens, 1.02x
# at ~40, 0.99x at ~100, 0.94x at ~250). The graphs share one set of weights (~11 MB each).

# CPU flags of native bf16 arithmetic (/proc/cpuinfo): where one is present, bf16 runs a
# BERT ~3x faster than fp32 (docs/benchmarks.md); elsewhere torch emulates it, slower.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = "/proc/cpuinfo"
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
assert set(DTYPES) | {"auto"} == set(config.DTYPE_NAMES)


def cpu_flags(cpuinfo: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there to say)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(dtype: str, device: str,
                  flags: Callable[[], frozenset[str]] = cpu_flags) -> torch.dtype:
    """`auto`: fp16 on CUDA; bf16 on a CPU with native bf16 (AVX512_BF16 or AMX), else fp32.
    Pooling and cosine stay fp32 whatever the weights run in (Encoder._forward)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if flags() & NATIVE_BF16_FLAGS else torch.float32


def plan_free_attention() -> None:
    """Keep torch's attention off cuDNN in this process.

    torch picks cuDNN attention first on Hopper, and cuDNN builds a plan for every new
    (rows, tokens) shape: 70 ms median and up to 420 ms per new shape on an H200, against
    14 ms for the whole forward pass. Dynamic batching makes new shapes all the time, so
    a pool's p99 went to the plan builds (82 ms, max 1.2 s). The other fused kernels
    (flash, memory-efficient) need no plan: p99 27 ms, max 52 ms (docs/benchmarks.md,
    benchmarks/new_shapes.py).
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


# How far the traced graph's embeddings may be from the module's at load: it runs the same
# kernels (equal on the machines measured), so only summation-order noise is allowed.
GRAPH_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# How near a graph that rounds otherwise (fused linears, pool.fusion; a bf16 band's fp32
# softmax, pool.attention) must be to the module, as cosine: bf16 against fp32 is 0.9975 for
# a 32-wide test BERT and 0.99993 for MiniLM, the fused graph against the plain one 0.99997
# for both; a graph that reads the mask wrong was 0.957. (A bound on each coordinate would
# depend on the width: a unit vector's coordinates are ~1/sqrt(width).)
MIN_COSINE = 0.9995


@dataclass(frozen=True, slots=True)
class PassCost:
    """What a forward pass costs on this machine: its fixed part, in tokens' worth, and a
    token's compute (None: not measured, or noise hid it)."""

    overhead_tokens: int
    seconds_per_token: float | None

    def chunk_tokens(self) -> int | None:
        """Padded tokens of about CHUNK_SECONDS of compute (None: unknown)."""
        if not self.seconds_per_token:
            return None
        low, high = CHUNK_TOKENS_RANGE
        return min(max(int(CHUNK_SECONDS / self.seconds_per_token), low), high)


@dataclass(frozen=True, slots=True)
class TracedGraphs:
    """A CPU model's graphs by pass width, all of the same weights: each with the attention
    that is fastest at its widths (pool.attention). On CUDA one graph serves every width."""

    narrow: torch.jit.ScriptModule  # up to NARROW_PASS_TOKENS
    short: torch.jit.ScriptModule  # up to SHORT_PASS_TOKENS
    wide: torch.jit.ScriptModule

    def for_width(self, width: int) -> torch.jit.ScriptModule:
        if width <= NARROW_PASS_TOKENS:
            return self.narrow
        return self.short if width <= SHORT_PASS_TOKENS else self.wide


@dataclass(frozen=True, slots=True)
class GraphInputs:
    """What a CPU graph is traced on (`example`: a few golden texts) and checked on (`check`:
    all of them, another batch size and width), with the module's embeddings of `check`."""

    example: dict[str, torch.Tensor]
    check: dict[str, torch.Tensor]
    want: torch.Tensor


class ModelWeightsError(ValueError):
    """A checkpoint that does not fill the model its config.json describes."""


# Weights a checkpoint may lack: mean pooling never reads BERT's pooler, and
# sentence-transformers checkpoints often leave it out.
UNUSED_WEIGHTS_PREFIX = "pooler."


def load_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model at `path`; ModelWeightsError naming the first weight whose shape is not the
    config's, or that the checkpoint lacks. transformers' own refusal of a misfit says only
    "look at the above report" (in a worker's log), and it loads a lacking weight as random
    numbers, which the health check's self-similarities cannot tell from the real ones."""
    model, info = AutoModel.from_pretrained(path, dtype=dtype, ignore_mismatched_sizes=True,
                                            output_loading_info=True)
    misfits = sorted(info.get("mismatched_keys") or [])
    if misfits:
        name, stored, wanted = misfits[0]
        raise ModelWeightsError(
            f"the weights do not fit config.json: {name} is {list(stored)} in the checkpoint, "
            f"{list(wanted)} by the config ({len(misfits)} weights in all)")
    lacking = sorted(k for k in info.get("missing_keys") or []
                     if not k.startswith(UNUSED_WEIGHTS_PREFIX))
    if lacking:
        raise ModelWeightsError(f"the checkpoint lacks {len(lacking)} of the model's weights "
                                f"(the first: {lacking[0]}): they would be random numbers")
    return model


class GraphCheckFailed(RuntimeError):
    """The TorchScript graph of a model does not compute what the model does."""


class Encoder:
    """Loads one model version and turns texts into normalised sentence embeddings.

    `graph`: how the forward pass runs. "eager" calls the transformers module. "traced" runs
    a TorchScript graph of it (traced on a padded batch of the golden texts, frozen, then
    checked against the module on another batch: identical embeddings, or load fails; two
    graphs on CPU, one per width band, TracedGraphs),
    which skips the module's Python on every pass: 1.5-2.3x the passes per second of a
    small BERT on CPU, 1.3-1.7x for MiniLM (docs/benchmarks.md). "cudagraphs" (CUDA only)
    replays a captured CUDA graph per shape bucket (pool.cudagraphs), checked against the
    module at load the same way. "auto": traced on CPU, cudagraphs on CUDA, and eager where
    that cannot be built (the reason is kept in `graph_note`).
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "auto",
        chunk_texts: int | None = None,
        overhead_tokens: int | None = None,
        graph: str = "auto",
        chunk_tokens: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            plan_free_attention()
        self.dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(path, self.dtype)
        self.model = model.to(self.device).eval()
        self.pooling = pooling_of(Path(path))
        self.prompts = prompts_of(Path(path))  # put before texts by the worker's intake
        # What every path computes; traced on CPU.
        self.pooled = SentenceVectors(self.model, self.pooling).eval()
        self.max_length = _max_length(tokenizer, self.model, Path(path))
        self.pad_id = tokenizer.pad_token_id or 0
        # Token ids from here on have no embedding: a tokenizer shipped with another model.
        # None: the tokenizer makes none (what a pass would fail on, on CUDA for good).
        rows = self.model.get_input_embeddings().num_embeddings
        self.vocab_limit = rows if len(tokenizer) > rows else None
        # The wrapper is not kept, so its Rust tokenizer is taken over rather than copied.
        self.token_ids = TokenIdEncoder(tokenizer, self.max_length, take_over=True)
        self.chunk_texts = chunk_texts or CHUNK_TEXTS.get(self.device.type, CHUNK_TEXTS["cpu"])
        self.on_grid = self.device.type == "cpu" and self.dtype != torch.float32
        self.width_multiple = CUDA_WIDTH_MULTIPLE if self.device.type == "cuda" else \
            GRID_STEP if self.on_grid else 1
        self.dim = int(self.model.config.hidden_size)
        self.graph = "eager"
        self.graph_note = ""  # why auto stayed eager
        self._traced: TracedGraphs | None = None
        self._graphs: CudaGraphs | None = None
        self.fused_linears = 0  # linears the traced graph runs through oneDNN (pool.fusion)
        self.fusion_note = ""  # why a CPU bf16 graph kept torch's linears
        if graph not in config.GRAPH_NAMES:
            raise ValueError(f"graph must be one of {', '.join(config.GRAPH_NAMES)}, "
                             f"not {graph!r}")
        if graph == "cudagraphs" and self.device.type != "cuda":
            raise ValueError("--graph cudagraphs needs a CUDA device")
        wanted = {"cpu": "traced", "cuda": "cudagraphs"}.get(self.device.type, "eager") \
            if graph == "auto" else graph
        builders = {"traced": self._trace, "cudagraphs": self._capture_graphs}
        if wanted in builders:
            try:
                built = builders[wanted]()
            except Exception as exc:  # any model a graph cannot follow: eager still serves
                if graph != "auto":
                    raise
                self.graph_note = f"{wanted}: {type(exc).__name__}: {exc}"[:300]
            else:
                self.graph = wanted
                if wanted == "traced":
                    self._traced = built
                else:
                    self._graphs = built
        measured = PassCost(FORWARD_OVERHEAD_TOKENS.get(self.device.type, 0), None)
        if overhead_tokens is None and self.device.type == "cpu":
            measured = self.measure_pass_cost()
        self.overhead_tokens = measured.overhead_tokens if overhead_tokens is None \
            else overhead_tokens
        self.chunk_tokens = chunk_tokens or measured.chunk_tokens() or \
            CHUNK_TOKENS.get(self.device.type, CHUNK_TOKENS["cpu"])

    def _trace(self) -> TracedGraphs:
        """The graphs of the model's passes; CPU bf16 traces a copy of it with its linears
        through oneDNN (pool.fusion), or the model itself where that copy fails. Every graph
        is checked against the same pass of the module (GraphInputs), made once."""
        inputs = self._graph_inputs()
        if fusion.fusable(self.device, self.dtype):
            try:
                fused, moved = fusion.fused_copy(self.model)
                graphs = self._trace_model(fused, True, inputs)
            except Exception as exc:  # a model the fusion does not fit: torch's linears
                self.fusion_note = f"{type(exc).__name__}: {exc}"[:300]
            else:
                self.fused_linears = moved
                return graphs
        return self._trace_model(self.model, False, inputs)

    def _graph_inputs(self) -> GraphInputs:
        texts = [t for pair in GOLDEN_PAIRS for t in pair]
        check = self._batch(self.token_ids(texts))  # another batch size and width
        with torch.inference_mode():
            # The model as transformers runs it: a graph that computes otherwise (a mask read
            # wrong, a fusion gone wrong) fails its check against this.
            want = self.pooled(check["input_ids"], check["attention_mask"])
        return GraphInputs(self._batch(self.token_ids(texts[:3])), check, want)

    def _trace_model(self, model: torch.nn.Module, fused: bool,
                     inputs: GraphInputs) -> TracedGraphs:
        """A graph with the model's own attention, and on CPU one per narrower band with
        pool.attention's (where the model's attention goes through transformers' registry;
        else its own serves those widths too)."""
        own = model.config._attn_implementation
        wide = self._trace_with(model, own, fused, inputs)
        if self.device.type != "cpu":  # a GPU's fused kernels win at any width
            return TracedGraphs(wide, wide, wide)
        attention.register()
        bands: dict[str, torch.jit.ScriptModule] = {}
        for band, name in (("short", attention.SHORT), ("narrow", attention.NARROW)):
            try:
                model.set_attn_implementation(name)
                # In bf16 a band's fp32 softmax rounds otherwise than the model's attention.
                bands[band] = self._trace_with(model, name,
                                               fused or self.dtype != torch.float32, inputs)
            except Exception as exc:  # an attention of the model's own making
                log.warning("passes up to %s tokens run the model's own attention: %s: %s",
                            band, type(exc).__name__, str(exc)[:200])
                bands[band] = bands.get("short", wide)
            finally:
                model.set_attn_implementation(own)
        return TracedGraphs(bands["narrow"], bands["short"], wide)

    def _trace_with(self, model: torch.nn.Module, attention: str, rounded_otherwise: bool,
                    inputs: GraphInputs) -> torch.jit.ScriptModule:
        example, check = inputs.example, inputs.check
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values in the model
            traced = torch.jit.trace(SentenceVectors(model, self.pooling).eval(),
                                     (example["input_ids"], example["attention_mask"]),
                                     strict=False, check_trace=False)  # checked below, once
            graph = torch.jit.freeze(traced.eval())
        with torch.inference_mode():
            for _ in range(2):  # the first run profiles the graph, the next runs it optimised
                got = graph(check["input_ids"], check["attention_mask"])
        problem = embeddings_differ(got, inputs.want, self.dtype, rounded_otherwise)
        if problem:
            raise GraphCheckFailed(f"its embeddings ({attention} attention) {problem}")
        return graph

    def _capture_graphs(self) -> CudaGraphs:
        pad = self.pad_id
        graphs = CudaGraphs(self._graph_forward, self.device, pad, self.chunk_texts,
                            self.max_length, lambda ids, width: padded(ids, pad, width=width))
        ids = self.token_ids([t for pair in GOLDEN_PAIRS for t in pair])
        matrix, mask = graphs.padded(ids)  # the same padded batch the graph replays
        with torch.inference_mode():
            got = graphs.run(ids)
            # Against the module as transformers runs it (a 2-D mask), not against the
            # graph's own forward: a mask the graph reads wrong must fail here.
            want = self.pooled(torch.from_numpy(matrix).to(self.device),
                               torch.from_numpy(mask).to(self.device))[:len(ids)].cpu()
        problem = embeddings_differ(got, want, self.dtype)
        if problem:
            raise GraphCheckFailed(f"its embeddings {problem}")
        return graphs

    def _graph_forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A pass with no host synchronisation in it, as a CUDA graph needs: the attention
        mask goes in already 4-D, so transformers takes it as it is instead of asking the
        device whether any token is masked. Additive (0 to attend, the dtype's most negative
        number for padding), as every attention reads it: a boolean one is right for SDPA
        but plain attention (MPNet's only) adds it as 0 / 1 and attends to the padding."""
        blocked = 1.0 - mask[:, None, None, :].to(self.dtype)
        additive = blocked * torch.finfo(self.dtype).min
        hidden = self.model(input_ids=input_ids, attention_mask=additive).last_hidden_state
        return sentence_vectors(hidden, mask, self.pooling)

    def measure_pass_cost(self) -> PassCost:
        """This model's fixed cost of a pass on this machine, in tokens' worth of its
        compute, and its cost a token: from the best pass of one row and of OVERHEAD_ROWS
        rows (after an untimed one, which may profile a graph)."""
        golden = self.token_ids([GOLDEN_PAIRS[0][0]])[0]
        inner = golden[1:-1] or golden
        row = [golden[0], *itertools.islice(itertools.cycle(inner), OVERHEAD_WIDTH - 2),
               golden[-1]]

        def best_seconds(rows: int) -> float:
            ids = [row] * rows
            with torch.inference_mode():
                self._forward(ids)
                times: list[float] = []
                while len(times) < 2 or (len(times) < OVERHEAD_REPEATS
                                         and sum(times) < OVERHEAD_BUDGET_S):
                    start = time.perf_counter()
                    self._forward(ids)
                    times.append(time.perf_counter() - start)
            return min(times)

        one_row, rows = best_seconds(1), best_seconds(OVERHEAD_ROWS)
        per_token = (rows - one_row) / ((OVERHEAD_ROWS - 1) * OVERHEAD_WIDTH)
        return PassCost(fixed_cost_tokens(one_row, rows, OVERHEAD_ROWS, OVERHEAD_WIDTH),
                        per_token if per_token > 0 else None)

    def _batch(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token ids padded to the longest (up to the next multiple of `width_multiple`: on
        CUDA, and on the CPU's grid), with their attention mask, on the device. A GPU's copy is from
        pinned memory, so it is asynchronous: the pass queues behind it without a wait."""
        input_ids, mask = padded(ids, self.pad_id, self.width_multiple)
        batch = {"input_ids": torch.from_numpy(input_ids),
                 "attention_mask": torch.from_numpy(mask)}
        if self.device.type != "cuda":
            return batch
        return {name: tensor.pin_memory().to(self.device, non_blocking=True)
                for name, tensor in batch.items()}

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised embeddings (float32, on CPU), one row per text, in input order."""
        return self.embed_tokens(self.token_ids(texts))

    @torch.inference_mode()
    def embed_tokens(self, ids: list[list[int]],
                     on_chunk: Callable[[], None] | None = None) -> torch.Tensor:
        """`embed` of texts already tokenised by `token_ids`; `on_chunk` after each pass of
        it (a long one makes progress a pass at a time)."""
        if not ids:
            return torch.empty((0, self.dim))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        step = self.width_multiple  # planned at the widths its passes will run at
        lengths = [round_up(len(ids[i]), step) for i in order]
        out = torch.empty((len(ids), self.dim))
        for start, end in plan_chunks(lengths, self.overhead_tokens, self.chunk_texts,
                                      self.chunk_tokens):
            chunk = order[start:end]
            out[chunk] = self._forward([ids[i] for i in chunk])
            if on_chunk is not None:
                on_chunk()
        return out

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        if self._graphs is not None:
            return self._graphs.run(ids)
        rows = len(ids)
        filler = grid_rows(rows) - rows if self.on_grid else 0
        return self._vectors(self._batch(ids + [ids[0]] * filler))[:rows].cpu()

    def _vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pass's sentence vectors (fp32, normalised), from one graph call where traced."""
        if self._traced is not None:
            graph = self._traced.for_width(batch["input_ids"].shape[1])
            try:
                return graph(batch["input_ids"], batch["attention_mask"])
            except Exception:
                # A graph's error is the TorchScript interpreter's traceback. The module then
                # raises the real error in its own words (an id beyond the vocabulary), or
                # computes the pass the graph could not.
                pass
        return self.pooled(batch["input_ids"], batch["attention_mask"])

    def similarity(self, pairs: list[tuple[str, str]]) -> list[float]:
        unique = list(dict.fromkeys(t for pair in pairs for t in pair))
        index = {t: i for i, t in enumerate(unique)}
        vectors = self.embed(unique)
        a = vectors[[index[x] for x, _ in pairs]]
        b = vectors[[index[y] for _, y in pairs]]
        return (a * b).sum(dim=1).tolist()

    def warm_up(self) -> float:
        """Run the golden pairs once (first-call allocations, kernel selection); seconds."""
        start = time.perf_counter()
        if self._graphs is not None:
            self._graphs.warm()
        self.similarity(list(GOLDEN_PAIRS))
        return time.perf_counter() - start


def embeddings_differ(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                      rounded_otherwise: bool = False) -> str:
    """Why a graph's (normalised) embeddings are not the module's; "" when they are: within
    GRAPH_TOLERANCE of it in every coordinate, or for a graph that rounds otherwise (fused
    linears, pool.fusion; a bf16 band's fp32 softmax, pool.attention), at a cosine of
    MIN_COSINE or nearer for every text."""
    if got.shape != want.shape:
        return f"have shape {tuple(got.shape)}, not the model's {tuple(want.shape)}"
    if rounded_otherwise:
        worst = (got * want).sum(dim=1).min().item()
        if not worst >= MIN_COSINE:  # NaN too
            return f"are at cosine {worst:.5f} from the model's, under {MIN_COSINE}"
        return ""
    tolerance = GRAPH_TOLERANCE.get(dtype, GRAPH_TOLERANCE[torch.float16])
    if not (got - want).abs().max().item() <= tolerance:
        return f"differ from the model's by more than {tolerance}"
    return ""


class TokenIdEncoder:
    """texts -> their token ids, special tokens added, truncated to `max_length`; and, for a
    request that asks not to be truncated, which texts are longer than that.

    The same ids as `tokenizer(texts, truncation=True, max_length=max_length)`, from the
    Rust tokenizer inside it called directly: transformers builds a dict of lists per text
    and a BatchEncoding around them in Python, a third of a batch's tokenising time
    (benchmarks/tokenize_cost.py), and a GPU worker spends a quarter of its time tokenising.
    It works on a copy of that Rust tokenizer, as the wrapper resets its settings at every
    call; `take_over` (for a caller that calls the wrapper no more) sets up the wrapper's own
    instead: a 250,000-piece Unigram (XLM-R's, multilingual-e5's) holds ~280 MB of memory.
    """

    def __init__(self, tokenizer: Any, max_length: int, take_over: bool = False) -> None:
        self.max_length = max_length
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # no Rust core (a SentencePiece-only tokenizer): the slow way
            self._slow: Any = tokenizer
            self._rust: Tokenizer | None = None
            return
        self._slow = None
        self._rust = backend if take_over else Tokenizer.from_str(backend.to_str())
        self._rust.no_padding()
        self._rust.enable_truncation(max_length, direction=tokenizer.truncation_side)
        self._specials = self._rust.num_special_tokens_to_add(is_pair=False)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._rust is None:
            return self._slow(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [encoding.ids for encoding in self._rust.encode_batch_fast(texts)]

    def over_limit(self, texts: list[str]) -> dict[int, int]:
        """{index: its length in tokens} of each text longer than `max_length`. Tokenises
        again, so only for requests that ask not to be truncated (protocol's `truncate`)."""
        if self._rust is None:
            lengths = map(len, self._slow(texts, truncation=False)["input_ids"])
        else:  # a truncated text's cut-off tokens are in its overflowing pieces, each with
            # the special tokens again (no stride)
            lengths = (len(e.ids) + sum(len(o.ids) - self._specials for o in e.overflowing)
                       for e in self._rust.encode_batch_fast(texts))
        return {i: n for i, n in enumerate(lengths) if n > self.max_length}


def padded(ids: Sequence[Sequence[int]], pad: int, width_multiple: int = 1,
           width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as one int64 matrix padded to the longest row (rounded up to a multiple of
    `width_multiple`) or to `width`, and its attention mask. Filled through a boolean mask
    in one operation: 15x faster than padding Python lists for 64 texts, ~30 us a pass."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if width is None:
        width = round_up(int(lengths.max()), width_multiple)
    mask = np.arange(width) < lengths[:, None]
    matrix = np.full((len(ids), width), pad, dtype=np.int64)
    matrix[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                               count=int(lengths.sum()))
    return matrix, mask.astype(np.int64)


def grid_rows(rows: int) -> int:
    """The rows a pass of `rows` texts runs with on the grid (GRID_ROW_STEPS)."""
    step = next((step for limit, step in GRID_ROW_STEPS if rows <= limit), GRID_ROW_STEP_PAST)
    return round_up(rows, step)


def round_up(value: int, step: int) -> int:
    """`value` rounded up to a multiple of `step`."""
    return -(-value // step) * step


def fixed_cost_tokens(one_row_s: float, rows_s: float, rows: int, width: int) -> int:
    """A pass's fixed cost in tokens' worth, from the time of a pass of one row and of `rows`
    rows, all `width` tokens wide (a straight line through the two), in
    OVERHEAD_TOKENS_RANGE; its top where noise made the bigger pass no dearer."""
    low, high = OVERHEAD_TOKENS_RANGE
    per_token = (rows_s - one_row_s) / ((rows - 1) * width)
    if per_token <= 0:
        return high
    fixed = one_row_s - width * per_token
    return min(max(round(fixed / per_token), low), high)


def plan_chunks(
    lengths: Sequence[int], overhead_tokens: int, max_rows: int, max_tokens: int = 0
) -> list[tuple[int, int]]:
    """Split texts sorted by token length into `[start, end)` forward passes of least cost.

    A pass of at most `max_rows` texts, and (if `max_tokens`) at most `max_tokens` padded
    tokens (one text alone may be more), costs its rows x its longest length (padding
    included) plus `overhead_tokens`. Some plan of least cost starts every pass where the
    length changes or right after a full pass (one that cannot take its next text): a pass
    starting inside a run of equal lengths can hand its first text to the pass before (at
    that pass's own width) for nothing more, and saves its own width on it. So the plan is a
    dynamic programme over runs of equal length, each group of runs cut into full passes
    from its start.
    """
    if not lengths:
        return []
    if max_tokens and max_rows * lengths[-1] <= max_tokens:
        max_tokens = 0  # no pass could reach it: the plain row limit, as fast as ever
    full_rows = _full_rows(lengths, max_rows, max_tokens)
    ends = [i + 1 for i in range(len(lengths)) if i + 1 == len(lengths)
            or lengths[i + 1] != lengths[i]]
    starts = [0, *ends[:-1]]
    best = [0] + [-1] * len(ends)  # best[j]: least cost of the first j runs; -1: none yet
    cut = [0] * (len(ends) + 1)  # the run where the last group of best[j] begins
    for i, start in enumerate(starts):
        full_end, full_cost = start, 0  # the full passes of the group starting at run i
        for j in range(i + 1, len(ends) + 1):
            end = ends[j - 1]
            while end - full_end > (rows := full_rows(full_end)):
                full_end += rows
                full_cost += rows * lengths[full_end - 1] + overhead_tokens
            rest = end - full_end
            cost = best[i] + full_cost + (rest * lengths[end - 1] + overhead_tokens if rest else 0)
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    passes: list[tuple[int, int]] = []
    j = len(ends)
    while j:
        group: list[tuple[int, int]] = []
        at, end = starts[cut[j]], ends[j - 1]
        while at < end:
            rows = min(full_rows(at), end - at)
            group.append((at, at + rows))
            at += rows
        passes[:0] = group
        j = cut[j]
    return passes


def _full_rows(lengths: Sequence[int], max_rows: int,
               max_tokens: int) -> Callable[[int], int]:
    """How many texts a full pass starting at text `start` holds (lengths ascending): up to
    max_rows, and while rows x the last one's length stays within max_tokens (at least one)."""
    count = len(lengths)
    if not max_tokens:
        return lambda start: max_rows
    known: dict[int, int] = {}

    def rows_from(start: int) -> int:
        if start not in known:
            low, high = 1, min(max_rows, count - start)  # the answer is in [low, high]
            while low < high:
                mid = (low + high + 1) // 2
                if mid * lengths[start + mid - 1] <= max_tokens:
                    low = mid
                else:
                    high = mid - 1
            known[start] = low
        return known[start]

    return rows_from


class SentenceVectors(torch.nn.Module):
    """The model and its pooling as one module, traced as one graph: a pass is then one call
    that holds no GIL, where pooling op by op from Python took and released it a dozen
    times, each a wait while the worker's other thread runs Python."""

    def __init__(self, model: torch.nn.Module, pooling: str = DEFAULT_POOLING) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return sentence_vectors(hidden, attention_mask, self.pooling)


def sentence_vectors(hidden: torch.Tensor, mask: torch.Tensor,
                     pooling: str = DEFAULT_POOLING) -> torch.Tensor:
    """A pass's sentence embeddings, L2-normalised, in fp32 whatever the weights ran in:
    pooled as the model says (pool.modeldir.pooling_of; the seed's mean by default)."""
    return normalize(POOLINGS[pooling](hidden.float(), mask))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    padding = (mask == 0).unsqueeze(-1)
    return hidden.masked_fill(padding, torch.finfo(hidden.dtype).min).max(dim=1).values


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real token: passes are padded on the right (`padded`)."""
    last = mask.sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS = {"mean": mean_pool, "cls": cls_pool, "max": max_pool, "lasttoken": last_token_pool}


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def _max_length(tokenizer: Any, model: torch.nn.Module, path: Path) -> int:
    """The longest input, in tokens: the tokenizer's limit; the position table's, which in
    the RoBERTa family (XLM-R, e5, MPNet) begins past the padding index; and a
    sentence-transformers model's own `max_seq_length` (all-MiniLM-L6-v2: 256, where its
    tokenizer allows 512), which sentence-transformers, text-embeddings-inference and Infinity
    truncate at: a long text's vector is theirs."""
    positions = getattr(model.config, "max_position_embeddings", None)
    offset = getattr(getattr(model, "embeddings", None), "padding_idx", None)
    if positions and isinstance(offset, int):
        positions -= offset + 1
    limits = [positions, tokenizer.model_max_length, max_seq_length_of(path)]
    return int(min(x for x in limits if x and x < 1_000_000))

