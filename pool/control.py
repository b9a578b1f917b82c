"""The control socket: operators' commands as JSON over a ROUTER.

Request: one JSON frame {"cmd": "status", ...}. Reply: one JSON frame, {"ok": true, ...} or
{"ok": false, "error": "..."}.

Two doors to the same commands: the local ipc socket in the state directory (the socket file
is 0600 inside a 0700 directory: only the pool's user gets in), always; and, with
`pool serve --control-bind tcp://HOST:PORT`, a TCP socket for operators on other machines,
CurveZMQ only, letting in the public keys of --operator-keys and nobody else (a producer's
key on --curve-allow does not open it). `control_request` talks to either (`ControlTarget`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import zmq
from zmq.utils.monitor import parse_monitor_message

from pool.config import control_endpoint_for
from router.auth import CurveServer, KeyFileError
from router.client import close_monitor, open_monitor
from router.failover import TCP_SCHEME, endpoint_problem
from router.keys import ClientKeys

log = logging.getLogger("zeropool.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
DEFAULT_CONTROL_TIMEOUT_S = 10.0
PID_FILE = "serve.pid"  # in the state directory: the pool process's pid, written first
PID_CLOCK_SLACK_S = 1.0  # a process's start time is known to the clock tick
STARTING_POLL_S = 0.1  # how often a command looks for a starting pool's control socket
# A control socket whose pool process is not running here (killed, its files left): a live
# pool answers at once, so waiting this long tells it is gone. Not at once: the pool may be
# alive in another pid namespace (a container beside it sharing the state directory).
STALE_SOCKET_WAIT_S = 1.0
EXIT_CHECK_S = 0.25  # how often a command waiting for its reply looks whether the pool exited
POOL_ENV = "ZEROPOOL_POOL"  # a remote pool's control endpoint, for operator commands
# The largest frame the TCP control socket reads: commands are small JSON (a registry import,
# a golden file), and a bigger frame from afar only costs the pool memory.
REMOTE_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Commands that only read: a remote operator's others are logged with their key.
READ_ONLY_COMMANDS = frozenset({"status", "health", "rotation", "versions"})


# What kind of refusal a failed command's reply names (its "code", beside "error"):
BAD_COMMAND = "bad_request"  # its arguments are wrong: fix the command (the CLI exits 2)
UNKNOWN_VERSION = "unknown_version"  # it names a version the registry does not hold
REFUSED = "refused"  # the pool's state forbids it now: a rotation running, stopping, a lease
NO_ANSWER = "no_answer"  # said by this side: no reply in time, or none that is a control reply


class ControlError(RuntimeError):
    """The pool refused a command (`code` says how) or could not be reached."""

    def __init__(self, message: str, code: str = REFUSED) -> None:
        super().__init__(message)
        self.code = code


class PoolNotRunning(ControlError):
    """No pool serves from this state directory."""


class PoolStarting(ControlError):
    """A pool process of this state directory is alive but has no control socket yet (it is
    starting; or stopping): its registry is its own, so nothing may write the file now."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "starting")


class PoolUnreachable(ControlError):
    """Nothing answers at a remote control endpoint (connection refused, or no reply)."""


class ControlAuthFailed(ControlError):
    """The remote control socket refused this operator's Curve handshake."""


# -- the pool's side ---------------------------------------------------------------------------


