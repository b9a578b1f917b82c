"""The producer's commands: `pool serve` starts a pool; similarity, embed and ping ask one."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    ClientKeyOpt,
    EndpointOpt,
    JsonOpt,
    ServerKeyOpt,
    TimeoutOpt,
    VersionOpt,
    call_pool,
    client_keys,
    emit_json,
    fail,
    model_path,
    os_reason,
    out,
)
from pool import config
from router.client import VERDICT_RELATED, VERDICT_UNRELATED, VERDICT_VERY_SIMILAR

VERDICT_STYLE = {VERDICT_VERY_SIMILAR: "green", VERDICT_RELATED: "yellow",
                 VERDICT_UNRELATED: "red"}


def serve(**options: Any) -> None:
    """Start a pool: router + supervisor in this process, N worker processes."""
    from pool.logs import setup_logging
    from pool.server import StartupError, VersionFailed
    from pool.server import serve as run_server
    from pool.settings import resolve_settings

    # --json (--log-json): a pool that cannot start says why as JSON too, as other commands do.
    as_json = bool(options.get("log_json"))
    try:
        settings = resolve_settings(options, model_path=model_path)
    except ValueError as exc:
        fail(str(exc), as_json, "usage", exit_code=2)
    log_file = Path(settings.state_dir) / config.LOG_FILE
    try:
        setup_logging(settings.log_json, log_file)
    except OSError as exc:  # --state-dir names a file, or a place nobody may write
        fail(f"--state-dir {settings.state_dir}: cannot write the pool's log {log_file}: "
             f"{os_reason(exc)}", as_json, "usage", exit_code=2)
    try:
        code = run_server(settings)
    except StartupError as exc:
        fail(str(exc), as_json, exit_code=2)
    except VersionFailed as exc:  # already logged as it happened; said here for scripts
        fail(str(exc), as_json, "version_failed")
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


TruncateOpt = Annotated[bool, typer.Option(
    "--truncate/--no-truncate",
    help="Embed a text over the model's input limit from its first tokens (default), or "
         "refuse the request with too_large (--no-truncate).")]


PromptOpt = Annotated[str | None, typer.Option(
    "--prompt-name",
    help="One of the model's prompts (config_sentence_transformers.json; e5: query, passage) "
         "to put before each text. Default: the model's default prompt, if it has one.")]


def similarity(
    text_a: Annotated[str, typer.Argument(help="First sentence.")],
    text_b: Annotated[str, typer.Argument(help="Second sentence.")],
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    version: VersionOpt = None,
    timeout: TimeoutOpt = 30.0,
    truncate: TruncateOpt = True,
    prompt_name: PromptOpt = None,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score two sentences: cosine of mean-pooled embeddings, with the verdict by the
    answering version's thresholds."""
    result = call_pool(endpoint, timeout, as_json,
                       lambda client: client.similarity([(text_a, text_b)], version=version,
                                                        truncate=truncate,
                                                        prompt_name=prompt_name),
                       client_keys(server_key, client_key, as_json))
    score, said = result.scores[0], result.verdict(0)
    high, low = result.thresholds
    if as_json:
        emit_json({"ok": True, "score": score, "verdict": said, "version": result.version,
                   "thresholds": [high, low]})
        return
    out.print(f"{score:.4f}  [{VERDICT_STYLE[said]}]{said}[/]  (version {result.version}, "
              f"thresholds {high:g} / {low:g})")


def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    endpoint: EndpointOpt = config.DEFAULT_BIND,
    version: VersionOpt = None,
    timeout: TimeoutOpt = 30.0,
    truncate: TruncateOpt = True,
    prompt_name: PromptOpt = None,
    server_key: ServerKeyOpt = None,
    client_key: ClientKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Normalised embeddings of TEXTS, pooled as the serving version's model says."""
    result = call_pool(endpoint, timeout, as_json,
                       lambda client: client.embed(texts, version=version, truncate=truncate,
                                                   prompt_name=prompt_name),
                       client_keys(server_key, client_key, as_json))
    if as_json:
        emit_json({"ok": True, "dim": result.dim, "version": result.version,
                   "embeddings": result.embeddings})
        return
    for text, vector in zip(texts, result.embeddings, strict=True):
        head = ", ".join(f"{x:+.4f}" for x in vector[:6])
        out.print(f"{text!r}: dim {result.dim} [{head}, ...]")
    out.print(f"(version {result.version})")


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
