"""Constants and defaults in one place, and the settings of one `pool serve`, each declared
once (`PoolSettings`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from pool.cpus import MAX_DEFAULT_WORKERS, CorePlan, usable_cpus
from pool.gate import DEFAULT_MAX_SPEARMAN_DROP, DEFAULT_MIN_SPEARMAN
from pool.health import PROBE_MIN_PAIRS, PROBE_MIN_TEXT_CHARS
from pool.quality import Thresholds, parse_thresholds
from router.bodies import DEFAULT_MAX_PAIRS, DEFAULT_MAX_TEXT_CHARS
from router.protocol import DEFAULT_ENDPOINT

DEFAULT_BIND = DEFAULT_ENDPOINT
DEFAULT_VERSION = "v1"
# What `pool serve` and `pool demo` serve without --path (and no version in the registry):
# the seed's job is Chinese sentence similarity (pool.builtin, docs/builtin-models.md).
DEFAULT_MODEL = "builtin:multilingual-e5-small"
ENGLISH_MODEL = "builtin:minilm"  # all-MiniLM-L6-v2, the default before; `pool demo`'s v1
DEFAULT_MAX_BATCH = 64  # pairs (or embed texts) per forward pass, on CPU
# On a GPU a pass is launch-bound far beyond 64 pairs: an H200 ran MiniLM at 14,114 pairs/s
# at 16 pairs per request while 64-pair passes kept it ~9% busy (docs/benchmarks.md,
# session 5). There, a pass takes up to this many pairs and stops short of the token budget
# (text-embeddings-inference's default --max-batch-tokens), which bounds its memory.
GPU_MAX_BATCH = 512
# A GPU worker's tokenizer threads: an H200 worker tokenised 412 texts in ~15 ms on one core
# while the graph of their pass ran in ~2 ms (docs/benchmarks.md, session 11); beyond 8
# threads a batch of short texts is too small to share out.
MAX_TOKENIZER_THREADS = 8
GPU_MAX_BATCH_TOKENS = 16_384
# How long a worker waits to fill a batch. None by default: a worker's next batch is
# whatever queued while its device computed the last one (continuous batching, as
# text-embeddings-inference does; Triton's queue delay also defaults to 0). Waiting to fill
# --max-batch held back every pass whenever fewer requests than that were in flight: a tiny
# model's pool did 6,150 pairs/s with 2 ms against 7,800 without, at 64 in flight
# (docs/benchmarks.md, session 10).
DEFAULT_MAX_WAIT_MS = 0.0
DEFAULT_MAX_QUEUE = 10_000  # requests waiting in the router before `overloaded`
DEFAULT_QUEUE_TIMEOUT_S = 30.0  # queued longer than this: `timeout`
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # frontend ZMQ_MAXMSGSIZE, per frame: bigger
# drops the sender's connection
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_DRAIN_S = 30.0  # in-flight work gets this long to finish on stop
MIB = 1024 * 1024
LOG_FILE = "pool.log"  # in the state directory
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
GRAPH_NAMES = ("auto", "traced", "cudagraphs", "eager")
DTYPE_NAMES = ("auto", "float16", "fp16", "bfloat16", "bf16", "float32", "fp32")
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
PASS_POLICIES = ("pipelined", "full")  # pool.passes.pipelined_limit, or --max-batch alone
RESPAWN_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
CRASH_LOOP_WINDOW_S = 60.0
CRASH_LOOP_LIMIT = 5  # crashes of a version within the window: a crash loop, reported
DEFAULT_CRASH_RETRY_S = 60.0  # a crash-looping version that had served is retried this often
TICK_S = 0.1  # housekeeping period of the serve loop
GOLDEN_RECHECK_S = 60.0  # one ready worker per version re-answers the golden probe this often
STATE_ENV = "ZEROPOOL_STATE_DIR"


def default_state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "zeropool"


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


def default_workers(devices: list[str], cores: int | None = None) -> int:
    """`cores`: those --cpu-affinity gives to passes (None: every usable one)."""
    if devices[0].startswith("cuda"):
        return len(devices)
    return min(cores or usable_cpus().usable, MAX_DEFAULT_WORKERS)


def default_max_batch(devices: list[str]) -> int:
    return GPU_MAX_BATCH if devices[0].startswith("cuda") else DEFAULT_MAX_BATCH


def default_max_batch_tokens(devices: list[str]) -> int:
    return GPU_MAX_BATCH_TOKENS if devices[0].startswith("cuda") else 0


def default_tokenizer_threads(devices: list[str], workers: int) -> int:
    if not devices[0].startswith("cuda"):
        return 1
    return max(1, min(MAX_TOKENIZER_THREADS, usable_cpus().usable // workers - 1))


def default_threads(devices: list[str], workers: int, cores: int | None = None) -> int:
    if devices[0].startswith("cuda"):
        return 1
    return max(1, (cores or usable_cpus().usable) // workers)


@dataclass(frozen=True, slots=True)
class Flag:
    """How one setting of `pool serve` is given and shown: its one declaration, beside its
    field in PoolSettings (gunicorn's config.py declares each setting once the same way).

    The `pool serve` options are generated from these (cli/serving.py), `pool status` shows
    those with `shown`, and workers get the whole typed settings record (pool.worker)."""

    help: str
    names: tuple[str, ...] = ()  # option names; default: --the-field-name
    env: str | None = None
    min: float | None = None
    max: float | None = None
    # The option's type and default where the flag is the raw form of a value resolved
    # later (`--device auto` -> devices), see pool.settings.resolve_settings.
    flag_type: Any = None
    flag_default: Any = None
    shown: bool = False  # in `pool status` under "settings"
    choices: tuple[str, ...] = ()  # the values it may take (checked by pool.settings)
    # How the status line prints it: a format with {value} (and {mib} for bytes), with the
    # separator that leads it on the line.
    label: str = ""
    # Turns the option's text into the setting's type (a ValueError is a usage error).
    parser: Callable[[str], Any] | None = None


def setting(default: Any, help: str, *, factory: Callable[[], Any] | None = None,
            **flag: Any) -> Any:
    """A PoolSettings field declared with its flag."""
    meta = {FLAG: Flag(help, **flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


FLAG = "zeropool.flag"


@dataclass
class PoolSettings:
    """The settings of one `pool serve`: each declared once, with its flag."""

    path: str = setting(
        "", "Local transformers model directory, or builtin:multilingual-e5-small | "
        "builtin:minilm (converted on first use). Default: the registry's active version, "
        f"else {DEFAULT_MODEL}.", flag_type=str | None)
    version: str = setting(
        DEFAULT_VERSION, f"Version name (default {DEFAULT_VERSION}).",
        names=("--version", "-v"), flag_type=str | None)
    workers: int = setting(
        1, "Worker processes (default: one per GPU, else one per usable core up to 8: its "
        "affinity, within a container's CPU limit; with --cpu-affinity, one per core it "
        "gives passes).", min=1,
        flag_type=int | None, shown=True)
    bind: str = setting(DEFAULT_BIND, "Frontend endpoint (tcp:// or ipc://).")
    state_dir: Path = setting(
        None, "State directory of the pool.", factory=default_state_dir, env=STATE_ENV)
    devices: list[str] = setting(
        None, "auto | cpu | cuda | cuda:0,1", factory=lambda: ["cpu"], names=("--device",),
        flag_type=str, flag_default="auto", shown=True)
    dtype: str = setting(
        "auto", "auto (fp16 on CUDA; bf16 on a CPU with native bf16, AVX512_BF16 or AMX; "
        "else fp32) | float16 | bfloat16 | float32 (scores within 1e-4 of the seed's)",
        shown=True, choices=DTYPE_NAMES)
    graph: str = setting(
        "auto", "How forward passes run: auto (on CPU a TorchScript graph, on CUDA a CUDA graph "
        "per shape bucket; each checked against the model at load, eager if it cannot be "
        "built) | traced | cudagraphs | eager.",
        shown=True, choices=GRAPH_NAMES)
    max_batch: int = setting(
        DEFAULT_MAX_BATCH, f"Pairs per forward pass (default {DEFAULT_MAX_BATCH} on CPU, "
        f"{GPU_MAX_BATCH} on GPUs).", min=1, flag_type=int | None, shown=True)
    max_batch_tokens: int = setting(
        0, "Tokens per forward pass (its texts' token counts summed, as text-embeddings-"
        "inference counts): a pass stops before going over; a request over it alone runs "
        f"alone. 0: none, --max-batch alone bounds a pass (default on CPU; {GPU_MAX_BATCH_TOKENS}"
        " on GPUs).", min=0, flag_type=int | None, shown=True)
    passes: str = setting(
        "pipelined", "How much a forward pass takes: pipelined (where tokenising costs a "
        "real share of a pass, at most half of what its worker held over its last passes, so "
        "that the other half is decoded and tokenised meanwhile; a deep queue still fills "
        "--max-batch) | full (up to --max-batch every time).", env="ZEROPOOL_PASSES",
        shown=True, choices=PASS_POLICIES)
    max_wait_ms: float = setting(
        DEFAULT_MAX_WAIT_MS, "How long a worker waits to fill a batch (default 0: the next batch "
        "is what queued during the last one).", min=0, shown=True)
    threads: int = setting(
        1, "Torch threads per worker (default: usable cores / workers; with --cpu-affinity, "
        "the passes' cores / workers).", min=1,
        flag_type=int | None, shown=True)
    tokenizer_threads: int = setting(
        1, "Threads tokenising each worker's requests (default: 1 on CPU, whose cores compute "
        f"the passes; on GPUs usable cores / workers - 1, at most {MAX_TOKENIZER_THREADS}: a "
        "GPU pass is faster than one core tokenises its texts).", min=1, flag_type=int | None,
        shown=True)
    cpu_affinity: CorePlan | None = setting(
        None, "off | auto | CORES (e.g. 2-7): each worker's forward passes on cores of their "
        "own, the router and the workers' intake on the others. auto: every usable core but "
        "the first for passes; CORES: these for passes, split evenly among the workers. "
        "Workers and threads default to the passes' cores. For a pool with its cores to "
        "itself (a machine, or a container's cpuset): pools sharing cores would stack their "
        "passes on the same ones. CPU pools only.", env="ZEROPOOL_CPU_AFFINITY",
        flag_type=str, flag_default="off", shown=True)
    model: str = setting("transformer", "transformer | echo (no model: transport only).")
    max_pairs: int = setting(
        DEFAULT_MAX_PAIRS, "Pairs (or embed texts) per request; beyond: too_large. At least "
        "the health probe's size.", min=PROBE_MIN_PAIRS, shown=True,
        label="{value} pairs/request")
    max_text_chars: int = setting(
        DEFAULT_MAX_TEXT_CHARS, "Characters per text; beyond: too_large.",
        min=PROBE_MIN_TEXT_CHARS, shown=True, label=", {value} chars/text")
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES, "Largest frame of a frontend message (ZMQ MAXMSGSIZE); a "
        "bigger one drops the sender's connection, unanswered.", min=1024, shown=True,
        label=", {mib:.0f} MiB/frame")
    max_queue: int = setting(
        DEFAULT_MAX_QUEUE, "Requests waiting before `overloaded`.", min=1, shown=True,
        label=", queue {value}")
    queue_timeout_s: float = setting(
        DEFAULT_QUEUE_TIMEOUT_S, "Seconds a request may wait for a worker.",
        names=("--queue-timeout",), min=0.01, shown=True, label=", queue timeout {value:.0f}s")
    metrics_port: int | None = setting(
        None, "Serve Prometheus metrics on this HTTP port (0: any free port).", min=0,
        max=65535, shown=True)
    metrics_host: str = setting(DEFAULT_METRICS_HOST, "Address of the metrics endpoint.")
    curve_secret_key: Path | None = setting(
        None, "Curve on the frontend: the pool's .key_secret file (`pool keygen`).")
    curve_allow: Path | None = setting(
        None, "Curve: directory of allowed client public keys (*.key), re-read when it "
        "changes.")
    join: str | None = setting(
        None, "Peers' front ends (endpoints, comma-separated, or dns://NAME:PORT): started "
        "without --path, serve the version most of them serve now (a pod joining a fleet "
        "mid-rollout); one not registered here stops the start. With Curve, they are pinged "
        "with this pool's own key pair.")
    control_bind: str | None = setting(
        None, "Also serve the operator commands (status, rotate, ...) on this tcp://HOST:PORT, "
        "for `pool ... --pool`: CurveZMQ only, for the keys of --operator-keys alone. The "
        "local control socket in the state directory stays.")
    control_secret_key: Path | None = setting(
        None, "--control-bind's Curve key: a .key_secret file (`pool keygen`), whose public "
        "half operators give as --server-key. Default: --curve-secret-key.")
    operator_keys: Path | None = setting(
        None, "--control-bind: directory of the operators' public keys (*.key), re-read when "
        "it changes. Its own list: a producer's key on --curve-allow cannot run operator "
        "commands.")
    log_json: bool = setting(
        False, "Log JSON lines (stderr and the log file).", names=("--log-json", "--json"))
    start_method: str = setting(
        DEFAULT_START_METHOD, "How workers start: auto (forkserver on CPU, spawn with CUDA) | "
        "spawn | forkserver (imports torch once; a worker is ready in a fraction of a "
        "second).", env="ZEROPOOL_START_METHOD", shown=True, choices=START_METHODS,
        label="; workers start by {value}")
    load_niceness: int = setting(
        DEFAULT_LOAD_NICENESS, "How much nicer than serving a worker loads its model, so a "
        "rotation on a busy machine does not slow the version serving (0: same priority, "
        "loads fastest).", env="ZEROPOOL_LOAD_NICENESS", min=0, max=19, shown=True,
        label=" and load at nice +{value}")
    crash_retry_s: float = setting(
        DEFAULT_CRASH_RETRY_S, "Seconds between tries of a version that served, then "
        "crash-looped (its requests fail at once meanwhile).", names=("--crash-retry",),
        min=0.1, shown=True, label="; crash loops retried every {value:g}s")
    shutdown_drain_s: float = setting(
        DEFAULT_SHUTDOWN_DRAIN_S, "Seconds in-flight and queued work gets to finish when the "
        "pool stops; what is still queued then gets shutting_down.",
        names=("--shutdown-drain",), min=0, shown=True, label="; stop drains {value:g}s")
    thresholds: Thresholds | None = setting(
        None, "Verdict thresholds HIGH,LOW of the version served (e.g. 0.92,0.86: above HIGH "
        "\"very similar\", above LOW \"related\"), stored on it in the registry. Default: "
        "the version's own, else its built-in model's, else 0.85,0.5.",
        parser=parse_thresholds)
    eval_pairs: str | None = setting(
        None, "Quality gate of every rotation: a labelled TSV (label<TAB>text_a<TAB>text_b; 2 "
        "same meaning, 1 same topic, 0 unrelated) the new version must score before it takes "
        "traffic, or builtin:zh-pairs (the packaged Chinese set). A version's own --eval "
        "(versions add, rotate) wins.", names=("--eval",), shown=True)
    min_spearman: float = setting(
        DEFAULT_MIN_SPEARMAN, "Quality gate: the lowest Spearman (scores against labels) a "
        "new version may have.", min=-1.0, max=1.0, shown=True)
    max_spearman_drop: float = setting(
        DEFAULT_MAX_SPEARMAN_DROP, "Quality gate: how far below the active version's Spearman "
        "on the same set a new version may be.", min=0.0, max=2.0, shown=True)

    @property
    def control_endpoint(self) -> str:
        return control_endpoint_for(self.state_dir)

    @property
    def backend_endpoint(self) -> str:
        return f"ipc://{self.state_dir / 'backend.sock'}"

    @property
    def capacity(self) -> int:
        return self.max_batch * CAPACITY_BATCHES

    @property
    def pool_cores(self) -> tuple[int, ...] | None:
        """--cpu-affinity: every core of the pool (None: unpinned)."""
        return None if self.cpu_affinity is None else self.cpu_affinity.cores

    def passes_cores_of(self, slot: int) -> tuple[int, ...] | None:
        """--cpu-affinity: the cores of worker slot `slot`'s passes (None: unpinned)."""
        return None if self.cpu_affinity is None else self.cpu_affinity.passes_of(slot)


def flags() -> list[tuple[str, Any, Flag]]:
    """(field name, its type, its flag) for each setting, in declaration order."""
    hints = get_type_hints(PoolSettings)
    return [(f.name, hints[f.name], f.metadata[FLAG]) for f in fields(PoolSettings)
            if FLAG in f.metadata]


def flag_default(spec: Flag, name: str) -> Any:
    """What the option defaults to when not given (None: pool.settings decides)."""
    if spec.flag_type is not None:
        return spec.flag_default
    declared = next(f for f in fields(PoolSettings) if f.name == name)
    if declared.default_factory is not MISSING:
        return declared.default_factory()
    return declared.default


def shown_settings(settings: PoolSettings) -> dict[str, Any]:
    """What `pool status` shows of the settings."""
    return {name: getattr(settings, name) for name, _, spec in flags() if spec.shown}


def settings_line(shown: dict[str, Any]) -> str:
    """The settings of a status reply as one line, by the labels declared."""
    return "".join(_label(spec.label, shown[name]) for name, _, spec in flags()
                   if spec.label and name in shown)


def _label(label: str, value: Any) -> str:
    mib = value / MIB if isinstance(value, int | float) else 0.0
    return label.format(value=value, mib=mib)


def option_name(name: str, spec: Flag) -> str:
    """The option a setting is given by: its first declared name, else --the-field-name."""
    return spec.names[0] if spec.names else "--" + name.replace("_", "-")


def choose_start_method(setting: str, model: str) -> str:
    """What `auto` means for this model (a setting pool.settings has checked)."""
    if setting != "auto":
        return setting
    return "spawn" if model == "echo" else "forkserver"


def control_endpoint_for(state_dir: Path) -> str:
    return f"ipc://{state_dir / 'control.sock'}"
