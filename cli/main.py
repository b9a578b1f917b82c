"""The `pool` command: parses arguments, calls pool/, router/ and tooling/, prints. Nothing else."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table

from pool import config
from pool.control import (
    POOL_ENV,
    ControlAuthFailed,
    ControlError,
    ControlTarget,
    PoolNotRunning,
    PoolUnreachable,
    control_request,
)
from pool.judge import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_P99_RATIO
from router.client import (
    VERDICT_RELATED,
    VERDICT_UNRELATED,
    VERDICT_VERY_SIMILAR,
    AuthenticationFailed,
    Client,
    ZeroPoolError,
    split_endpoints,
)
from router.failover import DNS_SCHEME
from router.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV, ClientKeys, KeyFileError
from router.protocol import ENDPOINT_ENV

app = typer.Typer(
    help="zeropool: a multiprocess embedding / similarity pool with zero-downtime rotation.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
DEFAULT_STATE_DIR = config.default_state_dir()
ROTATION_POLL_S = 0.2
# Errors are never wrapped: a script greps them, and a long path must not split a sentence.
err = Console(stderr=True, soft_wrap=True)

EndpointOpt = Annotated[str, typer.Option(
    "--endpoint", "-e", envvar=ENDPOINT_ENV,
    help="Pool frontend to connect to; several (comma-separated) or dns://NAME:PORT: the "
         "client fails over between them.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
StateDirOpt = Annotated[Path, typer.Option("--state-dir", envvar=config.STATE_ENV,
                                           help="State directory of the pool.")]
VersionOpt = Annotated[str | None, typer.Option("--version", "-v",
                                                help="Pin the request to this version.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.")]
ServerKeyOpt = Annotated[Path | None, typer.Option(
    "--server-key", envvar=SERVER_KEY_ENV, help="Curve: the pool's public key file.")]
ClientKeyOpt = Annotated[Path | None, typer.Option(
    "--client-key", envvar=CLIENT_KEY_ENV, help="Curve: this client's .key_secret file.")]
ThresholdsOpt = Annotated[str | None, typer.Option(
    "--thresholds", help="Verdict thresholds HIGH,LOW of the version, e.g. 0.92,0.86: above "
    "HIGH \"very similar\", above LOW \"related\" (default: its built-in model's, else "
    "0.85,0.5).")]
EvalOpt = Annotated[str | None, typer.Option(
    "--eval", help="The version's quality gate: a labelled TSV (label<TAB>text_a<TAB>text_b; 2 "
    "same meaning, 1 same topic, 0 unrelated), or builtin:zh-pairs, scored through its new "
    "workers before it takes traffic (floor: the pool's --min-spearman; drop: "
    "--max-spearman-drop against the active version).")]
VERDICT_STYLE = {VERDICT_VERY_SIMILAR: "green", VERDICT_RELATED: "yellow",
                 VERDICT_UNRELATED: "red"}


def emit_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def model_path(spec: str, as_json: bool = False) -> str:
    """A --path as given, or a built-in model's directory for `builtin:NAME`: converted into
    the model cache on first use (seconds), which the terminal shows while it runs."""
    from pool.builtin import BUILTIN_PREFIX, BuiltinModelError, resolve_model_path

    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    try:
        with err.status(f"preparing {spec} (converted once, on first use)"):
            return resolve_model_path(spec)
    except (ValueError, BuiltinModelError) as exc:
        fail(str(exc), as_json, "usage", exit_code=2)


def optional_model_path(spec: str | None, as_json: bool = False) -> str | None:
    return None if spec is None else model_path(spec, as_json)


def fail(message: str, as_json: bool, code: str = "error", exit_code: int = 1) -> NoReturn:
    if as_json:
        emit_json({"ok": False, "error": {"code": code, "message": message}})
    else:
        err.print(f"[bold red]error[/]: {message}")
    raise typer.Exit(exit_code)


# -- serving -----------------------------------------------------------------------------


def serve(**options: Any) -> None:
    """Start a pool: router + supervisor in this process, N worker processes."""
    from pool.logs import setup_logging
    from pool.server import StartupError
    from pool.server import serve as run_server
    from pool.settings import resolve_settings

    try:
        settings = resolve_settings(options, model_path=model_path)
    except ValueError as exc:
        fail(str(exc), False, exit_code=2)
    setup_logging(settings.log_json, Path(settings.state_dir) / config.LOG_FILE)
    try:
        code = run_server(settings)
    except StartupError as exc:
        fail(str(exc), False, exit_code=2)
    raise typer.Exit(code)


def serve_signature() -> inspect.Signature:
    """`pool serve`'s options: one per setting declared in pool.config.PoolSettings."""
    params = []
    for name, kind, spec in config.flags():
        option = typer.Option(*spec.names, envvar=spec.env, help=spec.help, min=spec.min,
                              max=spec.max, parser=spec.parser)
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=config.flag_default(spec, name),
            annotation=Annotated[spec.flag_type or kind, option]))
    return inspect.Signature(params)


serve.__signature__ = serve_signature()  # type: ignore[attr-defined]
app.command()(serve)


# -- producer commands -------------------------------------------------------------------


def client_keys(server_key: Path | None, client_key: Path | None,
                as_json: bool) -> ClientKeys | None:
    """Curve keys from --server-key / --client-key: both or neither."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        fail("Curve needs both --server-key (the pool's public key) and --client-key "
             "(this client's secret key)", as_json, "usage", exit_code=2)
    try:
        return ClientKeys.from_files(server_key, client_key)
    except KeyFileError as exc:
        fail(str(exc), as_json, "usage", exit_code=2)


def call_pool(endpoint: str, timeout: float, as_json: bool, call: Any,
              keys: ClientKeys | None = None) -> Any:
    """One request through the Python client; a protocol error ends the command cleanly."""
    with Client(endpoint, timeout=timeout, curve=keys) as client:
        try:
            return call(client)
        except ZeroPoolError as exc:
            fail_with(exc, as_json)


AUTH_EXIT_CODE = 3  # the pool refused this client's Curve handshake: a script can tell


def fail_with(exc: ZeroPoolError, as_json: bool) -> NoReturn:
    """A protocol error or a refused handshake, as the command's error and exit code."""
    auth = isinstance(exc, AuthenticationFailed)
    fail(exc.message, as_json, exc.code, exit_code=AUTH_EXIT_CODE if auth else 1)


