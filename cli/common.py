"""What the `pool` commands share: the consoles, the option types, and the helpers that
fail a command, reach a pool's frontend, or reach its control socket."""

from __future__ import annotations

import inspect
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
import zmq
from rich.console import Console
from rich.markup import escape

from pool import config
from pool.control import (
    BAD_COMMAND,
    POOL_ENV,
    ControlAuthFailed,
    ControlError,
    ControlTarget,
    PoolNotRunning,
    PoolUnreachable,
    control_request,
)
from router.client import AuthenticationFailed, Client, ZeroPoolError
from router.failover import ENDPOINT_FORMS, endpoint_problem
from router.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV, ClientKeys, KeyFileError
from router.protocol import ENDPOINT_ENV

out = Console()
DEFAULT_STATE_DIR = config.default_state_dir()
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
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.",
                                              min=0.01)]
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


def fail(message: str, as_json: bool, code: str = "error", exit_code: int = 1,
         at: Sequence[str | int] | None = None) -> NoReturn:
    """The command's error and exit; `at` (the item a pool named, protocol v1) into --json."""
    if as_json:
        error: dict[str, Any] = {"code": code, "message": message}
        if at is not None:
            error["at"] = list(at)
        emit_json({"ok": False, "error": error})
    else:
        # Escaped: a message quotes paths and JSON shapes, whose brackets are not markup.
        err.print(f"[bold red]error[/]: {escape(message)}")
    raise typer.Exit(exit_code)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def os_reason(exc: OSError) -> str:
    """Why a path could not be made or written, in words: mkdir on a file says only "File
    exists"."""
    if isinstance(exc, FileExistsError) and exc.filename:
        return f"{exc.filename} exists and is not a directory"
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


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


def check_endpoint(endpoint: str, as_json: bool, option: str = "--endpoint") -> str:
    """A pool's frontend as given (one endpoint, or several comma-separated), after checking
    each is one the client can connect to: a usage error naming what is wrong, never
    libzmq's traceback at connect."""
    targets = [part.strip() for part in endpoint.split(",") if part.strip()]
    if not targets:
        fail(f"{option} is empty: give the pool's frontend ({ENDPOINT_FORMS})", as_json,
             "usage", exit_code=2)
    for target in targets:
        problem = endpoint_problem(target)
        if problem is not None:
            fail(f"{option} {target}: {problem}", as_json, "usage", exit_code=2)
    return endpoint


def call_pool(endpoint: str, timeout: float, as_json: bool, call: Any,
              keys: ClientKeys | None = None) -> Any:
    """One request through the Python client; a protocol error ends the command cleanly."""
    check_endpoint(endpoint, as_json)
    nobody = nobody_listens(endpoint)
    if nobody:
        fail(f"no pool listens at {endpoint} ({nobody}): is `pool serve` running with that "
             "--bind?", as_json, "not_running")
    try:
        client = Client(endpoint, timeout=timeout, curve=keys)
    except zmq.ZMQError as exc:  # what the check cannot know ahead, said as the same error
        fail(f"--endpoint {endpoint}: {exc}", as_json, "usage", exit_code=2)
    with client:
        try:
            return call(client)
        except ZeroPoolError as exc:
            fail_with(exc, as_json)


LISTEN_PROBE_S = 1.0  # a TCP connect that neither succeeds nor is refused by then: unknown


def nobody_listens(endpoint: str) -> str:
    """Why nothing can answer at one tcp:// or ipc:// endpoint, where that is known at once
    (no socket file; the connection refused); "" otherwise: a pool, or a doubt (a firewall
    that drops, a pool still starting), which the request's own timeout settles. ZeroMQ
    itself would wait that timeout out in silence. A list of endpoints is the failover
    client's to try: never judged here."""
    if "," in endpoint or ";" in endpoint:
        return ""
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")  # "@": Linux's abstract names have no file
        return "" if path.startswith("@") or Path(path).exists() else "no socket file there"
    if not endpoint.startswith("tcp://"):
        return ""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=LISTEN_PROBE_S).close()
    except ConnectionRefusedError:
        return "connection refused"
    except (OSError, ValueError):
        pass
    return ""


AUTH_EXIT_CODE = 3  # the pool refused this client's Curve handshake: a script can tell


def fail_with(exc: ZeroPoolError, as_json: bool) -> NoReturn:
    """A protocol error or a refused handshake, as the command's error and exit code."""
    auth = isinstance(exc, AuthenticationFailed)
    fail(exc.message, as_json, exc.code, exit_code=AUTH_EXIT_CODE if auth else 1, at=exc.at)


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
        fail(f"--pool {exc}", as_json, "usage", exit_code=2)


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
    if isinstance(exc, PoolNotRunning | PoolUnreachable):
        code = "not_running" if isinstance(exc, PoolNotRunning) else "unreachable"
        fail(str(exc), as_json, code, exit_code=exit_code)
    # The pool's refusal says how (pool.control); one of the command's arguments: a usage error.
    fail(str(exc), as_json, exc.code, exit_code=2 if exc.code == BAD_COMMAND else exit_code)


def local_model_path(spec: str, as_json: bool = False) -> str:
    """--path for a pool on this machine: a built-in model's directory, or the path made
    absolute. The pool runs in a working directory of its own, where a relative path would
    name another directory (or another model)."""
    from pool.builtin import BUILTIN_PREFIX

    if spec.startswith(BUILTIN_PREFIX):
        return model_path(spec, as_json)
    return str(Path(spec).expanduser().resolve())


def optional_local_model_path(spec: str | None, as_json: bool = False) -> str | None:
    return None if spec is None else local_model_path(spec, as_json)


def pool_model_path(pool: ControlTarget, spec: str | None, as_json: bool) -> str | None:
    """--path as the pool reads it: absolute for a local pool (local_model_path), as eval_option
    does for --eval. A remote pool reads its own filesystem: the path goes as given, and a
    built-in model is prepared on that machine, not on the operator's."""
    if spec is None:
        return None
    if not pool.is_remote:
        return local_model_path(spec, as_json)
    from pool.builtin import BUILTIN_PREFIX

    if spec.startswith(BUILTIN_PREFIX):
        fail(f"--path {spec} with --pool: a built-in model is converted where the pool runs; "
             "give its model directory on the pool's machine (there, `pool versions add "
             "NAME --path builtin:...` prepares it)", as_json, "usage", exit_code=2)
    return spec


def eval_option(spec: str | None, pool: ControlTarget) -> str | None:
    """--eval as the pool reads it: a packaged set's name, or a file's absolute path (the
    pool runs elsewhere in the filesystem; a remote pool on its own machine, so there the
    path goes as given); the pool checks that it parses."""
    from pool.builtin import BUILTIN_PREFIX

    if spec is None or spec.startswith(BUILTIN_PREFIX) or pool.is_remote:
        return spec  # a packaged set's name (the pool says if it knows none of that name)
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
