"""The settings of one `pool serve`, worked out from its flags (pool.config declares them):
the registry's version or the default model for a missing --path, a built-in model's
directory for `builtin:NAME`, the quality gate's set checked, devices, workers, threads and
batch bounds from the machine."""

from __future__ import annotations

import logging
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
from pool.cpus import (
    AFFINITY_OFF,
    allowed_cores,
    plan_cores,
    reserved_cores,
    usable_cpus,
)
from pool.join import fleet_version, own_keys, peer_endpoints, pinger
from pool.modeldir import ModelDirError, check_model_dir
from pool.registry import Registry, check_eval_set
from router.failover import bind_problem

log = logging.getLogger("zeropool.settings")


def resolve_settings(values: dict[str, Any],
                     model_path: Callable[[str], str] | None = None) -> PoolSettings:
    """PoolSettings from the flags' values: the registry's version or the default model for
    a missing --path, a built-in model's directory for `builtin:NAME` (`model_path`, by
    default resolve_model_path: converted on first use), devices from --device,
    workers and threads from the devices. Raises ValueError saying what is wrong."""
    problem = bind_problem(values["bind"])
    if problem is not None:
        raise ValueError(f"--bind {values['bind']}: {problem}")
    check_remote_control(values)  # before a built-in model's conversion (seconds)
    path, version, state_dir = values["path"], values["version"], Path(values["state_dir"])
    source = "--path"  # where the model's path came from, for a message about it
    if path is None:
        registry = Registry(state_dir)
        if values.get("join"):
            version = joined_version(values, registry) or version
        restored = registry.version(version or registry.active or "")
        if restored is not None:
            version, path = version or registry.active, restored["path"]
            source = f"version {version} (the registry's; --path to serve another)"
        else:
            path, source = DEFAULT_MODEL, "the default model"
    model = values["model"]
    if model == "transformer":
        try:
            path = (model_path or resolve_model_path)(path)
            check_model_dir(path)
        except BuiltinModelError as exc:
            raise ValueError(str(exc)) from exc
        except ModelDirError as exc:
            raise ValueError(f"{source}: {exc}") from None
    if model not in ("transformer", "echo"):
        raise ValueError(f"--model must be transformer or echo, not {model!r}")
    for name, _, spec in flags():
        if spec.choices and values[name] not in spec.choices:
            raise ValueError(f"{option_name(name, spec)} must be one of "
                             f"{', '.join(spec.choices)}, not {values[name]!r}")
    if values["eval_pairs"]:
        values = {**values, "eval_pairs": check_eval_set(values["eval_pairs"])}
    devices = parse_devices(values["devices"])
    affinity = values["cpu_affinity"].strip().lower()
    allowed = allowed_cores()
    reserved = passes_cores(affinity, devices, model, allowed)
    budget = None if reserved is None else len(reserved)
    workers = values["workers"] or default_workers(devices, budget)
    threads = values["threads"] or default_threads(devices, workers, budget)
    return PoolSettings(**{
        **values, "path": path if model == "echo" else str(Path(path).resolve()),
        "version": version or DEFAULT_VERSION, "state_dir": state_dir, "devices": devices,
        "workers": workers, "threads": threads,
        "cpu_affinity": None if reserved is None else plan_cores(
            affinity, reserved, allowed, workers, threads),
        "tokenizer_threads": values["tokenizer_threads"]
        or default_tokenizer_threads(devices, workers),
        "max_batch": _given(values["max_batch"], default_max_batch(devices)),
        "max_batch_tokens": _given(values["max_batch_tokens"],
                                   default_max_batch_tokens(devices))})


def passes_cores(setting: str, devices: list[str], model: str,
                 allowed: tuple[int, ...]) -> tuple[int, ...] | None:
    """The cores --cpu-affinity gives forward passes, of the `allowed` ones (None: off).
    ValueError saying why it cannot be followed."""
    if setting == AFFINITY_OFF:
        return None
    if devices[0].startswith("cuda"):
        raise ValueError("--cpu-affinity pins forward passes to CPU cores: this pool's run on "
                         "its GPUs (leave it off with --device cuda)")
    if model == "echo":
        raise ValueError("--cpu-affinity: the echo model has no forward passes to pin")
    return reserved_cores(setting, allowed, usable_cpus())


def check_remote_control(values: dict[str, Any]) -> None:
    """--control-bind exposes rotate and stop to the network: only over CurveZMQ, only for an
    operator allow-list of its own. ValueError saying what is missing."""
    bind = values.get("control_bind")
    if not bind:
        if values.get("operator_keys") or values.get("control_secret_key"):
            raise ValueError("--operator-keys and --control-secret-key go with --control-bind")
        return
    if not bind.startswith("tcp://"):
        raise ValueError(f"--control-bind {bind}: expected tcp://HOST:PORT (the local control "
                         "socket is always in the state directory)")
    problem = bind_problem(bind)
    if problem is not None:
        raise ValueError(f"--control-bind {bind}: {problem}")
    if not (values.get("control_secret_key") or values.get("curve_secret_key")):
        raise ValueError("--control-bind needs CurveZMQ: give the pool's server key "
                         "(--control-secret-key, or --curve-secret-key; `pool keygen` makes "
                         "one) and --operator-keys (the operators' public keys)")
    operators = values.get("operator_keys")
    if not operators:
        raise ValueError("--control-bind needs --operator-keys: a directory of the operators' "
                         "public keys (*.key); without it anyone with a key could rotate or "
                         "stop the pool")
    producers = values.get("curve_allow")
    if producers and Path(producers).resolve() == Path(operators).resolve():
        raise ValueError("--operator-keys must not be the producers' --curve-allow directory: "
                         "every producer could then rotate or stop the pool")


def _given(value: Any, default: Any) -> Any:
    """A flag's value where one was given (0 included), else the device's default."""
    return default if value is None else value


def joined_version(values: dict[str, Any], registry: Registry) -> str | None:
    """--join: the version the peers serve (None when none answers, or a tie). One that is
    not registered here is refused: serving another version would mix both in the fleet's
    replies, which no consumer of its embeddings can tell apart."""
    seen = fleet_version(peer_endpoints(values["join"]),
                         pinger(own_keys(values.get("curve_secret_key"))))
    if seen is None:
        return None
    if registry.version(seen) is None:
        raise ValueError(
            f"--join: the fleet serves {seen}, which is not registered here; starting on "
            f"{registry.active or 'the default model'} would mix two versions in the fleet. "
            f"Register {seen} (`pool versions add {seen} --path DIR`, or list it in the "
            f"model_versions.json this pool imports) and start again")
    log.warning("join: the fleet serves %s; starting on it", seen)
    return seen