@app.command()
def similarity(
    text_a: Annotated[str, typer.Argument(help="First sentence.")],
    text_b: Annotated[str, typer.Argument(help="Second sentence.")],
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    version: VersionOpt = None,
    timeout: TimeoutOpt = 30.0,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score two sentences: cosine of mean-pooled embeddings, with the verdict by the
    answering version's thresholds."""
    result = call_pool(endpoint, timeout, as_json,
                       lambda client: client.similarity([(text_a, text_b)], version=version),
                       client_keys(server_key, client_key, as_json))
    score, said = result.scores[0], result.verdict(0)
    high, low = result.thresholds
    if as_json:
        emit_json({"ok": True, "score": score, "verdict": said, "version": result.version,
                   "thresholds": [high, low]})
        return
    out.print(f"{score:.4f}  [{VERDICT_STYLE[said]}]{said}[/]  (version {result.version}, "
              f"thresholds {high:g} / {low:g})")


@app.command()
def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    version: VersionOpt = None,
    timeout: TimeoutOpt = 30.0,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Normalised mean-pooled embeddings of TEXTS."""
    result = call_pool(endpoint, timeout, as_json,
                       lambda client: client.embed(texts, version=version),
                       client_keys(server_key, client_key, as_json))
    if as_json:
        emit_json({"ok": True, "dim": result.dim, "version": result.version,
                   "embeddings": result.embeddings})
        return
    for text, vector in zip(texts, result.embeddings, strict=True):
        head = ", ".join(f"{x:+.4f}" for x in vector[:6])
        out.print(f"{text!r}: dim {result.dim} [{head}, ...]")
    out.print(f"(version {result.version})")


@app.command()
def ping(
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    version: VersionOpt = None,
    timeout: TimeoutOpt = 5.0,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Is the pool answering? Prints the version it routes to and its ready workers."""
    result = call_pool(endpoint, timeout, as_json, lambda client: client.ping(version=version),
                       client_keys(server_key, client_key, as_json))
    if as_json:
        emit_json({"ok": True, "version": result.version, "workers": result.workers})
    else:
        out.print(f"pong: version {result.version}, {result.workers} ready worker(s)")


# -- operator commands -------------------------------------------------------------------

PoolOpt = Annotated[str | None, typer.Option(
    "--pool", envvar=POOL_ENV, help="A remote pool's control endpoint (its --control-bind, "
    "tcp://HOST:PORT), instead of the local pool of --state-dir: CurveZMQ, with --server-key "
    "(the pool's control public key) and --client-key (your operator .key_secret).")]
# Where an operator command's control connection goes, declared once: `operator_command`
# gives each command these options (those it does not declare itself) and one ControlTarget.
CONTROL_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("state_dir", StateDirOpt, DEFAULT_STATE_DIR),
    ("pool_endpoint", PoolOpt, None),
    ("server_key", Annotated[Path | None, typer.Option(
        "--server-key", envvar=SERVER_KEY_ENV, help="With --pool: the pool's control public "
        "key file (the .key of its --control-secret-key, by default its server.key).")], None),
    ("client_key", Annotated[Path | None, typer.Option(
        "--client-key", envvar=CLIENT_KEY_ENV, help="With --pool: your operator .key_secret "
        "(its .key is in the pool's --operator-keys).")], None),
)


def operator_command(command: Any) -> Any:
    """A command that talks to a pool's control socket. `command` takes `pool: ControlTarget`
    instead of the options of CONTROL_OPTIONS, which the CLI shows on it (as `pool serve`'s
    signature is generated from its settings); one it declares itself (calibrate's keys, also
    used on the frontend) is given to it as well."""
    signature = inspect.signature(command, eval_str=True)
    own = signature.parameters
    params = [p for name, p in own.items() if name != "pool"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=kind)
               for name, kind, default in CONTROL_OPTIONS if name not in own]

    def run(**options: Any) -> Any:
        where = {name: options[name] if name in own else options.pop(name)
                 for name, _, _ in CONTROL_OPTIONS}
        options["pool"] = control_target(**where, as_json=options.get("as_json", False))
        return command(**options)

    run.__name__, run.__qualname__ = command.__name__, command.__qualname__
    run.__doc__, run.__module__ = command.__doc__, command.__module__
    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return run


def control_target(state_dir: Path, pool_endpoint: str | None, server_key: Path | None,
                   client_key: Path | None, as_json: bool) -> ControlTarget:
    """The local pool of --state-dir, or with --pool a remote one over CurveZMQ."""
    if not pool_endpoint:
        return ControlTarget.local(state_dir)
    if server_key is None or client_key is None:
        fail(f"--pool {pool_endpoint}: remote control is CurveZMQ only; give --server-key (the "
             "pool's control public key) and --client-key (your operator .key_secret), or "
             f"{SERVER_KEY_ENV} and {CLIENT_KEY_ENV}", as_json, "usage", exit_code=2)
    keys = client_keys(server_key, client_key, as_json)
    assert keys is not None
    try:
        return ControlTarget.remote(pool_endpoint, keys)
    except ValueError as exc:
        fail(str(exc), as_json, "usage", exit_code=2)


def control(pool: ControlTarget, cmd: str, as_json: bool, **args: Any) -> dict:
    try:
        return control_request(pool, cmd, **args)
    except ControlError as exc:
        fail_control(exc, as_json)


def fail_control(exc: ControlError, as_json: bool, exit_code: int = 1) -> NoReturn:
    """A control error as the command's error: a refused operator key exits 3 (as a refused
    producer key does), the rest `exit_code`."""
    if isinstance(exc, ControlAuthFailed):
        fail(str(exc), as_json, "auth_failed", exit_code=AUTH_EXIT_CODE)
    code = ("not_running" if isinstance(exc, PoolNotRunning)
            else "unreachable" if isinstance(exc, PoolUnreachable) else "control")
    fail(str(exc), as_json, code, exit_code=exit_code)


