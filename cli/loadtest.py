"""`pool bench` and `pool demo`: load a pool and report. Their display (cli.bench, cli.demo)
is imported when they run: it loads numpy and tooling, which the other commands do without."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.common import (
    DEFAULT_STATE_DIR,
    ClientKeyOpt,
    EndpointOpt,
    JsonOpt,
    ServerKeyOpt,
    StateDirOpt,
    VersionOpt,
    client_keys,
    emit_json,
    fail,
    fail_with,
    model_path,
    optional_model_path,
)
from pool import config
from pool.control import ControlError
from router.client import ZeroPoolError, split_endpoints
from router.failover import DNS_SCHEME


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
