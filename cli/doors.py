"""`pool http` and `pool ui`: the HTTP API and the web console, servers in front of the pool
that run until stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    DEFAULT_STATE_DIR,
    ClientKeyOpt,
    EndpointOpt,
    JsonOpt,
    ServerKeyOpt,
    StateDirOpt,
    check_endpoint,
    client_keys,
    emit_json,
    err,
    fail,
    operator_command,
    out,
)
from pool import config
from pool.control import POOL_ENV, ControlTarget
from router.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV
from router.protocol import ENDPOINT_ENV

# router.http's defaults, restated: importing it here would load Starlette for every command.
HTTP_MAX_BODY_BYTES = 4 * 1024 * 1024
HTTP_POOL_TIMEOUT_S = 30.0
HTTP_BODY_TIMEOUT_S = 30.0
HTTP_MAX_HEADER_BYTES = 64 * 1024
INSECURE_WARNING = ("WARNING: pool http listens on {host} WITHOUT AUTHENTICATION (--insecure): "
                    "anyone who reaches {url} can use the pool. Give --token-file.")


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
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", min=0.1,
        help="Seconds a request body may stop arriving; beyond: 408.")] = HTTP_BODY_TIMEOUT_S,
    max_header_bytes: Annotated[int, typer.Option(
        "--max-header-bytes", min=1024,
        help="Largest request line and headers; beyond: 431.")] = HTTP_MAX_HEADER_BYTES,
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

    check_endpoint(endpoint, as_json)  # before "listening": uvicorn would fail after it
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
                            client_keys(server_key, client_key, as_json), body_timeout,
                            max_header_bytes)
    if as_json:
        emit_json({"url": url, "endpoint": endpoint, "auth": bool(tokens)})
    else:
        out.print(f"zeropool HTTP on {url} (pool {endpoint}, "
                  f"{'bearer tokens' if tokens else 'no authentication'}); Ctrl-C stops it")
    sys.stdout.flush()
    run(settings, host, port, tls)


UI_SCRIPT = Path(__file__).with_name("web.py")
UI_EXTRA_MISSING = "pool ui needs the ui extra: pip install 'zeropool[ui]'"
UI_STOP_GRACE_S = 10.0  # after SIGINT/SIGTERM, how long Streamlit may take before SIGKILL


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
    check_endpoint(endpoint, as_json)  # the page would only show libzmq's error
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
