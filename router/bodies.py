"""Request bodies of protocol v1 (similarity and embed), validated where they are served.

Over a limit is `too_large`, naming the item, its size, the limit and the flag that raises
it; nothing is ever cut to fit. Used by workers; the router itself never decodes a body
(except a ping's, and the timeout_ms peek in router.protocol).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from router import protocol

DEFAULT_MAX_PAIRS = 1024  # pairs (or embed texts) in one request; beyond: `too_large`
DEFAULT_MAX_TEXT_CHARS = 10_000  # characters in one text; beyond: `too_large`, never a cut


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of one request (`pool serve --max-pairs`, `--max-text-chars`)."""

    max_pairs: int = DEFAULT_MAX_PAIRS  # pairs per similarity request, texts per embed
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # characters (code points) per text


@dataclass(frozen=True, slots=True)
class Texts:
    """What a valid body asks for."""

    texts: list[str]  # embed: the texts; similarity: a, b, a, b, ...
    size: int  # pairs (similarity) or texts (embed): what counts against a batch
    truncate: bool = True  # false: a text over the model's input limit is too_large
    prompt_name: str | None = None  # one of the model's prompts; None: its default, if any


class BadBody(ValueError):
    """A body refused: the protocol code, the message and, for one item, where it is."""

    def __init__(self, code: str, message: str, at: protocol.JsonPath | None = None) -> None:
        super().__init__(message)
        self.code, self.at = code, at


def item_error(code: str, at: protocol.JsonPath, problem: str) -> BadBody:
    """An item's error, its message led by the item's place ("texts[3] has ...")."""
    return BadBody(code, f"{protocol.path_text(at)} {problem}", at)


def text_place(op: bytes, index: int) -> tuple[str | int, ...]:
    """Where the `index`th of a body's flattened texts (Texts.texts) is in the body."""
    if op == protocol.OP_SIMILARITY:
        return ("pairs", index // 2, index % 2)
    return ("texts", index)


def decode_body(op: bytes, body: bytes, enqueued_ns: int, limits: Limits) -> Texts:
    """Validate a request body; raise BadBody with the protocol code on anything wrong.
    `enqueued_ns` (monotonic) is when the router took the request: the clock of timeout_ms."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(protocol.BAD_REQUEST, f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadBody(protocol.BAD_REQUEST, "body must be a JSON object")
    _check_deadline(doc.get("timeout_ms"), enqueued_ns)
    truncate = doc.get(protocol.TRUNCATE_KEY, True)
    if not isinstance(truncate, bool):
        raise item_error(protocol.BAD_REQUEST, (protocol.TRUNCATE_KEY,),
                         "must be true or false")
    prompt_name = doc.get(protocol.PROMPT_NAME_KEY)
    problem = protocol.prompt_name_problem(prompt_name)
    if problem is not None:
        raise item_error(protocol.BAD_REQUEST, (protocol.PROMPT_NAME_KEY,), problem)
    if op == protocol.OP_SIMILARITY:
        texts, size = _similarity(doc.get("pairs"), limits)
    elif op == protocol.OP_EMBED:
        texts, size = _embed(doc.get("texts"), limits)
    else:
        raise BadBody(protocol.BAD_REQUEST, f"op {op[:32]!r} is not served by workers")
    return Texts(texts, size, truncate, prompt_name)


def _check_deadline(timeout_ms: object, enqueued_ns: int) -> None:
    problem = protocol.timeout_ms_problem(timeout_ms)
    if problem is not None:
        raise BadBody(protocol.BAD_REQUEST, problem)
    if timeout_ms is not None:
        waited_ms = (time.monotonic_ns() - enqueued_ns) / 1e6
        if waited_ms > timeout_ms:  # type: ignore[operator]
            raise BadBody(protocol.TIMEOUT,
                          f"waited {waited_ms:.0f} ms, over timeout_ms={timeout_ms}")


def _similarity(pairs: object, limits: Limits) -> tuple[list[str], int]:
    if not isinstance(pairs, list) or not pairs:
        raise item_error(protocol.BAD_REQUEST, ("pairs",),
                         "must be a non-empty list of [text, text]")
    _check_count(len(pairs), "pairs", limits)
    texts: list[str] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise item_error(protocol.BAD_REQUEST, ("pairs", i), "must be a list of two strings")
        _check_chars(pair[0], ("pairs", i, 0), limits)
        _check_chars(pair[1], ("pairs", i, 1), limits)
        texts += pair
    return texts, len(pairs)


def _embed(texts: object, limits: Limits) -> tuple[list[str], int]:
    if not isinstance(texts, list) or not texts:
        raise item_error(protocol.BAD_REQUEST, ("texts",), "must be a non-empty list of strings")
    _check_count(len(texts), "texts", limits)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise item_error(protocol.BAD_REQUEST, ("texts", i), "must be a string")
        _check_chars(text, ("texts", i), limits)
    return texts, len(texts)


def _check_count(count: int, what: str, limits: Limits) -> None:
    if count > limits.max_pairs:
        raise item_error(protocol.TOO_LARGE, (what,),
                         f"holds {count} items, over the limit of {limits.max_pairs} a request: "
                         "split the request, or raise the limit with `pool serve --max-pairs`")


def _check_chars(text: str, at: protocol.JsonPath, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise item_error(protocol.TOO_LARGE, at,
                         f"has {len(text)} characters, over the limit of "
                         f"{limits.max_text_chars}: shorten it, or raise the limit with "
                         "`pool serve --max-text-chars`")
