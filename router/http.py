"""The HTTP door: OpenAI's and text-embeddings-inference's HTTP shapes in front of a pool.

A separate process (`pool http`), so that HTTP parsing never slows the router's loop: it speaks
protocol v1 to the pool through one shared `AsyncClient` (many requests in flight on one DEALER
socket). Starlette on uvicorn. Every failure answers in OpenAI's error shape
`{"error": {"message", "type", "code"}}`; never a traceback. Usage: docs/http.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from router import protocol
from router.client import AsyncClient, Embeddings, ZeroPoolError
from router.keys import ClientKeys

log = logging.getLogger("zeropool.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # well above max-pairs x typical texts, far below RAM
DEFAULT_TIMEOUT_S = 30.0  # per request to the pool; past it: 503 no_reply
HEALTH_TIMEOUT_S = 2.0  # a probe must answer fast, whatever the pool does
# A body whose next bytes do not come within this is given up (408): a caller that stops
# sending (or sends a byte a minute) must not hold a connection and its buffer for ever.
BODY_TIMEOUT_S = 30.0
# The request line and headers together (router.httphead); nginx allows 32 KiB by default.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# `model` values that mean "whatever the pool serves now" without asking the pool.
DEFAULT_MODEL_NAMES = frozenset({"", "default"})
# A `model` the pool said is not a version is remembered this long, so that a tool with a
# hard-coded name ("text-embedding-3-small") costs one round trip, not two, per request.
NOT_A_VERSION_TTL_S = 5.0
# At most this many such names: a caller sending a new name each time must not grow the door.
NOT_A_VERSION_MAX = 1024
# Strict pinning: a request with this header is served by that version or gets 404.
VERSION_HEADER = "x-zeropool-version"
RETRY_AFTER_S = "1"
# On SIGTERM, requests in progress get this long; idle keep-alive connections do not hold
# the stop (uvicorn would otherwise wait on a client that never closes).
SHUTDOWN_GRACE_S = 10
NO_REPLY = "no_reply"
CLIENT_CLOSED = 499  # nginx's status for a caller that hung up first: in the metrics only
UNROUTED = "unrouted"  # the metrics' route label of requests no route took
AUTH_FAILED = "auth_failed"
JSON = "application/json"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Protocol error code (and the client's own) -> HTTP status.
STATUS_BY_CODE: dict[str, int] = {
    protocol.BAD_REQUEST: 400,
    protocol.TOO_LARGE: 413,
    protocol.UNKNOWN_VERSION: 404,
    protocol.OVERLOADED: 429,
    protocol.TIMEOUT: 504,
    protocol.SHUTTING_DOWN: 503,
    protocol.WORKER_FAILED: 503,
    NO_REPLY: 503,
    AUTH_FAILED: 503,  # the pool refused this door's Curve key: the door is misconfigured
    protocol.INTERNAL: 500,
}
# HTTP status -> OpenAI's error "type".
TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error",
}


class HttpError(Exception):
    """A request refused before or after the pool: answered as OpenAI's error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def status_for(code: str) -> int:
    """The HTTP status of a protocol error code; 500 for a code this door does not know."""
    return STATUS_BY_CODE.get(code, 500)


def error_json(status: int, code: str, message: str) -> bytes:
    """OpenAI's error shape, the body of every failure the door answers (router.httphead's
    431 too)."""
    return orjson.dumps({"error": {"message": message,
                                   "type": TYPE_BY_STATUS.get(status, "server_error"),
                                   "code": code}})


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if status in (429, 503):  # overloaded, or the pool down or stopping: worth a retry soon
        headers["retry-after"] = RETRY_AFTER_S
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return Response(error_json(status, code, message), status, headers, media_type=JSON)


def pool_error(exc: ZeroPoolError) -> HttpError:
    return HttpError(status_for(exc.code), exc.code, exc.message)


# A route's names for the places of protocol v1's body (("texts", 3)): its caller's own, so
# that an error about texts[3] says input[3]. None: the pool's name stays.
Names = Callable[[tuple[str | int, ...]], str | None]


