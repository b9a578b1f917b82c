"""`pool fleet ...`: several pools as one service. Parsing --pools and the display are
cli.fleet, imported when a command runs (it loads pool.fleet, which the other commands do
without)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOpt, client_keys, emit_json, fail, out
from pool.control import ControlTarget, control_request
from pool.judge import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_P99_RATIO
from router.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV

fleet_app = typer.Typer(help="Several pools as one service: status, rotate, rollback.",
                        no_args_is_help=True)
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
        links, version, fleet_path_option(path), bake_s=bake, max_parallel=max_parallel,
        strategy=strategy,
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


def fleet_eval_option(spec: str | None) -> str | None:
    """A fleet's --eval: a packaged set's name as it is; a file that exists here by its
    absolute path (pools on this machine); any other path as given, for pools that have it
    on theirs."""
    return absolute_if_here(spec, Path.is_file)


def fleet_path_option(spec: str | None) -> str | None:
    """A fleet's --path, as its --eval: a directory that exists here by its absolute path
    (local pools run in directories of their own, where a relative one names another); any
    other path as given, for pools that have it on their machines."""
    return absolute_if_here(spec, Path.is_dir)


def absolute_if_here(spec: str | None, exists: Callable[[Path], bool]) -> str | None:
    """`spec` made absolute where `exists` says it names something on this machine."""
    if spec is None or not exists(Path(spec).expanduser()):
        return spec
    return str(Path(spec).expanduser().resolve())
