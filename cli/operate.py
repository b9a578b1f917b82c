"""The operator's commands on one pool, through its control socket: status, health, stop,
rotate, rollback, promote, load, unload; and keygen, which makes the keys they use."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    EvalOpt,
    JsonOpt,
    ThresholdsOpt,
    TimeoutOpt,
    control,
    emit_json,
    err,
    eval_option,
    fail,
    fail_control,
    operator_command,
    os_reason,
    out,
    plural,
    pool_model_path,
    thresholds_option,
)
from pool.control import (
    ControlError,
    ControlTarget,
    PoolNotRunning,
    PoolStarting,
    PoolUnreachable,
    control_request,
)
from pool.judge import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_P99_RATIO

ROTATION_POLL_S = 0.2


@operator_command
def status(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """The running pool: versions, workers, queue, requests/s, last rotation, the machine."""
    from cli.ops import print_status

    st = control(pool, "status", as_json)
    if as_json:
        emit_json(st)
    else:
        print_status(out, st)


@operator_command
def health(
    pool: ControlTarget,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Judge this version "
                       "alone (default: the pool).")] = None,
    timeout: TimeoutOpt = 5.0,
    wait: Annotated[float, typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="Ask again until it is healthy, for up to SECONDS (a pool not up yet, or still "
             "loading its workers, is waited for); then its last answer.")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Health per version with reasons, and the machine. Exit 0 healthy, 1 degraded, 2 failed
    (or not running), 3 operator key refused: usable as a liveness / readiness probe, and
    with --wait as `pool serve`'s "ready" for scripts."""
    from cli.ops import print_health

    report = _health_within(pool, version, timeout, wait, as_json)
    if as_json:
        emit_json(report)
    else:
        print_health(out, report)
    raise typer.Exit(report["exit_code"])


HEALTH_POLL_S = 0.5
NOT_UP_YET = (PoolNotRunning, PoolStarting, PoolUnreachable)  # what waiting may cure


def _health_within(pool: ControlTarget, version: str | None, timeout: float, wait_s: float,
                   as_json: bool) -> dict:
    """The pool's health report: the first healthy one within `wait_s`, else the last. A
    pool not up yet is waited for as long; any other control error ends it at once."""
    give_up = time.monotonic() + wait_s
    with contextlib.nullcontext() if as_json or not wait_s else err.status("") as spinner:
        while True:
            left = give_up - time.monotonic()
            try:
                # A try's own timeout ends with the wait (a silent remote pool).
                report = control_request(pool, "health", version=version, timeout_s=min(
                    timeout, max(left, HEALTH_POLL_S)) if wait_s else timeout)
            except ControlError as exc:
                if not isinstance(exc, NOT_UP_YET) or left <= 0:
                    fail_control(exc, as_json, exit_code=2)
                waiting_for = str(exc)
            else:
                if report["exit_code"] == 0 or left <= 0:
                    return report
                waiting_for = f"{report['status']}: " + "; ".join(
                    report["pool"]["reasons"] or [f"active {report['active']}"])
            if spinner is not None:
                spinner.update(f"waiting for the pool ({max(left, 0):.0f}s left): "
                               f"{waiting_for}"[:200])
            time.sleep(min(HEALTH_POLL_S, max(left, 0.0)))


@operator_command
def stop(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """Stop the pool gracefully: in-flight work finishes, workers exit, registry is flushed."""
    control(pool, "stop", as_json)
    if as_json:
        emit_json({"ok": True, "stopping": True})
    else:
        out.print("stopping")


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
    try:
        public, secret = create_keys(directory, name)
    except OSError as exc:  # DIRECTORY is a file, under one, or not writable
        fail(f"cannot write keys into {directory}: {os_reason(exc)}", as_json, "usage",
             exit_code=2)
    if as_json:
        emit_json({"ok": True, "public": str(public), "secret": str(secret)})
    else:
        out.print(f"public key {public} (give it out)\nsecret key {secret} (mode 0600; keep it)")


PHASE_LABELS = {
    "spawning": "spawning new workers", "loading": "loading the model",
    "health_check": "health check", "switching": "switching routing",
    "canary": "canary running", "baking": "baking (old version loaded)",
    "draining": "draining the old version",
    "done": "done", "rolling_back": "rolling back", "failed": "failed",
}


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
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.",
                                          min=0.1)] = 900,
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


@operator_command
def rollback(
    pool: ControlTarget,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.",
                                          min=0.1)] = 900,
    to: Annotated[str | None, typer.Option(
        "--to", help="Rotate back to this registered version instead of the previous one.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Abort the rotation or canary in progress, else rotate back to the previous version."""
    reply = control(pool, "rollback", as_json, **({"version": to} if to else {}))
    if not as_json and reply["kind"] == "abort":
        out.print(f"aborting rotation {reply['rotation']['id']} to {reply['rotation']['target']}")
    follow_rotation(pool, reply["rotation"], wait, timeout, as_json,
                    expect_rollback=reply["kind"] == "abort")


@operator_command
def promote(pool: ControlTarget, as_json: JsonOpt = False,
            wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
            timeout: Annotated[float, typer.Option(help="Seconds to follow.",
                                                   min=0.1)] = 900) -> None:
    """Finish a canary rotation: all unpinned traffic to the new version, drain the old."""
    reply = control(pool, "promote", as_json)
    follow_rotation(pool, reply["rotation"], wait, timeout, as_json)


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


def rotation_now(pool: ControlTarget, rot: dict, as_json: bool) -> dict:
    """The rotation as the pool has it now; a pool gone meanwhile ends the command saying
    where the rotation was cut off."""
    try:
        return control_request(pool, "rotation")["rotation"]
    except PoolNotRunning:
        fail(f"the pool stopped during rotation {rot['id']} to {rot['target']} (last seen "
             f"{PHASE_LABELS.get(rot['phase'], rot['phase'])}): it did not finish; the pool's "
             "log says why", as_json, "interrupted")
    except ControlError as exc:
        fail_control(exc, as_json)


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
                  f"({rot['strategy']}, {plural(rot['workers'], 'worker')})")
    printed = 0
    deadline = time.monotonic() + timeout
    with contextlib.nullcontext() if as_json else out.status("") as spinner:
        while True:
            rot = rotation_now(pool, rot, as_json)
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
        out.print(f"[red]still {rot['phase']} after {timeout:g}s[/]: it goes on in the pool; "
                  "follow it with `pool status`")
    if not ok:
        raise typer.Exit(1)