@contextlib.contextmanager
def named_as(names: Names) -> Iterator[None]:
    """The pool's errors raised inside, as HttpErrors whose message names the item at fault
    the caller's way (the pool's message begins with its own name of it)."""
    try:
        yield
    except ZeroPoolError as exc:
        err = pool_error(exc)
        if exc.at is not None:
            own, name = protocol.path_text(exc.at), names(exc.at)
            if name is not None and err.message.startswith(own):
                err.message = name + err.message[len(own):]
        raise err from None


def list_names(field: str, one_string: bool) -> Names:
    """Embed texts sent as `field`: a string (one text) or a list of them."""
    def name(at: tuple[str | int, ...]) -> str | None:
        if at == ("texts",) or (one_string and at == ("texts", 0)):
            return field
        return f"{field}[{at[1]}]" if len(at) == 2 and at[0] == "texts" else None
    return name


def sentence_names(one_string: bool) -> Names:
    """TEI's similarity: pair i is (source_sentence, sentences[i]); `sentences` a string (one
    sentence) or a list of them."""
    def name(at: tuple[str | int, ...]) -> str | None:
        if at == ("pairs",):
            return "inputs.sentences"
        if len(at) != 3 or at[0] != "pairs":
            return None
        if at[2] == 0:
            return "inputs.source_sentence"
        return "inputs.sentences" if one_string else f"inputs.sentences[{at[1]}]"
    return name


def json_response(data: Any, version: str | None = None) -> Response:
    headers = {VERSION_HEADER: header_value(version)} if version else None
    return Response(orjson.dumps(data), 200, headers, media_type=JSON)


def header_value(version: str) -> str:
    """A version name as a header value: percent-encoded UTF-8 (RFC 3986) beyond ASCII
    letters, digits and "._-" (what names are made of), which stay as they are. Header
    values are Latin-1 on the wire (Starlette refuses anything else: a 500 for a name such
    as "模型v2"), and clients decode non-ASCII ones each their own way."""
    return quote(version, safe="")


def header_version(request: Request) -> str | None:
    """The version a request pins in its header: percent-decoded as `header_value` encodes
    (names hold no "%"), else raw UTF-8 (as curl sends it; Starlette decodes it as Latin-1)."""
    raw = request.headers.get(VERSION_HEADER)
    if raw is None:
        return None
    if raw.isascii():
        return unquote(raw)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def load_tokens(path: Path) -> frozenset[str]:
    """Bearer tokens, one per line; blank lines and `#` comments skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tokens = frozenset(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise ValueError(f"{path} holds no token (one per line)")
    return tokens


@dataclass
class HttpSettings:
    endpoint: str
    tokens: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    curve: ClientKeys | None = None
    body_timeout_s: float = BODY_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


class DoorMetrics:
    """The door's own Prometheus families, at GET /metrics (the pool's are on its metrics
    port): answers by route and status, and how long they took."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("zeropool_http_requests", "HTTP answers by route and status.",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("zeropool_http_request_seconds",
                                 "Time from an HTTP request to its answer.", ["route"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    async def endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass
class Door:
    """What the handlers share: the settings, the one client, names known not to be versions."""

    settings: HttpSettings
    client: AsyncClient | None = None
    # name -> forget after; in insertion order, which is expiry order (one TTL for all)
    not_versions: OrderedDict[str, float] = field(default_factory=OrderedDict)
    metrics: DoorMetrics = field(default_factory=DoorMetrics)

    @property
    def pool(self) -> AsyncClient:
        assert self.client is not None, "used outside the app's lifespan"
        return self.client

    def check_auth(self, request: Request) -> None:
        tokens = self.settings.tokens
        if not tokens:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest against each: a wrong token's timing tells nothing of the right one.
        ok = scheme.lower() == "bearer" and any(
            hmac.compare_digest(given.strip().encode(), t.encode()) for t in tokens)
        if not ok:
            raise HttpError(401, "invalid_api_key", "missing or wrong bearer token "
                            "(Authorization: Bearer TOKEN)")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refused with 413 past --max-body-bytes before it is all read."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big(int(declared), limit)
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), self.settings.body_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise HttpError(408, "body_timeout", f"the body stopped arriving: nothing for "
                                f"{self.settings.body_timeout_s:g}s after {size} bytes"
                                ) from None
            size += len(chunk)
            if size > limit:
                raise too_big(size, limit)
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, protocol.BAD_REQUEST, f"the body is not valid JSON: {exc}"
                            ) from None

    async def embed(self, texts: list[str], model: str | None, strict: str | None,
                    truncate: bool = True, prompt_name: str | None = None) -> Embeddings:
        """Pinned to `strict` (header), else to `model` when it names a version, else whatever
        serves now."""
        embed = functools.partial(self.pool.embed, texts, timeout_ms=self.deadline_ms,
                                  truncate=truncate, prompt_name=prompt_name)
        if strict:
            return await embed(version=strict)
        name = model or ""
        if name in DEFAULT_MODEL_NAMES or self._known_not_version(name):
            return await embed()
        try:
            return await embed(version=name)
        except ZeroPoolError as exc:
            if exc.code != protocol.UNKNOWN_VERSION:
                raise
        self.remember_not_version(name)
        return await embed()

    @property
    def deadline_ms(self) -> int:
        """The request's deadline as the pool reads it (protocol v1's timeout_ms): past the
        door's --timeout the caller has its 503, and the pool drops the work, not computes it
        for nobody."""
        return max(1, int(self.settings.timeout_s * 1000))

    def remember_not_version(self, name: str) -> None:
        """`name` is not a version, for NOT_A_VERSION_TTL_S. Expired names are dropped here,
        and the oldest past NOT_A_VERSION_MAX: a tool's few names stay, floods do not."""
        now, names = time.monotonic(), self.not_versions
        names.pop(name, None)  # re-inserted last: insertion order stays expiry order
        while names and (len(names) >= NOT_A_VERSION_MAX or next(iter(names.values())) < now):
            names.popitem(last=False)
        names[name] = now + NOT_A_VERSION_TTL_S

    def _known_not_version(self, name: str) -> bool:
        until = self.not_versions.get(name)
        if until is None:
            return False
        if until < time.monotonic():
            del self.not_versions[name]
            return False
        return True


