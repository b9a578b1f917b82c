"""The client side of CurveZMQ: the key files a producer loads to talk to a protected pool.

Keys are pyzmq's certificate files (`zmq.auth.create_certificates`): `NAME.key` holds the
public key, `NAME.key_secret` both. A client needs the server's public key and its own secret
certificate. This module is what `router.client` imports, so it holds nothing of the server's
(the ZAP handler lives in router.auth): `from router import Client` loads no server code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

SERVER_KEY_ENV = "ZEROPOOL_SERVER_KEY"  # the pool's public key file, for clients
CLIENT_KEY_ENV = "ZEROPOOL_CLIENT_KEY"  # the client's secret key file


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