def pool_model_path(pool: ControlTarget, spec: str | None, as_json: bool) -> str | None:
    """--path as the pool reads it. A remote pool reads its own filesystem: the path goes as
    given, and a built-in model is prepared on that machine, not on the operator's."""
    if spec is None or not pool.is_remote:
        return optional_model_path(spec, as_json)
    from pool.builtin import BUILTIN_PREFIX

    if spec.startswith(BUILTIN_PREFIX):
        fail(f"--path {spec} with --pool: a built-in model is converted where the pool runs; "
             "give its model directory on the pool's machine (there, `pool versions add "
             "NAME --path builtin:...` prepares it)", as_json, "usage", exit_code=2)
    return spec


@app.command()
@operator_command
def status(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """The running pool: versions, workers, queue, requests/s, last rotation, the machine."""
    from cli.ops import print_status

    st = control(pool, "status", as_json)
    if as_json:
        emit_json(st)
    else:
        print_status(out, st)


@app.command()
@operator_command
def health(
    pool: ControlTarget,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Judge this version "
                       "alone (default: the pool).")] = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Health per version with reasons, and the machine. Exit 0 healthy, 1 degraded, 2 failed
    (or not running), 3 operator key refused: usable as a liveness / readiness probe."""
    from cli.ops import print_health

    try:
        report = control_request(pool, "health", timeout_s=timeout, version=version)
    except ControlError as exc:
        fail_control(exc, as_json, exit_code=2)
    if as_json:
        emit_json(report)
    else:
        print_health(out, report)
    raise typer.Exit(report["exit_code"])


@app.command()
@operator_command
def stop(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """Stop the pool gracefully: in-flight work finishes, workers exit, registry is flushed."""
    control(pool, "stop", as_json)
    if as_json:
        emit_json({"ok": True, "stopping": True})
    else:
        out.print("stopping")


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="Where to write NAME.key and "
                         "NAME.key_secret.")],
    name: Annotated[str, typer.Option(help="File name stem, e.g. server or a producer's "
                    "name.")] = "server",
    as_json: JsonOpt = False,
) -> None:
    """Make a Curve key pair: the pool's (--curve-secret-key) or a producer's (--client-key;
    copy its public .key into the pool's --curve-allow directory)."""
    from router.keys import create_keys

    if (directory / f"{name}.key_secret").exists():
        fail(f"{directory / name}.key_secret exists; not overwriting a key", as_json,
             "usage", exit_code=2)
    public, secret = create_keys(directory, name)
    if as_json:
        emit_json({"ok": True, "public": str(public), "secret": str(secret)})
    else:
        out.print(f"public key {public} (give it out)\nsecret key {secret} (mode 0600; keep it)")


def several_pools(endpoint: str) -> bool:
    """Several endpoints, or a DNS name that may list several: a fleet, not one pool."""
    targets = split_endpoints(endpoint)
    return len(targets) > 1 or targets[0].startswith(DNS_SCHEME)


@app.command()
def bench(
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    spawn: Annotated[bool, typer.Option("--spawn", help="Start a pool of its own (stopped "
                     "after).")] = False,
    path: Annotated[str | None, typer.Option(help="With --spawn: model directory or "
                    f"builtin:NAME (default: {config.DEFAULT_MODEL}).")] = None,
    workers: Annotated[int, typer.Option(help="With --spawn: worker processes.", min=1)] = 2,
    concurrency: Annotated[int, typer.Option(help="Requests in flight in total.", min=1)] = 64,
    duration: Annotated[float, typer.Option(help="Seconds to run.", min=0.1)] = 20.0,
    requests: Annotated[int | None, typer.Option(help="Send this many requests instead of "
                        "running for --duration.", min=1)] = None,
    pairs_per_request: Annotated[int, typer.Option(min=1)] = 1,
    text_chars: Annotated[int, typer.Option(help="0: the bundled Chinese/English sentences; "
                          "N: synthetic texts of N characters.", min=0)] = 0,
    version: VersionOpt = None,
    producers: Annotated[int, typer.Option(help="Producer processes.", min=1)] = 2,
    failover: Annotated[bool | None, typer.Option(
        "--failover/--round-robin", help="Producers through the failover client (least "
        "loaded pool; a request whose pool dies or refuses it is sent again to another), or "
        "on raw DEALER sockets round-robin over the pools (the transport's own cost; a dead "
        "pool's requests are lost). Default: failover with several endpoints or dns://, raw "
        "with one.")] = None,
    rotate_at: Annotated[float | None, typer.Option(help="Start a rotation this many seconds "
                         "in.")] = None,
    rotate_to: Annotated[str | None, typer.Option(help="Version to rotate to (with --spawn: "
                         "the same model under this name unless --rotate-path).")] = None,
    rotate_path: Annotated[str | None, typer.Option(help="Model directory or builtin:NAME for "
                           "--rotate-to.")] = None,
    rotate_strategy: Annotated[str, typer.Option(help="surge | rolling | auto")] = "auto",
    rotate_every: Annotated[float | None, typer.Option(help="Soak: rotate back and forth "
                            "between the active version and --rotate-to (default v2) every "
                            "this many seconds; reports first vs last tenth.", min=1)] = None,
    model: Annotated[str, typer.Option(help="With --spawn: transformer, or echo (no model: "
                     "measures the router against libzmq's zmq.proxy).")] = "transformer",
    dtype: Annotated[str | None, typer.Option(help="With --spawn: the workers' --dtype "
                     "(default: the pool's, auto).")] = None,
    graph: Annotated[str | None, typer.Option(help="With --spawn: the workers' --graph "
                     "(default: the pool's, auto).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the text generator.")] = 0,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also measure the seed's "
                        "one-pair loop and an in-process batched loop on the same model and "
                        "thread budget; print the pool's ratio to each.")] = False,
    baseline_seconds: Annotated[float, typer.Option(min=1)] = 10.0,
    threads: Annotated[int | None, typer.Option(help="Torch threads of the baselines "
                       "(default: all cores) and, with --spawn, of the pool's workers "
                       "(default: the pool's): the same thread budget for both.", min=1)] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    json_file: Annotated[Path | None, typer.Option("--json-file", help="Write the report "
                         "here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw throughput and latency over time "
                    "(PNG).")] = None,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load-test a pool from producer processes over raw protocol v1; report and plot."""
    from cli.bench import run_bench
    from tooling.loadgen import LoadSpec

    if model == "echo" and not spawn:
        fail("--model echo needs --spawn (it starts an echo pool and a zmq.proxy beside it)",
             as_json, "bad_request", exit_code=2)
    if (dtype is not None or graph is not None) and not spawn:
        fail("--dtype and --graph need --spawn (a running pool keeps what it was started "
             "with)", as_json, "bad_request", exit_code=2)
    if rotate_every is not None and rotate_at is not None:
        fail("--rotate-every and --rotate-at exclude each other", as_json, "bad_request",
             exit_code=2)
    if rotate_every is None and (rotate_at is None) != (rotate_to is None):
        fail("--rotate-at and --rotate-to go together", as_json, "bad_request", exit_code=2)
    spec = LoadSpec(endpoint=endpoint, concurrency=concurrency,
                    duration_s=None if requests else duration, requests=requests,
                    pairs_per_request=pairs_per_request, text_chars=text_chars,
                    version=version or "", seed=seed, producers=producers,
                    curve=client_keys(server_key, client_key, as_json),
                    failover=several_pools(endpoint) if failover is None else failover)
    console = Console(stderr=as_json)
    try:
        report = run_bench(spec, spawn=spawn, path=optional_model_path(path, as_json),
                           workers=workers, state_dir=state_dir, rotate_at=rotate_at,
                           rotate_to=rotate_to,
                           rotate_path=optional_model_path(rotate_path, as_json),
                           json_file=json_file, plot_file=plot, as_json=as_json,
                           console=console, baseline_s=baseline_seconds if baseline else None,
                           threads=threads,
                           rotate_strategy=rotate_strategy, model=model, dtype=dtype,
                           graph=graph,
                           rotate_every=rotate_every)
    except ZeroPoolError as exc:
        fail_with(exc, as_json)
    except (RuntimeError, TimeoutError, ControlError) as exc:
        fail(str(exc), as_json)
    if as_json:
        emit_json(report)
    failed = sum(report["errors"].values()) + report["lost"]
    raise typer.Exit(1 if failed else 0)


@app.command()
def demo(
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 2,
    path: Annotated[str, typer.Option(help="v1's model: a directory or builtin:NAME.")]
        = config.ENGLISH_MODEL,
    rotate_path: Annotated[str, typer.Option(help="v2's model, rotated to under load.")]
        = config.DEFAULT_MODEL,
    plot: Annotated[Path, typer.Option(help="Where to save the plot.")] = Path("demo.png"),
    as_json: JsonOpt = False,
) -> None:
    """The whole story: a pool on English MiniLM (v1), 40 s of load with a rotation to the
    multilingual model (v2) and no failed request, the sample pairs as each version scored
    them, the report and a plot, a clean stop."""
    from cli.demo import run_demo

    paths = (model_path(path, as_json), model_path(rotate_path, as_json))
    raise typer.Exit(run_demo(workers=workers, paths=paths, names=(path, rotate_path),
                              plot=plot, as_json=as_json))


# -- rotation ------------------------------------------------------------------------------

PHASE_LABELS = {
    "spawning": "spawning new workers", "loading": "loading the model",
    "health_check": "health check", "switching": "switching routing",
    "canary": "canary running", "baking": "baking (old version loaded)",
    "draining": "draining the old version",
    "done": "done", "rolling_back": "rolling back", "failed": "failed",
}


@app.command()
@operator_command
def rotate(
    pool: ControlTarget,
    version: Annotated[str, typer.Option("--version", "-v", help="Version to rotate to.")],
    path: Annotated[str | None, typer.Option(help="Model directory or builtin:NAME "
                                             "(registers the version).")] = None,
    strategy: Annotated[str, typer.Option(help="surge | rolling | auto")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Workers of the new version "
                       "(default: as many as now).", min=1)] = None,
    drain_timeout: Annotated[float, typer.Option(help="Seconds the old version may keep "
                             "serving pinned requests.", min=0)] = 30.0,
    canary: Annotated[float | None, typer.Option(help="Route this % of unpinned traffic to "
                      "the new version and wait for `pool promote`.")] = None,
    thresholds: ThresholdsOpt = None,
    eval_set: EvalOpt = None,
    allow_dim_change: Annotated[bool, typer.Option(
        "--allow-dim-change", help="Rotate to a model whose embeddings have another size than "
        "the active version's (refused otherwise: stored embeddings would not mix).")] = False,
    bake: Annotated[float | None, typer.Option(
        help="After the switch, keep the old version loaded this many seconds and switch back "
        "at once if the new one's errors or p99 regress against the old one's.",
        min=0.1)] = None,
    max_error_rate: Annotated[float, typer.Option(
        help="With --bake: the share of requests the new version may fail beyond the old "
        "one's.", min=0, max=1)] = DEFAULT_MAX_ERROR_RATE,
    max_p99_ratio: Annotated[float, typer.Option(
        help="With --bake: the new version's p99 against the old one's, at most.",
        min=1)] = DEFAULT_MAX_P99_RATIO,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the rotation to its "
                    "end.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.")] = 900,
    as_json: JsonOpt = False,
) -> None:
    """Replace the serving version without failing a request: spawn, check, switch, (bake,)
    drain."""
    started = control(pool, "rotate", as_json, version=version,
                      path=pool_model_path(pool, path, as_json),
                      strategy=strategy, workers=workers, drain_timeout=drain_timeout,
                      canary=canary, thresholds=thresholds_option(thresholds, as_json),
                      eval=eval_option(eval_set, pool), allow_dim_change=allow_dim_change,
                      bake=bake, max_error_rate=max_error_rate, max_p99_ratio=max_p99_ratio)
    follow_rotation(pool, started["rotation"], wait, timeout, as_json)


@app.command()
@operator_command
def rollback(
    pool: ControlTarget,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.")] = 900,
    as_json: JsonOpt = False,
) -> None:
    """Abort the rotation or canary in progress, else rotate back to the previous version."""
    reply = control(pool, "rollback", as_json)
    if not as_json and reply["kind"] == "abort":
        out.print(f"aborting rotation {reply['rotation']['id']} to {reply['rotation']['target']}")
    follow_rotation(pool, reply["rotation"], wait, timeout, as_json,
                    expect_rollback=reply["kind"] == "abort")


@app.command()
@operator_command
def promote(pool: ControlTarget, as_json: JsonOpt = False,
            wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
            timeout: Annotated[float, typer.Option(help="Seconds to follow.")] = 900) -> None:
    """Finish a canary rotation: all unpinned traffic to the new version, drain the old."""
    reply = control(pool, "promote", as_json)
    follow_rotation(pool, reply["rotation"], wait, timeout, as_json)


@app.command()
@operator_command
def load(pool: ControlTarget,
         version: Annotated[str, typer.Argument(help="A registered version.")],
         workers: Annotated[int | None, typer.Option(help="Workers (default: as many as the "
                            "active version).", min=1)] = None,
         as_json: JsonOpt = False) -> None:
    """Start a registered version beside the active one: it serves requests pinned to it, and
    a later `pool rotate --version` to it only switches."""
    control(pool, "load", as_json, version=version, workers=workers)
    if as_json:
        emit_json({"ok": True, "loading": version})
    else:
        out.print(f"loading {version}; `pool status` shows when its workers are ready")


@app.command()
@operator_command
def unload(pool: ControlTarget,
           version: Annotated[str, typer.Argument(help="A loaded, non-active version.")],
           as_json: JsonOpt = False) -> None:
    """Stop a non-active version's workers (they drain first)."""
    control(pool, "unload", as_json, version=version)
    if as_json:
        emit_json({"ok": True, "unloading": version})
    else:
        out.print(f"unloading {version}")


