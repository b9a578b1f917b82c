"""CurveZMQ on the frontend: who may send requests, and encryption on the wire.

Keys are pyzmq's certificate files (`zmq.auth.create_certificates`): `NAME.key` holds the
public key, `NAME.key_secret` both. The pool loads its secret certificate and a directory of
allowed client public keys; pyzmq's ZAP `Authenticator` judges each handshake, driven by the
serve loop's poller (no authenticator thread). A client needs the server's public key and its
own secret certificate.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.base import Authenticator

log = logging.getLogger("zeropool.auth")

SERVER_KEY_ENV = "ZEROPOOL_SERVER_KEY"  # the pool's public key file, for clients
CLIENT_KEY_ENV = "ZEROPOOL_CLIENT_KEY"  # the client's secret key file
_LOOPBACK = re.compile(r"^(ipc|inproc)://|^tcp://(127\.[0-9.]+|localhost|\[::1\]|::1):")


class KeyFileError(ValueError):
    """A key file is missing or not a certificate: the message says which and why."""


def load_certificate(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a pyzmq certificate file, or KeyFileError saying what is wrong."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc}") from None
    if need_secret and not secret:
        raise KeyFileError(f"{path} holds no secret key: give the .key_secret file")
    return public, secret


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair as DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def is_loopback(endpoint: str) -> bool:
    """Reachable only from this machine (ipc, inproc, tcp on a loopback address)."""
    return bool(_LOOPBACK.match(endpoint))


@dataclass(frozen=True)
class ClientKeys:
    """What a producer needs to talk to a Curve-protected pool."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str | Path, client_key: str | Path) -> ClientKeys:
        server_public, _ = load_certificate(Path(server_key), need_secret=False)
        public, secret = load_certificate(Path(client_key), need_secret=True)
        assert secret is not None
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> ClientKeys | None:
        """From ZEROPOOL_SERVER_KEY and ZEROPOOL_CLIENT_KEY when both are set."""
        server, client = os.environ.get(SERVER_KEY_ENV), os.environ.get(CLIENT_KEY_ENV)
        return cls.from_files(server, client) if server and client else None

    def apply(self, sock: zmq.Socket) -> None:
        """Before connect()."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class CurveServer:
    """The frontend's Curve keys and the ZAP handler deciding which clients get in."""

    def __init__(self, ctx: zmq.Context, secret_key_file: Path, allow_dir: Path | None) -> None:
        self.public, secret = load_certificate(secret_key_file, need_secret=True)
        assert secret is not None
        self._secret = secret
        self.allow_dir = allow_dir
        if allow_dir is not None and not allow_dir.is_dir():
            raise KeyFileError(f"--curve-allow {allow_dir} is not a directory of client keys")
        self.authenticator = Authenticator(ctx, log=logging.getLogger("zeropool.auth.zap"))
        self.authenticator.start()
        self._allow_stamp: float | None = None
        self.reload_if_changed()

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
                log.warning("Curve without --curve-allow: traffic is encrypted, but any client "
                            "key is let in")
                self.authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
                self._allow_stamp = 0.0
            return
        stamp = self.allow_dir.stat().st_mtime
        if stamp == self._allow_stamp:
            return
        self._allow_stamp = stamp
        self.authenticator.configure_curve(domain="*", location=str(self.allow_dir))
        allowed = len(list(self.allow_dir.glob("*.key")))
        log.info("Curve: %d client key(s) allowed from %s", allowed, self.allow_dir)

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
