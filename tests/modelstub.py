"""Model directories for tests that need one which is not a working model: one that passes
pool.modeldir's checks without being a model (for what only registers, routes or resolves a
path), and a real model's copy that passes them and still fails to load. Light: no torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def model_stub(directory: Path) -> Path:
    """A config, one tensor of weights and a tokenizer's vocabulary in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "bert"}')
    save_file({"weight": np.zeros(1, dtype=np.float32)}, str(directory / "model.safetensors"))
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return directory


def weights_of_another_shape(model: Path, copy: Path) -> Path:
    """A copy of `model` whose config asks for feed-forward layers twice as wide as its
    weights: every file is well-formed (pool.modeldir passes it), and loading it fails."""
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def with_pooling(model: Path, copy: Path, *modes: str) -> Path:
    """A copy of `model` laid out as a sentence-transformers model whose Pooling module sets
    `pooling_mode_<mode>` for each of `modes` (e.g. "cls_token", "max_tokens")."""
    shutil.copytree(model, copy)
    (copy / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (copy / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{mode}": mode in modes for mode in
             ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")}
    flags |= {f"pooling_mode_{mode}": True for mode in modes}
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    return copy


def with_prompts(model: Path, copy: Path, prompts: dict[str, str],
                 default: str | None = None) -> Path:
    """A copy of `model` whose config_sentence_transformers.json declares `prompts` (and
    `default` as its default_prompt_name), as e5's and bge's sentence-transformers releases
    do."""
    shutil.copytree(model, copy)
    (copy / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": default}))
    return copy