def follow_rotation(pool: ControlTarget, rot: dict, wait: bool, timeout: float, as_json: bool,
                    expect_rollback: bool = False) -> None:
    """Print each phase as it is reached; exit 0 when done, 1 when it rolled back."""
    if not wait:
        if as_json:
            emit_json({"ok": True, "rotation": rot})
        else:
            out.print(f"rotation {rot['id']} to {rot['target']} started ({rot['strategy']})")
        return
    if not as_json:
        out.print(f"rotation {rot['id']}: {rot['source']} -> [bold]{rot['target']}[/] "
                  f"({rot['strategy']}, {rot['workers']} workers)")
    printed = 0
    deadline = time.monotonic() + timeout
    with contextlib.nullcontext() if as_json else out.status("") as spinner:
        while True:
            rot = control(pool, "rotation", as_json)["rotation"]
            if spinner is not None:
                for phase, seconds in list(rot["timings"].items())[printed:]:
                    out.print(f"  {PHASE_LABELS.get(phase, phase):<28} {seconds:7.2f}s")
                printed = len(rot["timings"])
                spinner.update(f"{PHASE_LABELS.get(rot['phase'], rot['phase'])} "
                               f"{rot['phase_elapsed_s']:.1f}s")
            if rot["outcome"] is not None or rot["phase"] == "canary" or \
                    time.monotonic() > deadline:
                break
            time.sleep(ROTATION_POLL_S)
    ok = rot["outcome"] == "done" or rot["phase"] == "canary" or (
        expect_rollback and rot["outcome"] == "rolled_back")
    if as_json:
        emit_json({"ok": ok, "rotation": rot})
        if not ok:
            raise typer.Exit(1)
        return
    if rot.get("quality"):
        from cli.ops import quality_line

        out.print(quality_line(rot["quality"]))
    if rot["phase"] == "canary":
        out.print(f"canary: {rot['canary']:.0%} of unpinned traffic to {rot['target']}; "
                  "`pool promote` to finish, `pool rollback` to end it")
    elif rot["outcome"] == "done":
        out.print(f"[green]done[/]: {rot['target']} serves, {rot['source']} is gone "
                  f"({rot['total_s']:.2f}s)")
    elif rot["outcome"] == "rolled_back":
        style = "yellow" if expect_rollback else "red"
        out.print(f"[{style}]rolled back[/]: {rot['source']} still serves; reason: {rot['reason']}")
    else:
        out.print(f"[red]still {rot['phase']} after {timeout:.0f}s[/]; see `pool status`")
    if not ok:
        raise typer.Exit(1)