def too_big(size: int, limit: int) -> HttpError:
    return HttpError(413, protocol.TOO_LARGE, f"the body has {size} bytes or more, over the "
                     f"limit of {limit}: split it, or raise pool http --max-body-bytes")


# -- request parsing ----------------------------------------------------------------------


def need_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HttpError(400, protocol.BAD_REQUEST, "the body must be a JSON object")
    return body


def text_list(value: Any, name: str) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:  # as OpenAI's API: an empty string has nothing to embed
            where = name if isinstance(value, str) else f"{name}[{empty}]"
            raise HttpError(400, protocol.BAD_REQUEST, f"{where} is an empty string")
        return texts
    if isinstance(value, list) and value and all(isinstance(t, int | list) for t in value):
        raise HttpError(400, protocol.BAD_REQUEST, f"{name}: token-id arrays are not "
                        "supported, send text (a string or a list of strings)")
    if isinstance(value, list) and value:
        wrong = next(i for i, t in enumerate(value) if not isinstance(t, str))
        raise HttpError(400, protocol.BAD_REQUEST, f"{name}[{wrong}] must be a string")
    raise HttpError(400, protocol.BAD_REQUEST,
                    f"{name} must be a string or a non-empty list of strings")


def float32_base64(vector: list[float]) -> str:
    """As OpenAI's encoding_format "base64": little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def openai_embedding_reply(result: Embeddings, encoding: str) -> dict[str, Any]:
    encode = float32_base64 if encoding == "base64" else list
    data = [{"object": "embedding", "embedding": encode(vector), "index": i}
            for i, vector in enumerate(result.embeddings)]
    used = sum(result.tokens) if result.tokens is not None else 0
    return {"object": "list", "data": data, "model": result.version,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


# -- handlers -----------------------------------------------------------------------------

Handler = Callable[[Door, Request], Awaitable[Response]]


async def openai_embeddings(door: Door, request: Request) -> Response:
    body = need_object(await door.read_json(request))
    texts = text_list(body.get("input"), "input")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise HttpError(400, protocol.BAD_REQUEST,
                        'encoding_format must be "float" or "base64"')
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise HttpError(400, protocol.BAD_REQUEST, "model must be a string")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                   or dimensions < 1):
        raise HttpError(400, protocol.BAD_REQUEST, "dimensions must be a positive integer")
    prompt_name = prompt_name_of(body, "")  # not OpenAI's: the SDKs' extra_body sends it
    with named_as(list_names("input", isinstance(body.get("input"), str))):
        result = await door.embed(texts, model, header_version(request),
                                  prompt_name=prompt_name)
    # Checked after the pool answered: only then is the answering version's size known.
    if dimensions is not None and dimensions != result.dim:
        raise HttpError(400, protocol.BAD_REQUEST, f"dimensions {dimensions} is not supported: "
                        f"version {result.version} has {result.dim} and cannot shorten them")
    return json_response(openai_embedding_reply(result, encoding), result.version)


def tei_options(options: dict[str, Any], where: str) -> tuple[bool, str | None]:
    """TEI's `truncate`, `truncation_direction` and `prompt_name` (in `where` of the body):
    whether to cut a text over the model's input limit (absent: yes, as TEI's
    --auto-truncate; false: 413 for such a text, as TEI without it), and the model's prompt
    to put before each text (the pool checks the name). This pool cuts on the right: asking
    otherwise is refused, not ignored."""
    truncate = options.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise HttpError(400, protocol.BAD_REQUEST, f"{where}truncate must be true or false")
    direction = options.get("truncation_direction")
    if direction is not None and (not isinstance(direction, str) or direction.lower() != "right"):
        raise HttpError(400, protocol.BAD_REQUEST, f'{where}truncation_direction must be '
                        '"Right": this pool keeps the start of a text it cuts')
    return truncate is not False, prompt_name_of(options, where)


def prompt_name_of(options: dict[str, Any], where: str) -> str | None:
    """The model's prompt a request names (the pool checks that the model has it)."""
    prompt_name = options.get(protocol.PROMPT_NAME_KEY)
    problem = protocol.prompt_name_problem(prompt_name)
    if problem is not None:
        raise HttpError(400, protocol.BAD_REQUEST, f"{where}prompt_name {problem}")
    return prompt_name


