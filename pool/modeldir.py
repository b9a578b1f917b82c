"""What a model directory must hold before a pool spends a worker on it.

`pool serve --path`, `pool versions add` and `pool rotate --path` check a directory here, in
milliseconds and without torch, so that a copy cut short or a wrong path is refused with the
file and the reason at once, not found by a worker minutes into a rotation. A directory that
passes can still fail to load (weights of another shape than its config says): a worker's
load finds that (pool.runtime.load_model names the weight), and the rotation rolls back.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

CONFIG = "config.json"
# Weights as transformers looks for them, in its order: one file, or shards and their index.
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# A tokenizer in any of the forms AutoTokenizer reads; those in JSON must parse.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model", "vocab.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
TORCH_ZIP_PICKLE = "/data.pkl"  # torch.save's zip holds <name>/data.pkl
PICKLE_PROTOCOL_2 = b"\x80"  # how a torch.save from before its zip format (torch < 1.6) starts
# A sentence-transformers model says how its token vectors make a sentence's: modules.json
# names its Pooling module's folder, whose config.json sets one pooling_mode_* true.
MODULES = "modules.json"
POOLING_MODULE = "sentence_transformers.models.Pooling"
# The modules a pool computes: the encoder, its pooling, and the L2 normalisation it always
# applies. Any other (a Dense projection, as LaBSE's) would be left out of every vector.
SERVED_MODULES = frozenset({"sentence_transformers.models.Transformer", POOLING_MODULE,
                            "sentence_transformers.models.Normalize"})
DEFAULT_POOLING_DIR = "1_Pooling"
# pooling_mode_* -> the name the runtime knows it by (pool.runtime.sentence_vectors).
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
# What a directory without a Pooling module gets: the seed's mean over the tokens.
DEFAULT_POOLING = "mean"
# A sentence-transformers model's own settings (max_seq_length), beside its transformers files.
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"
# Its prompts: texts put before each input ("query: " for e5), by name, and the one used when
# a request names none (sentence-transformers' encode does the same).
ST_CONFIG = "config_sentence_transformers.json"


@dataclass(frozen=True, slots=True)
class Prompts:
    """A model's named prompts and its default's name (None: a text is fed as given)."""

    named: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    def text_of(self, name: str | None) -> str:
        """The prompt a request gets: the one it names, else the default's; KeyError for a
        name the model has no prompt by."""
        name = name if name is not None else self.default
        return "" if name is None else self.named[name]


NO_PROMPTS = Prompts()


class ModelDirError(ValueError):
    """A directory that is not a loadable transformers model, and why."""


def check_model_dir(path: str) -> str:
    """The absolute path of a transformers model directory; ModelDirError saying which file
    is missing or broken otherwise."""
    if not path.strip():
        raise ModelDirError("the model's path is empty")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelDirError(f"{path} is not a directory")
    _check_config(directory)
    _check_weights(directory)
    _check_tokenizer(directory)
    pooling_of(directory)
    prompts_of(directory)
    return str(directory.resolve())


def pooling_of(directory: Path) -> str:
    """How the model's sentence vectors are made from its token vectors: its
    sentence-transformers Pooling module's mode ("mean", "cls", "max", "lasttoken"), else the
    seed's "mean". ModelDirError for a mode this pool does not compute, or several at once,
    or a module past the pooling it does not run: serving such a model otherwise would give
    vectors its authors never trained."""
    folder = _pooling_folder(directory)
    if folder is None:
        return DEFAULT_POOLING
    config = directory / folder / CONFIG
    if not config.is_file():
        raise ModelDirError(f"{config} is missing: the Pooling module {MODULES} names has no "
                            "config")
    # Truthy, as sentence-transformers reads them ("pooling_mode_cls_token": 1 is CLS).
    modes = [key for key, on in _json_object(config).items()
             if key.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        known = ", ".join(POOLING_MODES)
        raise ModelDirError(f"{config} asks for {' + '.join(modes) or 'no pooling mode'}: "
                            f"this pool pools by exactly one of {known}")
    return POOLING_MODES[modes[0]]


def prompts_of(directory: Path) -> Prompts:
    """The prompts config_sentence_transformers.json declares (none where it is missing).
    ModelDirError for prompts that are not names and texts, a default that is not one of
    them, or a Pooling module that leaves the prompt's tokens out (include_prompt: false),
    which this pool does not."""
    config = directory / ST_CONFIG
    if not config.is_file():
        return NO_PROMPTS
    doc = _json_object(config)
    named = doc.get("prompts") or {}
    if not isinstance(named, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
        raise ModelDirError(f"{config}: \"prompts\" must map names to texts")
    default = doc.get("default_prompt_name")
    if default is not None and default not in named:
        raise ModelDirError(f"{config}: default_prompt_name {default!r} is not one of its "
                            f"prompts ({', '.join(named) or 'none'})")
    folder = _pooling_folder(directory)
    if named and folder is not None and (directory / folder / CONFIG).is_file() and \
            _json_object(directory / folder / CONFIG).get("include_prompt") is False:
        raise ModelDirError(f"{directory / folder / CONFIG} pools without the prompt's tokens "
                            "(include_prompt: false), which this pool does not do")
    return Prompts(dict(named), default)


def max_seq_length_of(directory: Path) -> int | None:
    """`max_seq_length` from a sentence-transformers model's sentence_bert_config.json, the
    length it truncates at; None where the file, or a positive value in it, is missing."""
    try:
        limit = json.loads((directory / SENTENCE_BERT_CONFIG).read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return limit if isinstance(limit, int) and limit > 0 else None


def _pooling_folder(directory: Path) -> str | None:
    """The folder of the model's Pooling module: as modules.json names it, else 1_Pooling if
    that holds a config; None for a model without one."""
    if (directory / MODULES).is_file():
        modules = _json(directory / MODULES)
        if not isinstance(modules, list):
            raise ModelDirError(f"{directory / MODULES} is not a list of modules")
        modules = [m for m in modules if isinstance(m, dict)]
        unserved = [str(m.get("type")) for m in modules if m.get("type") not in SERVED_MODULES]
        if unserved:
            raise ModelDirError(f"{directory / MODULES} lists {', '.join(unserved)}, which this "
                                "pool does not run: its vectors would not be the model's")
        for module in modules:
            if module.get("type") == POOLING_MODULE:
                return str(module.get("path") or DEFAULT_POOLING_DIR)
        return None
    return DEFAULT_POOLING_DIR if (directory / DEFAULT_POOLING_DIR / CONFIG).is_file() else None


def _check_tokenizer(directory: Path) -> None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{directory} holds no tokenizer (one of "
                            f"{', '.join(TOKENIZER_FILES)})")
    for name in TOKENIZER_JSON:
        if (directory / name).is_file():
            _json_object(directory / name)  # a copy cut short fails to parse


def _check_config(directory: Path) -> None:
    config = directory / CONFIG
    if not config.is_file():
        raise ModelDirError(f"{directory} is not a transformers model directory (no {CONFIG})")
    doc = _json_object(config)
    if not isinstance(doc.get("model_type"), str):
        raise ModelDirError(f"{config} names no model_type: not a transformers config")


def _check_weights(directory: Path) -> None:
    for name, check in ((SAFETENSORS, _check_safetensors), (SAFETENSORS_INDEX, _check_shards),
                        (TORCH_BIN, _check_torch_bin), (TORCH_BIN_INDEX, _check_shards)):
        if (directory / name).is_file():
            check(directory / name)
            return
    raise ModelDirError(f"{directory} holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, "
                        f"{TORCH_BIN} or {TORCH_BIN_INDEX})")


def _check_safetensors(file: Path) -> None:
    """The header parses and its tensors cover the file exactly: a file cut short fails."""
    try:
        with safe_open(str(file), framework="numpy") as weights:
            if not list(weights.keys()):
                raise ModelDirError(f"{file} holds no tensors")
    except (SafetensorError, OSError) as exc:
        raise ModelDirError(f"{file} is not a safetensors file: {exc}") from None


def _check_torch_bin(file: Path) -> None:
    """torch.save's zip with its pickle inside, or an older torch.save's bare pickle (which
    only loading can check further)."""
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as archive:
                if any(name.endswith(TORCH_ZIP_PICKLE) for name in archive.namelist()):
                    return
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelDirError(f"{file} is not a torch checkpoint: {exc}") from None
        raise ModelDirError(f"{file} is a zip but not a torch checkpoint (no */data.pkl)")
    with file.open("rb") as handle:
        start = handle.read(1)
    if start != PICKLE_PROTOCOL_2:
        raise ModelDirError(f"{file} is not a torch checkpoint (neither torch.save's zip "
                            "format nor a pickle)")


def _check_shards(index: Path) -> None:
    weight_map = _json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(f"{index} has no weight_map")
    check = _check_safetensors if index.name == SAFETENSORS_INDEX else _check_torch_bin
    for shard in sorted(set(map(str, weight_map.values()))):
        if not (index.parent / shard).is_file():
            raise ModelDirError(f"{index} lists {shard}, which is missing")
        check(index.parent / shard)


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file} is not valid JSON: {exc}") from None


def _json_object(file: Path) -> dict:
    doc = _json(file)
    if not isinstance(doc, dict):
        raise ModelDirError(f"{file} is not a JSON object")
    return doc
