"""The control socket: operators' commands as JSON over an ipc ROUTER in the state directory.

Request: one JSON frame {"cmd": "status", ...}. Reply: one JSON frame, {"ok": true, ...} or
{"ok": false, "error": "..."}. The socket file is 0600 inside a 0700 directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import zmq

from pool.config import control_endpoint_for

log = logging.getLogger("zeropool.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
DEFAULT_CONTROL_TIMEOUT_S = 10.0


class ControlError(RuntimeError):
    """The pool refused a command or could not be reached."""


class PoolNotRunning(ControlError):
    """No pool serves from this state directory."""


class ControlServer:
    def __init__(self, ctx: zmq.Context, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(control_endpoint_for(state_dir))
        os.chmod(state_dir / "control.sock", 0o600)
        self.handlers = handlers

    def handle(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, payload = frames[:-1], frames[-1]
            reply = self._dispatch(payload)
            try:
                self.sock.send_multipart([*envelope, orjson.dumps(reply)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the operator's command line went away

    def _dispatch(self, payload: bytes) -> dict[str, Any]:
        try:
            request = orjson.loads(payload)
            handler = self.handlers[request["cmd"]]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return {"ok": False, "error": f"unknown command; known: {sorted(self.handlers)}"}
        try:
            return {"ok": True, **handler(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in one command must not take the pool down
            log.exception("control command %s failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def close(self) -> None:
        self.sock.close(linger=0)


def control_request(state_dir: Path, cmd: str, timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S,
                    **args: Any) -> dict[str, Any]:
    """Send one command to the pool serving from `state_dir`; raise ControlError on failure."""
    sock_path = Path(state_dir) / "control.sock"
    if not sock_path.exists():
        raise PoolNotRunning(f"no pool is running with state directory {state_dir} "
                           f"(no {sock_path.name}); start one with `pool serve`")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint_for(Path(state_dir)))
        sock.send_multipart([b"", orjson.dumps({"cmd": cmd, **args})])
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"the pool did not answer {cmd!r} within {timeout_s}s "
                               f"(state directory {state_dir})")
        reply = orjson.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "command failed"))
    return reply