async def tei_embed(door: Door, request: Request) -> Response:
    body = need_object(await door.read_json(request))
    texts = text_list(body.get("inputs"), "inputs")
    if body.get("normalize", True) is not True:
        raise HttpError(400, protocol.BAD_REQUEST,
                        "normalize must be true: this pool returns L2-normalised embeddings")
    truncate, prompt_name = tei_options(body, "")
    with named_as(list_names("inputs", isinstance(body.get("inputs"), str))):
        result = await door.embed(texts, None, header_version(request), truncate, prompt_name)
    return json_response(result.embeddings, result.version)


async def tei_similarity(door: Door, request: Request) -> Response:
    body = need_object(await door.read_json(request))
    inputs = body.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("source_sentence"), str):
        raise HttpError(400, protocol.BAD_REQUEST, 'inputs must be {"source_sentence": "...", '
                        '"sentences": ["...", ...]}')
    source = inputs["source_sentence"]
    if not source:
        raise HttpError(400, protocol.BAD_REQUEST, "inputs.source_sentence is an empty string")
    sentences = text_list(inputs.get("sentences"), "inputs.sentences")
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise HttpError(400, protocol.BAD_REQUEST, "parameters must be an object")
    truncate, prompt_name = tei_options(parameters or {}, "parameters.")
    with named_as(sentence_names(isinstance(inputs.get("sentences"), str))):
        result = await door.pool.similarity([(source, s) for s in sentences],
                                            version=header_version(request),
                                            timeout_ms=door.deadline_ms, truncate=truncate,
                                            prompt_name=prompt_name)
    return json_response(result.scores, result.version)


def model_entry(version: str) -> dict[str, Any]:
    return {"id": version, "object": "model", "created": 0, "owned_by": "zeropool"}


async def list_models(door: Door, request: Request) -> Response:
    """The version serving now first, then every other version taking pinned requests (a
    ping names them; an older pool names only the first)."""
    ping = await door.pool.ping(timeout=HEALTH_TIMEOUT_S)
    names = [ping.version, *sorted(set(ping.versions) - {ping.version})]
    return json_response({"object": "list", "data": [model_entry(name) for name in names]},
                         ping.version)


