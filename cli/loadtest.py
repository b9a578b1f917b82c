"""`pool bench` and `pool demo`: load a pool and report. Their display (cli.bench, cli.demo)
is imported when they run: it loads numpy and tooling, which the other commands do without."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cli.common import (
    DEFAULT_STATE_DIR,
    ClientKeyOpt,
    EndpointOpt,
    JsonOpt,
    ServerKeyOpt,
    StateDirOpt,
    VersionOpt,
    check_endpoint,
    client_keys,
    emit_json,
    err,
    fail,
    fail_with,
    local_model_path,
    optional_local_model_path,
    os_reason,
)
from pool import config
from pool.control import ControlError
from router.client import ZeroPoolError, split_endpoints
from router.failover import DNS_SCHEME

if TYPE_CHECKING:
    from tooling.bench import BenchResult


def several_pools(endpoint: str) -> bool:
    """Several endpoints, or a DNS name that may list several: a fleet, not one pool."""
    targets = split_endpoints(endpoint)
    return len(targets) > 1 or targets[0].startswith(DNS_SCHEME)


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
    cpu_affinity: Annotated[str | None, typer.Option(help="With --spawn: the pool's "
                            "--cpu-affinity (default: the pool's, off).")] = None,
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
    from tooling.bench import run_failures
    from tooling.loadgen import LoadSpec

    if model == "echo" and not spawn:
        fail("--model echo needs --spawn (it starts an echo pool and a zmq.proxy beside it)",
             as_json, "bad_request", exit_code=2)
    if (dtype, graph, cpu_affinity) != (None, None, None) and not spawn:
        fail("--dtype, --graph and --cpu-affinity need --spawn (a running pool keeps what it "
             "was started with)", as_json, "bad_request", exit_code=2)
    if rotate_every is not None and rotate_at is not None:
        fail("--rotate-every and --rotate-at exclude each other", as_json, "bad_request",
             exit_code=2)
    if rotate_every is None and (rotate_at is None) != (rotate_to is None):
        fail("--rotate-at and --rotate-to go together", as_json, "bad_request", exit_code=2)
    if rotate_at is not None and requests is None and rotate_at >= duration:
        fail(f"--rotate-at {rotate_at:g} is not within the run's --duration {duration:g}: the "
             "rotation would never start", as_json, "bad_request", exit_code=2)
    check_endpoint(endpoint, as_json)
    for option, file in (("--json-file", json_file), ("--plot", plot)):
        check_output_file(file, option, as_json)
    spec = LoadSpec(endpoint=endpoint, concurrency=concurrency,
                    duration_s=None if requests else duration, requests=requests,
                    pairs_per_request=pairs_per_request, text_chars=text_chars,
                    version=version or "", seed=seed, producers=producers,
                    curve=client_keys(server_key, client_key, as_json),
                    failover=several_pools(endpoint) if failover is None else failover)
    console = Console(stderr=as_json)
    try:
        result = run_bench(spec, spawn=spawn, path=optional_local_model_path(path, as_json),
                           workers=workers, state_dir=state_dir, rotate_at=rotate_at,
                           rotate_to=rotate_to,
                           rotate_path=optional_local_model_path(rotate_path, as_json),
                           as_json=as_json, console=console,
                           baseline_s=baseline_seconds if baseline else None,
                           threads=threads,
                           rotate_strategy=rotate_strategy, model=model, dtype=dtype,
                           graph=graph, cpu_affinity=cpu_affinity,
                           rotate_every=rotate_every)
    except ZeroPoolError as exc:
        fail_with(exc, as_json)
    except (RuntimeError, TimeoutError, ControlError) as exc:
        fail(str(exc), as_json)
    report = result.report
    if as_json:
        emit_json(report)  # before the files: a file that cannot be written loses nothing
    save_files(result, json_file, plot, console, as_json)
    problems = run_failures(report, rotate_at is not None or rotate_every is not None)
    for problem in problems:
        err.print(f"[bold red]error[/]: {escape(problem)}")
    failed = sum(report["errors"].values()) + report["lost"]
    raise typer.Exit(1 if failed or problems else 0)


def check_output_file(path: Path | None, option: str, as_json: bool) -> None:
    """A file the run writes at its end, checked before it starts: a path that cannot be
    written would otherwise fail only after the whole run."""
    if path is None:
        return
    parent = path.expanduser().parent
    problem = (f"directory {parent} does not exist" if not parent.is_dir()
               else f"{path} is a directory" if path.is_dir()
               else f"directory {parent} is not writable" if not os.access(parent, os.W_OK)
               else f"{path} is not writable" if path.exists() and not os.access(path, os.W_OK)
               else None)
    if problem is not None:
        fail(f"{option} {path}: {problem}", as_json, "usage", exit_code=2)


def save_files(result: BenchResult, json_file: Path | None, plot: Path | None,
               console: Console, as_json: bool) -> None:
    """The report's files, once the report is out. A failure is said on stderr, as plain
    text even with --json: stdout already holds the report, and a second JSON document
    would break whoever parses it."""
    from cli.bench import save_outputs

    try:
        save_outputs(result, json_file, plot, console, as_json)
    except OSError as exc:
        fail(f"the report is out, but its files are not: {os_reason(exc)}", False)


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

    check_output_file(plot, "--plot", as_json)
    paths = (local_model_path(path, as_json), local_model_path(rotate_path, as_json))
    try:
        code = run_demo(workers=workers, paths=paths, names=(path, rotate_path), plot=plot,
                        as_json=as_json)
    except ZeroPoolError as exc:
        fail_with(exc, as_json)
    except (RuntimeError, TimeoutError, ControlError) as exc:  # e.g. v1's pool never served
        fail(str(exc), as_json)
    except OSError as exc:  # the plot, checked before but unwritable after all
        fail(f"--plot {plot}: {os_reason(exc)}", as_json)
    raise typer.Exit(code)