# -- fleets ------------------------------------------------------------------------------------

fleet_app = typer.Typer(help="Several pools as one service: status, rotate, rollback.",
                        no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")
PoolsOpt = Annotated[str, typer.Option(
    "--pools", envvar="ZEROPOOL_POOLS", help="Comma-separated pools: control endpoints "
    "(tcp://HOST:PORT, with --server-key/--client-key), dns://NAME:PORT (every address of "
    "the name), or local state directories.")]
MaxParallelOpt = Annotated[int, typer.Option(help="Pools rotating at once after the canary.",
                                             min=1)]


FleetServerKeyOpt = Annotated[Path | None, typer.Option(
    "--server-key", envvar=SERVER_KEY_ENV, help="For tcp:// and dns:// pools: the pools' "
    "control public key file.")]
FleetClientKeyOpt = Annotated[Path | None, typer.Option(
    "--client-key", envvar=CLIENT_KEY_ENV, help="For tcp:// and dns:// pools: your operator "
    ".key_secret.")]


def fleet_links(pools: str, server_key: Path | None, client_key: Path | None,
                as_json: bool) -> list:
    """A link per pool of --pools: remote ones over CurveZMQ with the operator's keys."""
    from functools import partial

    from cli.fleet import pool_entries, pool_links
    from pool.fleet import FleetError, PoolLink

    keys = client_keys(server_key, client_key, as_json)

    def remote(endpoint: str) -> PoolLink:
        assert keys is not None
        return PoolLink(endpoint, partial(control_request, ControlTarget.remote(endpoint, keys)))

    try:
        return pool_links(pool_entries(pools), None if keys is None else remote)
    except (FleetError, ValueError) as exc:
        fail(str(exc), as_json, "usage", exit_code=2)


@fleet_app.command("status")
def fleet_status_command(pools: PoolsOpt, server_key: FleetServerKeyOpt = None,
                         client_key: FleetClientKeyOpt = None, as_json: JsonOpt = False
                         ) -> None:
    """One row per pool: version, state, traffic, rotation; exit 1 if one is unreachable."""
    from cli.fleet import print_fleet_status
    from pool.fleet import fleet_status

    rows = fleet_status(fleet_links(pools, server_key, client_key, as_json))
    ok = all(row["reachable"] for row in rows)
    if as_json:
        emit_json({"ok": ok, "pools": rows})
    else:
        print_fleet_status(out, rows)
    if not ok:
        raise typer.Exit(1)


@fleet_app.command("rotate")
def fleet_rotate(
    pools: PoolsOpt,
    version: Annotated[str, typer.Option("--version", "-v", help="Version to rotate to.")],
    path: Annotated[str | None, typer.Option(help="Model directory (the same on every pool), "
                                             "registering the version.")] = None,
    bake: Annotated[float | None, typer.Option(
        help="Bake the canary pool this many seconds, judged against its old version and "
        "the rest of the fleet.", min=0.1)] = None,
    max_parallel: MaxParallelOpt = 1,
    strategy: Annotated[str, typer.Option(help="surge | rolling | auto")] = "auto",
    eval_set: Annotated[str | None, typer.Option(
        "--eval", help="Every pool's quality gate: a labelled TSV each pool reads on its own "
        "machine (a path here is made absolute where the file exists here), or "
        "builtin:zh-pairs; a pool whose new version scores too low rolls the fleet back.",
    )] = None,
    max_error_rate: Annotated[float, typer.Option(min=0, max=1, help="With --bake: errors "
                              "the canary may have beyond the others'.")] = DEFAULT_MAX_ERROR_RATE,
    max_p99_ratio: Annotated[float, typer.Option(min=1, help="With --bake: the canary's p99 "
                             "against the others', at most.")] = DEFAULT_MAX_P99_RATIO,
    server_key: FleetServerKeyOpt = None,
    client_key: FleetClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rotate every pool: one canary first (baked), then the rest --max-parallel at a time;
    any failure rotates every rotated pool back. Run it again to continue an interrupted one."""
    from pool.fleet import FleetRollout
    from pool.judge import BakeLimits

    run_fleet(lambda links, progress: FleetRollout(
        links, version, path, bake_s=bake, max_parallel=max_parallel, strategy=strategy,
        eval_set=fleet_eval_option(eval_set), limits=BakeLimits(max_error_rate, max_p99_ratio),
        on_progress=progress),
        fleet_links(pools, server_key, client_key, as_json), as_json)


@fleet_app.command("rollback")
def fleet_rollback(
    pools: PoolsOpt,
    to: Annotated[str | None, typer.Option(help="Version every pool returns to (default: "
                                           "the pools' previous version).")] = None,
    max_parallel: MaxParallelOpt = 1,
    server_key: FleetServerKeyOpt = None,
    client_key: FleetClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return every pool to one version, one pool (or --max-parallel) at a time."""
    from pool.fleet import FleetRollout, previous_version

    def make(links: list, progress: Any) -> FleetRollout:
        return FleetRollout(links, to or previous_version(links), None,
                            max_parallel=max_parallel, on_progress=progress)

    run_fleet(make, fleet_links(pools, server_key, client_key, as_json), as_json)


def run_fleet(make: Any, links: list, as_json: bool) -> None:
    from cli.fleet import print_report, progress_printer
    from pool.fleet import FleetError

    try:
        report = make(links, None if as_json else progress_printer(out)).run()
    except FleetError as exc:
        fail(str(exc), as_json, "fleet")
    if as_json:
        emit_json({"ok": report.outcome == "done", "report": report.as_dict()})
    else:
        print_report(out, report)
    if report.outcome != "done":
        raise typer.Exit(1)


# -- the version registry -------------------------------------------------------------------

versions_app = typer.Typer(help="The version registry (versions.json in the state directory).",
                           no_args_is_help=True)
app.add_typer(versions_app, name="versions")


def registry_command(pool: ControlTarget, cmd: str, as_json: bool, offline: Any,
                     **args: Any) -> dict:
    """Through the running pool if there is one, else (a local pool only) on the registry
    file directly."""
    try:
        return control_request(pool, cmd, **args)
    except PoolNotRunning:
        pass
    except ControlError as exc:
        fail_control(exc, as_json)
    from pool.registry import Registry

    registry = Registry(pool.state_dir or DEFAULT_STATE_DIR)
    try:
        offline(registry)
    except (ValueError, KeyError) as exc:
        fail(str(exc), as_json, "bad_request", exit_code=2)
    registry.save()
    return {"versions": registry.listing()}


def eval_option(spec: str | None, pool: ControlTarget) -> str | None:
    """--eval as the pool reads it: a packaged set's name, or a file's absolute path (the
    pool runs elsewhere in the filesystem; a remote pool on its own machine, so there the
    path goes as given); the pool checks that it parses."""
    from pool.gate import PACKAGED_SETS

    if spec is None or spec in PACKAGED_SETS or pool.is_remote:
        return spec
    return str(Path(spec).expanduser().resolve())


def fleet_eval_option(spec: str | None) -> str | None:
    """A fleet's --eval: a packaged set's name as it is; a file that exists here by its
    absolute path (pools on this machine); any other path as given, for pools that have it
    on theirs."""
    if spec is None or not Path(spec).expanduser().is_file():
        return spec
    return str(Path(spec).expanduser().resolve())


def thresholds_option(flag: str | None, as_json: bool) -> list[float] | None:
    """--thresholds HIGH,LOW as the control socket's [high, low]; a usage error if bad."""
    if flag is None:
        return None
    from pool.quality import parse_thresholds
    from pool.thresholds import thresholds_to_json

    try:
        return thresholds_to_json(parse_thresholds(flag))
    except ValueError as exc:
        fail(str(exc), as_json, "usage", exit_code=2)


def print_versions(reply: dict, as_json: bool) -> None:
    from cli.ops import thresholds_cell

    if as_json:
        emit_json({"ok": True, "versions": reply["versions"]})
        return
    table = Table("version", "path", "auto-load", "role", "thresholds (source)")
    for v in reply["versions"]:
        role = "active" if v["active"] else "previous" if v["previous"] else ""
        table.add_row(v["version"], v["path"], "yes" if v["auto_load"] else "", role,
                      thresholds_cell(v))
    out.print(table)


@versions_app.command("list")
@operator_command
def versions_list(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """Registered versions, the active and the previous one."""
    print_versions(registry_command(pool, "versions", as_json, lambda r: None), as_json)


@versions_app.command("add")
@operator_command
def versions_add(
    pool: ControlTarget,
    version: Annotated[str, typer.Argument(help="Version name, e.g. v2.")],
    path: Annotated[str, typer.Option(help="Local transformers model directory, or "
                    "builtin:multilingual-e5-small | builtin:minilm.")],
    auto_load: Annotated[bool, typer.Option("--auto-load", help="Load it whenever the pool "
                         "starts (serves pinned requests).")] = False,
    expect: Annotated[Path | None, typer.Option(help="golden.json: {\"pairs\": \\[\\[a, b], ...],"
                      " \"scores\": [...], \"tolerance\": 0.01} checked before it serves.")]
        = None,
    thresholds: ThresholdsOpt = None,
    eval_set: EvalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a version (checked to be a model directory)."""
    golden = read_json_file(expect, as_json) if expect else None
    cuts = thresholds_option(thresholds, as_json)
    path = pool_model_path(pool, path, as_json) or path
    gate_set = eval_option(eval_set, pool)
    reply = registry_command(
        pool, "versions_add", as_json,
        lambda r: r.add(version, path, auto_load=auto_load, expect=golden, thresholds=cuts,
                        eval_set=gate_set),
        version=version, path=path, auto_load=auto_load, expect=golden, thresholds=cuts,
        eval=gate_set)
    print_versions(reply, as_json)


@versions_app.command("remove")
@operator_command
def versions_remove(pool: ControlTarget, version: Annotated[str, typer.Argument()],
                    as_json: JsonOpt = False) -> None:
    """Forget a version (refused for the active one)."""
    reply = registry_command(pool, "versions_remove", as_json, lambda r: r.remove(version),
                             version=version)
    print_versions(reply, as_json)


@versions_app.command("import")
@operator_command
def versions_import(pool: ControlTarget,
                    file: Annotated[Path, typer.Argument(help="The seed's model_versions.json.")],
                    as_json: JsonOpt = False) -> None:
    """Import the seed app's model_versions.json (current_version, versions: {v: {path}})."""
    doc = read_json_file(file, as_json)
    reply = registry_command(pool, "versions_import", as_json, lambda r: r.import_seed(doc),
                             doc=doc)
    print_versions(reply, as_json)


def read_json_file(path: Path, as_json: bool) -> Any:
    try:
        return orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        fail(f"cannot read {path}: {exc}", as_json, "bad_request", exit_code=2)


# -- quality ---------------------------------------------------------------------------------

PROGRESS_MIN_PAIRS = 200  # a set this long shows a progress bar while it is scored


@app.command()
@operator_command
def calibrate(
    pool: ControlTarget,
    version: Annotated[str, typer.Argument(help="A version the pool serves (pinned to it).")],
    pairs: Annotated[str | None, typer.Option(help="Labelled pairs, label<TAB>text_a<TAB>"
                     "text_b per line (2 same meaning, 1 same topic, 0 unrelated), or "
                     "builtin:zh-pairs. Default: the packaged Chinese set.")] = None,
    save: Annotated[bool, typer.Option("--save", help="Store the fitted thresholds on the "
                    "version in the registry.")] = False,
    batch_pairs: Annotated[int, typer.Option(help="Pairs per request.", min=1)] = 32,
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    timeout: TimeoutOpt = 60.0,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a labelled set through the pool: Spearman, AUC, verdict accuracy at the version's
    thresholds and at the best ones for the set; --save stores those on the version (through
    --state-dir's pool, or --pool's: the keys are then the frontend's and the control's)."""
    from cli.ops import print_calibration
    from pool.gate import read_eval_set
    from pool.quality import PairsFileError, load_default_pairs
    from tooling.calibrate import calibrate as run_calibration
    from tooling.calibrate import calibration_document

    try:
        labelled = list(read_eval_set(pairs)) if pairs is not None else load_default_pairs()
    except PairsFileError as exc:
        fail(str(exc), as_json, "bad_pairs_file", exit_code=2)
    source = pairs if pairs is not None else "the packaged pool/data/zh_pairs.tsv"
    keys = client_keys(server_key, client_key, as_json)
    show_progress = not as_json and len(labelled) >= PROGRESS_MIN_PAIRS
    with calibration_progress(len(labelled), show_progress) as progress:
        cal = call_pool(endpoint, timeout, as_json, lambda client: run_calibration(
            client, version, labelled, source, batch_pairs, progress), keys)
    doc = calibration_document(cal)
    if save:
        doc["saved"] = save_thresholds(pool, version, doc["fitted_thresholds"], as_json)
    if as_json:
        emit_json({"ok": True, **doc})
    else:
        print_calibration(out, doc)


@contextlib.contextmanager
def calibration_progress(total: int, shown: bool) -> Any:
    """A callback taking the pairs scored so far: a rich progress bar, or nothing."""
    if not shown:
        yield lambda done: None
        return
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("scoring pairs", total=total)
        yield lambda done: bar.update(task, completed=done)


def save_thresholds(pool: ControlTarget, version: str, thresholds: list[float],
                    as_json: bool) -> dict:
    """Store thresholds on a version, through the pool or on the registry file."""
    reply = registry_command(pool, "versions_thresholds", as_json,
                             lambda r: r.set_thresholds(version, thresholds),
                             version=version, thresholds=thresholds)
    return {"thresholds": thresholds, "in_use": reply.get("in_use")}


# -- the HTTP door -----------------------------------------------------------------------------

# router.http's defaults, restated: importing it here would load Starlette for every command.
HTTP_MAX_BODY_BYTES = 4 * 1024 * 1024
HTTP_POOL_TIMEOUT_S = 30.0
INSECURE_WARNING = ("WARNING: pool http listens on {host} WITHOUT AUTHENTICATION (--insecure): "
                    "anyone who reaches {url} can use the pool. Give --token-file.")


@app.command("http")
def http_door(
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.", min=1, max=65535)] = 8080,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="Bearer tokens, one per line; without it, no authentication "
        "(refused off loopback unless --insecure).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve without --token-file on a non-loopback address.")] = False,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1,
        help="Largest request body; beyond: 413.")] = HTTP_MAX_BODY_BYTES,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.01,
        help="Seconds to wait for the pool's reply; beyond: 503.")] = HTTP_POOL_TIMEOUT_S,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", help="HTTPS: the certificate (PEM, chain first) the door presents.")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="HTTPS: the certificate's private key (PEM).")] = None,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """OpenAI- and TEI-compatible HTTP API in front of the pool (docs/http.md)."""
    from router.http import HttpSettings, Tls, is_loopback, load_tokens, run

    tls = None
    if (tls_cert is None) != (tls_key is None):
        fail("HTTPS needs both --tls-cert and --tls-key", as_json, "usage", exit_code=2)
    if tls_cert is not None and tls_key is not None:
        tls = Tls(tls_cert, tls_key)
        try:
            tls.check()
        except ValueError as exc:
            fail(f"--tls-cert/--tls-key: {exc}", as_json, "usage", exit_code=2)

    tokens: frozenset[str] = frozenset()
    if token_file is not None:
        try:
            tokens = load_tokens(token_file)
        except (OSError, ValueError) as exc:
            fail(f"--token-file: {exc}", as_json, "usage", exit_code=2)
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    if not tokens and not is_loopback(host):
        if not insecure:
            fail(f"{host} is not a loopback address: give --token-file, or --insecure to "
                 "serve without authentication", as_json, "usage", exit_code=2)
        err.print(f"[bold red]{INSECURE_WARNING.format(host=host, url=url)}[/]")
    elif tokens and tls is None and not is_loopback(host):
        err.print(f"[bold yellow]warning: bearer tokens cross the network in clear text on "
                  f"{url}: give --tls-cert and --tls-key (or put a TLS proxy in front)[/]")
    settings = HttpSettings(endpoint, tokens, max_body_bytes, timeout,
                            client_keys(server_key, client_key, as_json))
    if as_json:
        emit_json({"url": url, "endpoint": endpoint, "auth": bool(tokens)})
    else:
        out.print(f"zeropool HTTP on {url} (pool {endpoint}, "
                  f"{'bearer tokens' if tokens else 'no authentication'}); Ctrl-C stops it")
    sys.stdout.flush()
    run(settings, host, port, tls)


# -- the web console ---------------------------------------------------------------------------

UI_SCRIPT = Path(__file__).with_name("web.py")
UI_EXTRA_MISSING = "pool ui needs the ui extra: pip install 'zeropool[ui]'"
UI_STOP_GRACE_S = 10.0  # after SIGINT/SIGTERM, how long Streamlit may take before SIGKILL


@app.command()
@operator_command
def ui(
    pool: ControlTarget,
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    port: Annotated[int, typer.Option(help="HTTP port of the page.", min=1, max=65535)] = 8501,
    host: Annotated[str, typer.Option(help="Address the page listens on.")] = "127.0.0.1",
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The web console (Streamlit): similarity form, version operations and live status
    (through --state-dir's pool, or --pool's: the keys are then the frontend's and the
    control's)."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        fail(UI_EXTRA_MISSING, as_json, "missing_extra", exit_code=2)
    env = {**os.environ, ENDPOINT_ENV: endpoint, config.STATE_ENV: str(state_dir)}
    if client_keys(server_key, client_key, as_json) is not None:  # checked here, used there
        env |= {SERVER_KEY_ENV: str(server_key), CLIENT_KEY_ENV: str(client_key)}
    env.pop(POOL_ENV, None)
    if pool.is_remote:
        env[POOL_ENV] = str(pool.endpoint)
    url = f"http://{host}:{port}"
    if as_json:
        emit_json({"url": url})
    else:
        out.print(f"zeropool console on {url} (pool {endpoint}, state directory {state_dir}); "
                  "Ctrl-C stops it")
    sys.stdout.flush()
    raise typer.Exit(run_child(streamlit_command(port, host), env))


def streamlit_command(port: int, host: str) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT),
            "--server.headless", "true", "--server.port", str(port), "--server.address", host,
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "viewer"]


def run_child(command: list[str], env: dict[str, str]) -> int:
    """Run `command` until it exits, forwarding SIGINT/SIGTERM to it; its exit code once reaped
    (128 + N when signal N ended it). It is killed if it outlives a stop by UI_STOP_GRACE_S."""
    import signal
    import subprocess

    child = subprocess.Popen(command, env=env)
    stop_asked: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        stop_asked.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_asked and time.monotonic() - stop_asked[0] > UI_STOP_GRACE_S:
                    child.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # leaving on an exception: never orphan the server
            child.kill()
            child.wait()
    return code if code >= 0 else 128 - code


def main() -> None:
    app()


if __name__ == "__main__":
    main()
