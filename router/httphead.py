"""A bound on the head of an HTTP request (request line and headers) at the HTTP door.

uvicorn's httptools protocol bounds neither: llhttp keeps a header value that never ends in
memory, so one caller sending a header without a line break grows the door until it dies.
This subclass refuses a request whose head passes the bound with 431, in the door's error
shape, and closes the connection, as nginx's large_client_header_buffers and Node's
--max-http-header-size do. Two checks: the parsed request line and headers when they are
complete (exact), and the bytes read while a head is still incomplete (what llhttp holds).
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.http import JSON, error_json

HEADERS_TOO_LARGE = 431
# After a 431 the connection reads and drops what the caller still sends this long, so that
# closing with its bytes unread does not reset the connection and lose the answer on its way
# (a "lingering close", as nginx's).
LINGER_S = 1.0


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops and uvicorn answers (send_400_response,
    which answers 431 here instead)."""


class RefusalNotMalformed(logging.Filter):
    """uvicorn warns "Invalid HTTP request received." whenever the parser stops, and the
    parser stops for a 431 too: this drops that warning while a 431 is being answered (the
    raise, uvicorn's warning and its send_400_response follow each other synchronously on the
    loop's thread), and only then: a caller's garbage is still warned about."""

    answering_431 = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not RefusalNotMalformed.answering_431


REFUSAL_FILTER = RefusalNotMalformed()


class BoundedHeadProtocol(HttpToolsProtocol):
    """HttpToolsProtocol refusing a request whose head passes `max_head_bytes` (set by
    `bounded_head_protocol`)."""

    max_head_bytes: int

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._in_head = True  # reading a request line or headers
        self._head_bytes = 0  # bytes read while in it
        self._too_large = False  # the parser stopped for it: the 400 uvicorn sends is a 431
        self._refused = False  # answered 431: what still comes is dropped until the close

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete past the bound: everything read so far is head.
        if self._in_head and not self._refused and self._head_bytes > self.max_head_bytes:
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        # What uvicorn kept of the head (on_url, on_header): summed once a request.
        parsed = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        if parsed > self.max_head_bytes:
            self._too_large = RefusalNotMalformed.answering_431 = True
            raise HeadTooLarge
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # keep-alive: the next request's head

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            RefusalNotMalformed.answering_431 = False
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._in_head, self._refused = False, True  # one answer, then the close
        body = error_json(HEADERS_TOO_LARGE, "headers_too_large",
                          f"the request line and headers passed {self.max_head_bytes} bytes: "
                          "send less, or raise pool http --max-header-bytes")
        head = (f"HTTP/1.1 {HEADERS_TOO_LARGE} Request Header Fields Too Large\r\n"
                f"content-type: {JSON}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        if self.transport.can_write_eof():  # TLS cannot half-close: it just closes later
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_head_protocol(max_head_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class uvicorn instantiates per connection, with this bound."""
    logging.getLogger("uvicorn.error").addFilter(REFUSAL_FILTER)  # once: filters are a set
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"max_head_bytes": max_head_bytes})