class ControlServer:
    """Answers control requests on one ROUTER socket (the serve loop polls `sock`)."""

    def __init__(self, sock: zmq.Socket, handlers: dict[str, Handler],
                 remote: bool = False) -> None:
        self.sock = sock
        self.handlers = handlers
        self.remote = remote  # operators over TCP: their state-changing commands are logged

    @classmethod
    def local(cls, ctx: zmq.Context, state_dir: Path,
              handlers: dict[str, Handler]) -> ControlServer:
        """The ipc socket in the state directory, private to the pool's user."""
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(control_endpoint_for(state_dir))
        os.chmod(state_dir / "control.sock", 0o600)
        return cls(sock, handlers)

    def handle(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            envelope, payload = [f.bytes for f in frames[:-1]], frames[-1]
            request = _parse(payload.bytes)
            if request is not None and not isinstance(request.get("cmd"), str):
                request = None  # {"cmd": ["status"]}: answered as unknown, never looked up
            if self.remote and request is not None:
                self._audit(request, payload)
            try:
                self.sock.send_multipart([*envelope, _encode(self._dispatch(request))],
                                         zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the operator's command line went away

    def _audit(self, request: dict[str, Any], frame: zmq.Frame) -> None:
        """Who changed the pool from afar: libzmq hands over the ZAP user id (the operator's
        public key, Z85) and the peer's address with each message."""
        cmd = request.get("cmd")
        if cmd in READ_ONLY_COMMANDS:
            return
        log.info("remote control: %s from %s, operator key %s", cmd,
                 _frame_property(frame, "Peer-Address"), _frame_property(frame, "User-Id"))

    def _dispatch(self, request: dict[str, Any] | None) -> dict[str, Any]:
        handler = self.handlers.get(request.get("cmd")) if isinstance(request, dict) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command; known: {sorted(self.handlers)}",
                    "code": BAD_COMMAND}
        try:
            return {"ok": True, **handler(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except Exception as exc:  # a bug in one command must not take the pool down
            log.exception("control command %s failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}",
                    "code": "internal"}

    def close(self) -> None:
        self.sock.close(linger=0)


def _encode(reply: dict[str, Any]) -> bytes:
    """A reply as JSON; a handler's value JSON cannot hold is a bug, answered as one."""
    try:
        return orjson.dumps(reply)
    except TypeError as exc:
        log.exception("a control reply could not be encoded")
        return orjson.dumps({"ok": False, "error": f"internal error: {exc}"})


class RemoteControl(ControlServer):
    """The control commands on a TCP endpoint, for operators on other machines: CurveZMQ
    only, and only for the public keys in `operator_keys`.

    It has a zmq.Context of its own, so its own ZAP handler: ZAP is one per context, and the
    frontend's allow-list (producers; or "any key" without --curve-allow) must never decide
    who may rotate the pool."""

    def __init__(self, endpoint: str, secret_key_file: Path, operator_keys: Path,
                 handlers: dict[str, Handler] | None = None) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        try:
            self.curve = CurveServer(self.ctx, secret_key_file, operator_keys,
                                     allow_option="--operator-keys",
                                     socket_name="control socket")
        except KeyFileError:
            self.ctx.destroy(linger=0)
            raise
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, REMOTE_MAX_MESSAGE_BYTES)
        self.curve.apply(sock)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.curve.close()
            self.ctx.destroy(linger=0)
            raise ControlError(f"cannot listen on --control-bind {endpoint}: {exc}") from None
        super().__init__(sock, handlers or {}, remote=True)

    def status(self) -> dict[str, Any]:
        """`pool status`'s "remote_control": where, and the handshakes it refused."""
        return {"endpoint": self.endpoint, **self.curve.refusals.as_dict()}

    def close(self) -> None:
        super().close()
        self.curve.close()
        self.ctx.term()


def _parse(payload: bytes) -> dict[str, Any] | None:
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return request if isinstance(request, dict) else None


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except zmq.ZMQError:
        return "unknown"


# -- the operator's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class ControlTarget:
    """Where an operator command goes: the local control socket of a state directory, or a
    pool's --control-bind endpoint over CurveZMQ (`endpoint` and `curve` both set)."""

    state_dir: Path | None = None
    endpoint: str | None = None
    curve: ClientKeys | None = None

    @classmethod
    def local(cls, state_dir: str | Path) -> ControlTarget:
        return cls(state_dir=Path(state_dir))

    @classmethod
    def remote(cls, endpoint: str, curve: ClientKeys) -> ControlTarget:
        """ValueError unless `endpoint` is one tcp://HOST:PORT: libzmq would refuse anything
        else only at connect, as a ZMQError that says less."""
        if "," in endpoint:
            raise ValueError(f"{endpoint}: one control endpoint only (several pools are "
                             "`pool fleet --pools`)")
        if not endpoint.startswith(TCP_SCHEME):
            raise ValueError(f"{endpoint}: expected a tcp://HOST:PORT control endpoint (a "
                             "local pool is reached with --state-dir)")
        problem = endpoint_problem(endpoint)
        if problem is not None:
            raise ValueError(f"{endpoint}: {problem}")
        return cls(endpoint=endpoint, curve=curve)

    @property
    def is_remote(self) -> bool:
        return self.endpoint is not None

    def __str__(self) -> str:
        return f"pool {self.endpoint}" if self.is_remote else f"state directory {self.state_dir}"


def control_request(target: ControlTarget | str | Path, cmd: str,
                    timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S, **args: Any) -> dict[str, Any]:
    """Send one command to a pool (a ControlTarget, or a state directory: the local pool);
    raise ControlError (PoolNotRunning, PoolUnreachable, ControlAuthFailed) on failure."""
    if not isinstance(target, ControlTarget):
        target = ControlTarget.local(target)
    request = orjson.dumps({"cmd": cmd, **args})
    if target.is_remote:
        payload = _remote_exchange(target, request, cmd, timeout_s)
    else:
        payload = _local_exchange(Path(target.state_dir or "."), request, cmd, timeout_s)
    reply = _parse(payload)
    if reply is None:
        raise ControlError(f"{target} answered {cmd!r} with something that is not a control "
                           "reply: is it the pool's frontend rather than its --control-bind?",
                           NO_ANSWER)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "command failed"), reply.get("code", REFUSED))
    return reply