async def one_model(door: Door, request: Request) -> Response:
    """OpenAI's models.retrieve: a version taking requests now, else 404."""
    name = request.path_params["model"]
    ping = await door.pool.ping(timeout=HEALTH_TIMEOUT_S)
    if name != ping.version and name not in ping.versions:
        raise HttpError(404, protocol.UNKNOWN_VERSION, f"no version {name!r} is serving; "
                        "GET /v1/models lists those that are")
    return json_response(model_entry(name), ping.version)


async def health(door: Door, request: Request) -> Response:
    """200 while the pool answers a ping with ready workers; 503 with the reason else."""
    try:
        ping = await door.pool.ping(timeout=HEALTH_TIMEOUT_S)
    except ZeroPoolError as exc:
        return error_response(503, exc.code, f"the pool does not answer: {exc.message}")
    if ping.workers < 1:
        return error_response(503, "no_workers", f"version {ping.version} has no ready worker")
    return json_response({"status": "ok", "version": ping.version, "workers": ping.workers},
                         ping.version)


def guarded(door: Door, handler: Handler, auth: bool = True
            ) -> Callable[[Request], Awaitable[Response]]:
    """`handler` behind the token check, every failure answered in OpenAI's error shape,
    every answer counted in the door's metrics."""

    async def endpoint(request: Request) -> Response:
        started = time.monotonic()
        response = await answer(request)
        # The route's template ("/v1/models/{model}"), not the path: a label per caller's
        # name would grow the metrics without bound.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        door.metrics.observe(route, response.status_code, time.monotonic() - started)
        return response

    async def answer(request: Request) -> Response:
        try:
            if auth:
                door.check_auth(request)
            return await handler(door, request)
        except HttpError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except ClientDisconnect:  # the caller hung up mid-body: nobody to answer, no fault
            return Response(status_code=CLIENT_CLOSED)
        except ZeroPoolError as exc:
            err = pool_error(exc)
            return error_response(err.status, err.code, err.message)
        except Exception:  # a bug here must not show a traceback to the caller
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, protocol.INTERNAL, "internal error in the HTTP door")

    return endpoint



def build_app(settings: HttpSettings) -> Starlette:
    door = Door(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Created inside the server's loop: the client's reader task belongs to it.
        door.client = AsyncClient(settings.endpoint, timeout=settings.timeout_s,
                                  curve=settings.curve)
        try:
            yield
        finally:
            await door.client.close()

    routes = [
        Route("/v1/embeddings", guarded(door, openai_embeddings), methods=["POST"]),
        Route("/embeddings", guarded(door, openai_embeddings), methods=["POST"]),
        Route("/embed", guarded(door, tei_embed), methods=["POST"]),
        Route("/similarity", guarded(door, tei_similarity), methods=["POST"]),
        Route("/v1/models", guarded(door, list_models), methods=["GET"]),
        Route("/v1/models/{model}", guarded(door, one_model), methods=["GET"]),
        # Open: load balancers and orchestrators probe without a token, and so do scrapers.
        Route("/health", guarded(door, health, auth=False), methods=["GET"]),
        Route("/metrics", door.metrics.endpoint, methods=["GET"]),
    ]
    async def not_routed(_request: Request, exc: Exception) -> Response:
        # 404 / 405 from the router: the same error shape as everything else (405 with the
        # Allow header HTTP asks for), counted under one route label: paths are the caller's.
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
        door.metrics.observe(UNROUTED, status, 0.0)
        return error_response(status, code, str(getattr(exc, "detail", "")) or "not found",
                              getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_routed})
    app.state.door = door
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Tls:
    """HTTPS: a PEM certificate (chain) and its private key."""

    cert: Path
    key: Path

    def check(self) -> None:
        """ValueError unless both files load as a certificate and its key."""
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert,
                                                                                self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{self.cert} / {self.key}: {exc}") from None


def run(settings: HttpSettings, host: str, port: int, tls: Tls | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both)."""
    import uvicorn

    from router.httphead import bounded_head_protocol

    config = uvicorn.Config(build_app(settings), host=host, port=port, access_log=False,
                            http=bounded_head_protocol(settings.max_header_bytes),
                            log_level="warning", lifespan="on", timeout_keep_alive=30,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            ssl_certfile=None if tls is None else str(tls.cert),
                            ssl_keyfile=None if tls is None else str(tls.key))
    uvicorn.Server(config).run()
