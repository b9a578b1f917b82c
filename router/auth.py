"""CurveZMQ on the frontend, the server's side: who may send requests, and encryption on the
wire.

The pool loads its secret certificate and a directory of allowed client public keys; pyzmq's
ZAP `Authenticator` judges each handshake, driven by the serve loop's poller (no authenticator
thread). The client's side (key files, `ClientKeys`) is router.keys; its names are re-exported
here for the server and for older imports.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.base import Authenticator

# Re-exported: pool.server imports KeyFileError from here, and the key files are shared.
from router.keys import (
    CLIENT_KEY_ENV,
    SERVER_KEY_ENV,
    ClientKeys,
    KeyFileError,
    create_keys,
    load_key_pair,
    load_public_key,
)

log = logging.getLogger("zeropool.auth")
__all__ = [
    "CLIENT_KEY_ENV", "SERVER_KEY_ENV", "ClientKeys", "CurveServer", "KeyFileError",
    "create_keys", "is_loopback", "load_key_pair", "load_public_key",
]

_LOOPBACK = re.compile(r"^(ipc|inproc)://|^tcp://(127\.[0-9.]+|localhost|\[::1\]|::1):")


def is_loopback(endpoint: str) -> bool:
    """Reachable only from this machine (ipc, inproc, tcp on a loopback address)."""
    return bool(_LOOPBACK.match(endpoint))


REFUSAL_LOG_EVERY_S = 60.0  # a producer retrying with a bad key is logged once a minute
REFUSAL_LOG_ADDRESSES = 1024  # addresses remembered before the stale ones are dropped


@dataclass(slots=True)
class Refusals:
    """The handshakes ZAP refused: how many, and the latest (a client key not allowed)."""

    count: int = 0
    last_address: str | None = None
    last_reason: str | None = None
    last_at: float | None = None  # wall clock

    def as_dict(self) -> dict[str, Any]:
        return {"refused_handshakes": self.count, "last_refused_from": self.last_address,
                "last_refused_reason": self.last_reason, "last_refused_at": self.last_at}


class CountingAuthenticator(Authenticator):
    """pyzmq's ZAP handler, counting and logging (with the peer's address) what it refuses."""

    def __init__(self, ctx: zmq.Context, log: logging.Logger, socket_name: str = "frontend"
                 ) -> None:
        super().__init__(ctx, log=log)
        self.socket_name = socket_name  # which socket's handshakes, in the log line
        self.refusals = Refusals()
        self._address = ""
        self._logged: dict[str, float] = {}  # address -> when its refusal was last logged

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The ZAP request's fourth frame is the peer's address (ZMQ RFC 27).
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "unknown"
        step = super().handle_zap_message(msg)
        if inspect.iscoroutine(step):
            await step

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self._count_refusal(status_text.decode(errors="replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def _count_refusal(self, reason: str) -> None:
        refusals, address, now = self.refusals, self._address, time.time()
        refusals.count += 1
        refusals.last_address, refusals.last_reason, refusals.last_at = address, reason, now
        if now - self._logged.get(address, 0.0) >= REFUSAL_LOG_EVERY_S:
            if len(self._logged) >= REFUSAL_LOG_ADDRESSES:
                # A scan from many addresses must not grow this for ever: the entries past
                # their quiet time say nothing any more.
                self._logged = {a: t for a, t in self._logged.items()
                                if now - t < REFUSAL_LOG_EVERY_S}
            self._logged[address] = now
            log.warning("refused a CurveZMQ handshake from %s on the %s: %s (%d refused so "
                        "far)", address, self.socket_name, reason, refusals.count)


class CurveServer:
    """A socket's Curve keys and the ZAP handler deciding which clients get in: the
    frontend's (producers, --curve-allow) or the remote control socket's (operators,
    --operator-keys).

    ZAP is one handler per zmq.Context, and pyzmq's "allow any key" is not per domain: two
    allow-lists need two contexts, one CurveServer each."""

    def __init__(self, ctx: zmq.Context, secret_key_file: Path, allow_dir: Path | None,
                 allow_option: str = "--curve-allow", socket_name: str = "frontend") -> None:
        self.public, self._secret = load_key_pair(secret_key_file)
        self.allow_dir = allow_dir
        self.allow_option = allow_option  # what the messages call the allow-list
        if allow_dir is not None and not allow_dir.is_dir():
            raise KeyFileError(f"{allow_option} {allow_dir} is not a directory of client keys")
        self.authenticator = CountingAuthenticator(
            ctx, log=logging.getLogger("zeropool.auth.zap"), socket_name=socket_name)
        self.authenticator.start()
        self._allow_stamp: object = None
        self.reload_if_changed()
        if self._allow_stamp is None:
            raise KeyFileError(f"cannot load the client keys in {allow_option} {allow_dir}")

    @property
    def refusals(self) -> Refusals:
        return self.authenticator.refusals

    @property
    def zap_socket(self) -> zmq.Socket:
        return self.authenticator.zap_socket

    def apply(self, sock: zmq.Socket) -> None:
        """Before bind()."""
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public

    def handle_zap(self) -> None:
        """Answer the handshakes waiting on the ZAP socket (the serve loop polls it)."""
        while True:
            try:
                request = self.zap_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            _run_to_completion(self.authenticator.handle_zap_message(request))

    def reload_if_changed(self) -> None:
        """Re-read the allowed keys when the directory changed: add a producer, no restart."""
        if self.allow_dir is None:
            if self._allow_stamp is None:
                log.warning("Curve without %s: traffic is encrypted, but any client key is "
                            "let in", self.allow_option)
                self.authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
                self._allow_stamp = "any"
            return
        try:
            if not self.allow_dir.is_dir():
                raise FileNotFoundError("not a directory")
            # Names and mtimes of the key files: a key added, removed or replaced in place.
            stamp = sorted((p.name, p.stat().st_mtime_ns) for p in self.allow_dir.glob("*.key"))
            if stamp == self._allow_stamp:
                return
            self.authenticator.configure_curve(domain="*", location=str(self.allow_dir))
        except (OSError, ValueError) as exc:
            # Gone, unreadable or a malformed key: the pool keeps serving with the keys it had.
            log.error("cannot read %s %s (%s); keeping the keys loaded before",
                      self.allow_option, self.allow_dir, exc)
            return
        self._allow_stamp = stamp
        log.info("Curve: %d client key(s) allowed from %s %s", len(stamp), self.allow_option,
                 self.allow_dir)

    def close(self) -> None:
        self.authenticator.stop()


def _run_to_completion(step: Any) -> None:
    """pyzmq >= 26 makes handle_zap_message a coroutine so that a credentials callback may be
    async; with key files (no callback) it never suspends, so one send() runs it through and
    the serve loop stays the only loop. Older pyzmq returns None here."""
    if not inspect.iscoroutine(step):
        return
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("the ZAP handler suspended: async credentials are not supported")