def serving_pid(state_dir: Path) -> int | None:
    """The pid of a live pool process of this state directory (starting, serving or
    stopping), from the pid file it writes first thing; None if there is none."""
    pid_file = state_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
        written = pid_file.stat().st_mtime
        started = psutil.Process(pid).create_time()
    except (FileNotFoundError, NotADirectoryError, ValueError, psutil.NoSuchProcess):
        return None  # NotADirectoryError: the "state directory" is a file; no pool there
    except psutil.AccessDenied:
        return pid  # another user's live process: assume it is the pool
    # A pid reused since (a container's small pids) belongs to a process started after the
    # file was written: not the pool that wrote it.
    return pid if started <= written + PID_CLOCK_SLACK_S else None


def _local_exchange(state_dir: Path, request: bytes, cmd: str, timeout_s: float) -> bytes:
    sock_path = state_dir / "control.sock"
    stale = False
    if not sock_path.exists():
        _wait_for_control_socket(state_dir, sock_path, timeout_s)
    elif serving_pid(state_dir) is None:
        stale, timeout_s = True, min(timeout_s, STALE_SOCKET_WAIT_S)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint_for(state_dir))
        sock.send_multipart([b"", request])
        if not _reply_within(sock, state_dir, timeout_s, watch_pid=not stale):
            if stale:
                raise PoolNotRunning(
                    f"no pool is running with state directory {state_dir}: its "
                    f"{sock_path.name} and {PID_FILE} are left from a pool that exited "
                    "without stopping (killed?); start one with `pool serve`")
            raise ControlError(f"the pool did not answer {cmd!r} within {timeout_s}s "
                               f"(state directory {state_dir})", NO_ANSWER)
        return sock.recv_multipart()[-1]
    finally:
        sock.close()


