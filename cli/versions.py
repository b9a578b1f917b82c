"""`pool versions ...`: the version registry, through the running pool or on its file; and
`pool calibrate`, which fits a version's thresholds and can store them there."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from cli.common import (
    DEFAULT_STATE_DIR,
    ClientKeyOpt,
    EndpointOpt,
    EvalOpt,
    JsonOpt,
    ServerKeyOpt,
    ThresholdsOpt,
    TimeoutOpt,
    call_pool,
    check_endpoint,
    client_keys,
    emit_json,
    err,
    eval_option,
    fail,
    fail_control,
    operator_command,
    os_reason,
    out,
    pool_model_path,
    thresholds_option,
)
from pool import config
from pool.control import ControlError, ControlTarget, PoolNotRunning, control_request

if TYPE_CHECKING:
    from pool.registry import Registry

versions_app = typer.Typer(help="The version registry (versions.json in the state directory).",
                           no_args_is_help=True)


def registry_command(pool: ControlTarget, cmd: str, as_json: bool,
                     offline: Callable[[Registry], Any] | None, **args: Any) -> dict:
    """Through the running pool if there is one, else (a local pool only) on the registry
    file directly: `offline` is the edit made there (None: only a read, which writes
    nothing, not even the state directory)."""
    try:
        return control_request(pool, cmd, **args)
    except PoolNotRunning:
        pass
    except ControlError as exc:
        fail_control(exc, as_json)
    state_dir = Path(pool.state_dir or DEFAULT_STATE_DIR)
    if offline is None and not state_dir.is_dir():
        # A mistyped --state-dir: saying so beats an empty list (and a directory made for it).
        fail(f"no state directory {state_dir}: no pool has served from it and no version was "
             f"added there (check --state-dir or ${config.STATE_ENV})", as_json, "usage",
             exit_code=2)
    registry = open_registry(state_dir, as_json)
    if offline is not None:
        edit_offline(registry, offline, as_json)
    return {"versions": registry.listing()}


def open_registry(state_dir: Path, as_json: bool) -> Registry:
    from pool.registry import Registry

    try:
        return Registry(state_dir)
    except OSError as exc:  # the state directory is a file, or unreadable
        fail(f"--state-dir {state_dir}: {os_reason(exc)}", as_json, "usage", exit_code=2)
    except ValueError as exc:  # versions.json edited by hand into something not JSON
        fail(f"cannot read the registry in {state_dir}: {exc}", as_json, "bad_registry")


def edit_offline(registry: Registry, edit: Callable[[Registry], Any], as_json: bool) -> None:
    """An edit of the registry file, saved when it succeeds."""
    try:
        edit(registry)
    except (ValueError, KeyError) as exc:
        fail(str(exc), as_json, "bad_request", exit_code=2)
    except (TypeError, AttributeError) as exc:
        # Input of a shape nothing checked (the pool answers the same as a bad request):
        # still the input's fault, never a traceback.
        fail(f"malformed input ({type(exc).__name__}: {exc})", as_json, "bad_request",
             exit_code=2)
    try:
        registry.save()
    except OSError as exc:
        fail(f"cannot write {registry.path}: {os_reason(exc)}", as_json)


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
    for v in reply["versions"]:  # a version whose last rotation did not end done: why
        last = v.get("last_rotation")
        if last and last["outcome"] != "done":
            out.print(f"{escape(v['version'])}: [red]rotation {last['id']} {last['outcome']}[/]"
                      f": {escape(str(last.get('reason') or 'no reason recorded'))}",
                      soft_wrap=True)


@versions_app.command("list")
@operator_command
def versions_list(pool: ControlTarget, as_json: JsonOpt = False) -> None:
    """Registered versions, the active and the previous one."""
    print_versions(registry_command(pool, "versions", as_json, None), as_json)


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
    golden = expect_document(expect, as_json) if expect else None
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
    from pool.registry import check_seed_document

    doc = read_json_file(file, as_json)
    try:
        check_seed_document(doc)  # here: the pool would call it a control error, exit 1
    except ValueError as exc:
        fail(f"{file}: {exc}", as_json, "bad_request", exit_code=2)
    reply = registry_command(pool, "versions_import", as_json, lambda r: r.import_seed(doc),
                             doc=doc)
    print_versions(reply, as_json)


def read_json_file(path: Path, as_json: bool) -> Any:
    try:
        return orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        fail(f"cannot read {path}: {exc}", as_json, "bad_request", exit_code=2)


def expect_document(path: Path, as_json: bool) -> dict:
    """--expect's golden file, checked here: a pool of another release (or the registry file
    offline) would take a document of the wrong shape as its own error, or as a traceback."""
    from pool.health import Expectation

    doc = read_json_file(path, as_json)
    try:
        Expectation.from_dict(doc)
    except ValueError as exc:
        fail(f"--expect {path}: {exc}", as_json, "bad_request", exit_code=2)
    return doc


PROGRESS_MIN_PAIRS = 200  # a set this long shows a progress bar while it is scored


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
    from pool.quality import PairsFileError, load_default_pairs, why_thresholds_cannot_be_fitted
    from tooling.calibrate import calibrate as run_calibration
    from tooling.calibrate import calibration_document

    check_endpoint(endpoint, as_json)  # before the pairs are read and a progress bar drawn
    try:
        labelled = list(read_eval_set(pairs)) if pairs is not None else load_default_pairs()
    except PairsFileError as exc:
        fail(str(exc), as_json, "bad_pairs_file", exit_code=2)
    if save and (why := why_thresholds_cannot_be_fitted(pair.label for pair in labelled)):
        fail(f"--save: {why}", as_json, "unfit_pairs", exit_code=2)
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
