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


def load_public_key(path: Path) -> bytes:
    """The public key of a pyzmq certificate file (.key or .key_secret)."""
    return _load_certificate(path)[0]


def load_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file, or KeyFileError saying what is wrong."""
    public, secret = _load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key: give the .key_secret file")
    return public, secret


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc}") from None


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
        public, secret = load_key_pair(Path(client_key))
        return cls(load_public_key(Path(server_key)), public, secret)

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
        self.public, self._secret = load_key_pair(secret_key_file)
        self.allow_dir = allow_dir
        if allow_dir is not None and not allow_dir.is_dir():
            raise KeyFileError(f"--curve-allow {allow_dir} is not a directory of client keys")
        self.authenticator = Authenticator(ctx, log=logging.getLogger("zeropool.auth.zap"))
        self.authenticator.start()
        self._allow_stamp: object = None
        self.reload_if_changed()
        if self._allow_stamp is None:
            raise KeyFileError(f"cannot load the client keys in --curve-allow {allow_dir}")

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
            log.error("cannot read --curve-allow %s (%s); keeping the keys loaded before",
                      self.allow_dir, exc)
            return
        self._allow_stamp = stamp
        log.info("Curve: %d client key(s) allowed from %s", len(stamp), self.allow_dir)

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