def _reply_within(sock: zmq.Socket, state_dir: Path, timeout_s: float, watch_pid: bool) -> bool:
    """Whether a reply came within `timeout_s`; PoolNotRunning as soon as the pool process
    exits meanwhile (a `pool stop` or a kill while a command waits), not at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(min(left, EXIT_CHECK_S) * 1000) or 1):
            return True
        if watch_pid and serving_pid(state_dir) is None:
            raise PoolNotRunning(f"the pool of {state_dir} exited before it answered")
    return False


def _wait_for_control_socket(state_dir: Path, sock_path: Path, timeout_s: float) -> None:
    """A pool that is starting opens its control socket once its workers can start (seconds:
    torch's import); until then its registry is not to be written by anyone else."""
    pid = serving_pid(state_dir)
    if pid is None or pid == os.getpid():
        raise PoolNotRunning(f"no pool is running with state directory {state_dir} "
                             f"(no {sock_path.name}); start one with `pool serve`")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(STARTING_POLL_S)
        if sock_path.exists():
            return
        if serving_pid(state_dir) is None:
            raise PoolNotRunning(f"the pool (pid {pid}) of {state_dir} exited before it "
                                 "served; see its log")
    raise PoolStarting(f"the pool (pid {pid}) of {state_dir} is starting or stopping and "
                       f"did not open its control socket within {timeout_s:g}s; try again "
                       "once `pool status` answers")


# What the socket monitor tells of a remote control connection.
_WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _remote_exchange(target: ControlTarget, request: bytes, cmd: str, timeout_s: float) -> bytes:
    """One request over TCP + Curve. The socket monitor turns a refused handshake or a refused
    connection into an error at once; a silent peer (a firewall dropping packets, a wrong
    server key) into one at the timeout."""
    assert target.endpoint is not None and target.curve is not None
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    target.curve.apply(sock)
    monitor = open_monitor(sock, _WATCHED)  # a pipe that never fills (router.client)
    watch = _ConnectionWatch(target.endpoint)
    deadline = time.monotonic() + timeout_s
    try:
        sock.connect(target.endpoint)
        poller = zmq.Poller()
        poller.register(monitor, zmq.POLLIN)
        try:
            # Queued until the handshake completes (a DEALER keeps a pipe from connect()); a
            # pipe already gone (the handshake failed first) leaves the monitor to say why.
            sock.send_multipart([b"", request], flags=zmq.NOBLOCK)
            poller.register(sock, zmq.POLLIN)
        except zmq.Again:
            pass
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(remaining * 1000) + 1))
            if sock in ready:
                return sock.recv_multipart(zmq.NOBLOCK)[-1]
            if monitor in ready:
                watch.take(monitor.recv_multipart(zmq.NOBLOCK))
        raise PoolUnreachable(watch.silence(cmd, timeout_s))
    finally:
        close_monitor(sock, monitor)
        sock.close()


class _ConnectionWatch:
    """Monitor events of one remote control connection, judged as they come."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.connected = False
        self.handshake_ok = False

    def take(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_CONNECTED:
            self.connected = True
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshake_ok = True
        elif kind == zmq.EVENT_CONNECT_RETRIED and not self.connected:
            # Refused or unreachable: nothing to wait for (a pool that is up accepts at once).
            raise PoolUnreachable(f"cannot connect to {self.endpoint}: connection refused or "
                                  "host unreachable (is the pool running with --control-bind "
                                  "on that address and port?)")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise ControlAuthFailed(
                f"{self.endpoint} refused this operator key (ZAP {value}): it is not among the "
                "pool's operator keys (--operator-keys); a producer's key cannot run operator "
                "commands")
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                      zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            raise ControlAuthFailed(
                f"the CurveZMQ handshake with {self.endpoint} failed ({value:#x}): is "
                "--server-key the pool's control public key, and the endpoint its "
                "--control-bind?")

    def silence(self, cmd: str, timeout_s: float) -> str:
        if not self.connected:
            return (f"could not connect to {self.endpoint} within {timeout_s}s (no route, or "
                    "a firewall drops the packets)")
        if not self.handshake_ok:
            return (f"{self.endpoint} accepted the connection but the CurveZMQ handshake did "
                    f"not complete within {timeout_s}s: is --server-key the pool's control "
                    "public key, and the endpoint its --control-bind?")
        return (f"{self.endpoint} did not answer {cmd!r} within {timeout_s}s: is it the "
                "pool's --control-bind (not its frontend), and is the pool stuck?")
