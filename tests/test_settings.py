"""The settings of `pool serve`, each declared once (pool.config.PoolSettings), and what is
derived from the declarations: the command's options, `pool status`, the status line and
what workers get."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from cli.serving import serve
from pool import config
from pool.builtin import embedded_model_path
from pool.cpus import Cpus
from pool.registry import Registry
from pool.settings import resolve_settings
from pool.worker import WorkerConfig
from tests.modelstub import model_stub

STATUS_KEYS = {"workers", "devices", "dtype", "graph", "max_batch", "max_batch_tokens",
               "passes", "max_wait_ms", "threads", "tokenizer_threads", "cpu_affinity",
               "start_method", "load_niceness", "crash_retry_s", "max_queue", "queue_timeout_s",
               "max_pairs", "max_text_chars", "max_message_bytes", "metrics_port",
               "shutdown_drain_s", "eval_pairs", "min_spearman", "max_spearman_drop"}


def test_every_declared_setting_is_an_option_of_serve() -> None:
    params = inspect.signature(serve).parameters
    assert list(params) == [f.name for f in dataclasses.fields(config.PoolSettings)]
    assert params["max_text_chars"].default == config.DEFAULT_MAX_TEXT_CHARS
    assert params["devices"].default == "auto"  # the flag's raw form, resolved later


def test_status_shows_the_settings_declared_shown() -> None:
    shown = config.shown_settings(config.PoolSettings(path="/m", shutdown_drain_s=5.0))
    assert set(shown) == STATUS_KEYS
    assert shown["shutdown_drain_s"] == 5.0


def test_the_status_line_words_each_labelled_setting() -> None:
    shown = {**config.shown_settings(config.PoolSettings(path="/m")), "start_method": "spawn"}
    assert config.settings_line(shown) == (
        "1024 pairs/request, 10000 chars/text, 64 MiB/frame, queue 10000, queue timeout 30s; "
        "workers start by spawn and load at nice +10; crash loops retried every 60s; "
        "stop drains 30s")


def test_a_worker_gets_the_typed_settings_and_they_pickle() -> None:
    settings = config.PoolSettings(path="/m", max_text_chars=99, threads=3)
    cfg = WorkerConfig("v1-0-1", "v1", "/m", "cpu", settings)
    again = pickle.loads(pickle.dumps(cfg))  # what multiprocessing sends to the worker
    assert (again.settings.max_text_chars, again.settings.threads) == (99, 3)
    assert again.capacity == settings.capacity


def test_resolving_fills_what_depends_on_the_machine(tmp_path) -> None:
    model = model_stub(tmp_path / "m")
    values = {name: config.flag_default(spec, name) for name, _, spec in config.flags()}
    settings = resolve_settings({**values, "path": str(model), "devices": "cpu",
                                        "state_dir": tmp_path / "state", "workers": 2})
    assert settings.devices == ["cpu"] and settings.workers == 2
    assert settings.threads == config.default_threads(["cpu"], 2)
    assert settings.tokenizer_threads == 1  # a CPU's cores compute the passes
    assert settings.version == config.DEFAULT_VERSION


def test_a_gpu_worker_tokenises_on_the_cores_its_share_of_the_machine_leaves(
        monkeypatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: Cpus(16, 16, None))
    assert config.default_tokenizer_threads(["cuda:0"], 1) == config.MAX_TOKENIZER_THREADS
    assert config.default_tokenizer_threads(["cuda:0"], 4) == 3
    assert config.default_tokenizer_threads(["cuda:0", "cuda:1"], 16) == 1
    assert config.default_tokenizer_threads(["cpu"], 1) == 1


def test_batch_bounds_default_by_device_and_a_given_value_wins(tmp_path) -> None:
    model = model_stub(tmp_path / "m")
    values = {name: config.flag_default(spec, name) for name, _, spec in config.flags()}
    values |= {"path": str(model), "state_dir": tmp_path / "state"}

    def resolved(**given):
        settings = resolve_settings({**values, **given})
        return settings.max_batch, settings.max_batch_tokens

    assert resolved(devices="cpu") == (config.DEFAULT_MAX_BATCH, 0)
    assert resolved(devices="cuda:0") == (config.GPU_MAX_BATCH, config.GPU_MAX_BATCH_TOKENS)
    # 0 is a value (no token budget), not "not given".
    assert resolved(devices="cuda:0", max_batch=32, max_batch_tokens=0) == (32, 0)


def test_without_a_path_the_default_model_is_the_multilingual_builtin(tmp_path, models) -> None:
    values = {name: config.flag_default(spec, name) for name, _, spec in config.flags()}
    asked: list[str] = []

    def model_path(spec: str) -> str:
        asked.append(spec)
        return str(models["v1"])

    settings = resolve_settings({**values, "devices": "cpu",
                                        "state_dir": tmp_path / "state"}, model_path=model_path)
    assert asked == ["builtin:multilingual-e5-small"] == [config.DEFAULT_MODEL]
    assert settings.path == str(models["v1"].resolve())


def test_a_builtin_path_is_resolved_and_an_unknown_one_is_a_clear_error(tmp_path) -> None:
    values = {name: config.flag_default(spec, name) for name, _, spec in config.flags()}
    values |= {"devices": "cpu", "state_dir": tmp_path / "state"}
    settings = resolve_settings({**values, "path": "builtin:minilm"})
    assert settings.path == str(embedded_model_path().resolve())
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'; known: "
                                         "builtin:minilm, builtin:multilingual-e5-small"):
        resolve_settings({**values, "path": "builtin:nope"})


def test_a_restored_version_whose_directory_broke_is_named_as_the_registrys(tmp_path) -> None:
    model = model_stub(tmp_path / "m")
    registry = Registry(tmp_path / "state")
    registry.add("v7", str(model))
    registry.set_active("v7")
    registry.save()
    (model / "model.safetensors").write_bytes(b"cut")  # the directory broke since
    values = {name: config.flag_default(spec, name) for name, _, spec in config.flags()}
    with pytest.raises(ValueError, match=r"^version v7 \(the registry's; --path to serve "
                       r"another\): .*model\.safetensors is not a safetensors file"):
        resolve_settings({**values, "state_dir": tmp_path / "state"})
