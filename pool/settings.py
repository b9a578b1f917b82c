"""The settings of one `pool serve`, worked out from its flags (pool.config declares them):
the registry's version or the default model for a missing --path, a built-in model's
directory for `builtin:NAME`, the quality gate's set checked, devices, workers, threads and
batch bounds from the machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool.builtin import BuiltinModelError, resolve_model_path
from pool.config import (
    DEFAULT_MODEL,
    DEFAULT_VERSION,
    PoolSettings,
    default_max_batch,
    default_max_batch_tokens,
    default_threads,
    default_tokenizer_threads,
    default_workers,
    flags,
    option_name,
    parse_devices,
)
from pool.registry import Registry, check_eval_set


def resolve_settings(values: dict[str, Any],
                     model_path: Callable[[str], str] | None = None) -> PoolSettings:
    """PoolSettings from the flags' values: the registry's version or the default model for
    a missing --path, a built-in model's directory for `builtin:NAME` (`model_path`, by
    default resolve_model_path: converted on first use), devices from --device,
    workers and threads from the devices. Raises ValueError saying what is wrong."""
    path, version, state_dir = values["path"], values["version"], Path(values["state_dir"])
    if path is None:
        registry = Registry(state_dir)
        restored = registry.version(version or registry.active or "")
        if restored is not None:
            version, path = version or registry.active, restored["path"]
        else:
            path = DEFAULT_MODEL
    model = values["model"]
    if model == "transformer":
        try:
            path = (model_path or resolve_model_path)(path)
        except BuiltinModelError as exc:
            raise ValueError(str(exc)) from exc
    if model == "transformer" and not (Path(path) / "config.json").is_file():
        raise ValueError(f"--path {path} is not a transformers model directory (no config.json)")
    if model not in ("transformer", "echo"):
        raise ValueError(f"--model must be transformer or echo, not {model!r}")
    for name, _, spec in flags():
        if spec.choices and values[name] not in spec.choices:
            raise ValueError(f"{option_name(name, spec)} must be one of "
                             f"{', '.join(spec.choices)}, not {values[name]!r}")
    if values["eval_pairs"]:
        values = {**values, "eval_pairs": check_eval_set(values["eval_pairs"])}
    devices = parse_devices(values["devices"])
    workers = values["workers"] or default_workers(devices)
    return PoolSettings(**{
        **values, "path": path if model == "echo" else str(Path(path).resolve()),
        "version": version or DEFAULT_VERSION, "state_dir": state_dir, "devices": devices,
        "workers": workers,
        "threads": values["threads"] or default_threads(devices, workers),
        "tokenizer_threads": values["tokenizer_threads"]
        or default_tokenizer_threads(devices, workers),
        "max_batch": _given(values["max_batch"], default_max_batch(devices)),
        "max_batch_tokens": _given(values["max_batch_tokens"],
                                   default_max_batch_tokens(devices))})


def _given(value: Any, default: Any) -> Any:
    """A flag's value where one was given (0 included), else the device's default."""
    return default if value is None else value
