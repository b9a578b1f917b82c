"""The operator commands (pool.commands) on a fake clock: the control handlers a running pool
answers, over the same broker, supervisor and rotation controller as tests/fakepool.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pool.commands import Commands
from pool.control import ControlError, ControlServer
from pool.fleet import FleetRollout, PoolLink, PoolReport
from pool.gate import QualityGate
from pool.quality import LabelledPair
from pool.rotation import DEFAULT_DRAIN_TIMEOUT_S, Phase
from tests.fakepool import FakePool
from tests.modelstub import model_stub


class Handle:
    """What the serve process shows commands, over a FakePool."""

    def __init__(self, fake: FakePool) -> None:
        self.fake = fake
        self.stopping = False
        self.default_workers = 2
        self.gate: QualityGate | None = None  # the pool's --eval

    @property
    def active_version(self) -> str | None:
        return self.fake.broker.active

    def loaded(self, version: str) -> bool:
        return version in self.fake.supervisor.plans

    def quality_gate(self, version: str) -> QualityGate | None:
        return self.gate


Pool = tuple[FakePool, ControlServer, Handle]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name in ("v1", "v2", "v1-experiment"):
        model_stub(tmp_path / name)
    return tmp_path


@pytest.fixture
def pool(models: Path) -> Iterator[Pool]:
    fake = FakePool(models / "state")
    fake.load("v1", path=str(models / "v1"))
    fake.bring_up("v1")
    fake.registry.put_version("v1", str(models / "v1"), auto_load=True)
    fake.registry.set_active("v1")
    fake.registry.save()
    handle = Handle(fake)
    commands = Commands(handle, fake.rotations, fake.registry, clock=fake.clock)
    yield fake, ControlServer(None, commands.handlers()), handle
    fake.close()


def command(server: ControlServer, cmd: str, **args: Any) -> dict[str, Any]:
    return server._dispatch({"cmd": cmd, **args})


def rotate_to_the_end(fake: FakePool, version: str) -> None:
    rot = fake.rotations.current
    for _ in range(200):
        if rot.finished:
            return
        fake.bring_up(version)
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    raise AssertionError(f"rotation still {rot.phase}")


def test_a_refused_rotation_leaves_the_registry_as_it_was(
        pool: Pool, models: Path) -> None:
    fake, server, _ = pool
    on_disk = (models / "state" / "versions.json").read_bytes()
    reply = command(server, "rotate", version="v1", path=str(models / "v1-experiment"))
    assert reply == {"ok": False, "error": "v1 is already the active version", "code": "refused"}
    fake.registry.save()  # whatever writes next must not store the refused path
    assert orjson.loads((models / "state" / "versions.json").read_bytes()) == \
        orjson.loads(on_disk)
    assert fake.registry.version("v1")["path"] == str(models / "v1")


@pytest.mark.parametrize(("args", "code", "says"), [
    ({"version": "v2", "canary": 150}, "bad_request", "--canary 150: a percentage"),
    ({"version": "v2", "strategy": "sideways"}, "bad_request", "unknown strategy 'sideways'"),
    ({"version": "v2", "bake": -1}, "bad_request", "--bake is a number of seconds"),
    ({"version": "v2", "path": "/nonexistent"}, "bad_request", "is not a directory"),
    ({"version": "v9"}, "unknown_version", "unknown version 'v9'"),
    ({"version": "v1"}, "refused", "v1 is already the active version"),
])
def test_a_refused_command_says_whether_its_arguments_or_the_pool_refused_it(
        pool: Pool, models: Path, args: dict[str, Any], code: str, says: str) -> None:
    _, server, _ = pool
    args = {"path": str(models / "v2"), **args} if args["version"] == "v2" else args
    reply = command(server, "rotate", **args)
    assert reply["ok"] is False and reply["code"] == code and says in reply["error"], reply


def test_a_registered_directory_broken_since_is_the_commands_fault_for_load_and_rotate(
        pool: Pool, models: Path) -> None:
    _, server, _ = pool
    assert command(server, "versions_add", version="v2", path=str(models / "v2"))["ok"]
    (models / "v2" / "model.safetensors").write_bytes(b"cut")
    for cmd in ("load", "rotate"):
        reply = command(server, cmd, version="v2")
        assert reply["ok"] is False and reply["code"] == "bad_request", (cmd, reply)
        assert "model.safetensors is not a safetensors file" in reply["error"]


def test_a_drain_timeout_of_zero_is_zero(pool: Pool, models: Path) -> None:
    fake, server, _ = pool
    reply = command(server, "rotate", version="v2", path=str(models / "v2"), drain_timeout=0,
                    strategy="surge")
    assert reply["ok"], reply
    assert fake.rotations.current.drain_timeout_s == 0.0
    assert DEFAULT_DRAIN_TIMEOUT_S > 0


def test_rollback_to_a_named_version_rotates_back_to_it(pool: Pool, models: Path) -> None:
    fake, server, handle = pool
    assert command(server, "rotate", version="v2", path=str(models / "v2"),
                   strategy="surge")["ok"]
    rotate_to_the_end(fake, "v2")
    assert fake.broker.active == "v2"
    # A gate v1 might not pass against v2: it served before, so it is not gated going back.
    handle.gate = QualityGate("gate.tsv", (LabelledPair(2, "a", "b", 1),
                                           LabelledPair(0, "c", "d", 2)))
    reply = command(server, "rollback", version="v1")
    assert reply["ok"] and reply["kind"] == "rotate", reply
    assert reply["rotation"]["target"] == "v1" and reply["rotation"]["quality"] is None
    rotate_to_the_end(fake, "v1")
    assert fake.rotations.current.phase == Phase.DONE and fake.broker.active == "v1"
    unknown = command(server, "rollback", version="v9")
    assert unknown == {"ok": False, "error": "unknown version 'v9' to roll back to",
                       "code": "unknown_version"}


def test_a_fleets_rollback_of_a_switched_back_canary_ends_rolled_back_on_v1(
        pool: Pool, models: Path) -> None:
    """The fleet's judge switched the canary back; its rollback then finds the pool still
    rolling back: it waits for that, and the pool neither refuses nor rotates to v2 again."""
    fake, server, _ = pool

    def request(cmd: str, **args: Any) -> dict[str, Any]:
        if cmd == "status":  # what the rollout reads of it (the whole document needs workers)
            return {"active": fake.broker.active, "rotation": fake.rotations.status()}
        reply = command(server, cmd, **args)
        if not reply["ok"]:
            raise ControlError(reply["error"])
        return reply

    def sleep(seconds: float) -> None:
        fake.serve_all()
        fake.finish_stops()
        fake.tick(seconds)

    rollout = FleetRollout([PoolLink("a", request)], "v2", str(models / "v2"), bake_s=300,
                           owner="fleet-x", clock=fake.clock, sleep=sleep)
    request("lease", owner="fleet-x", ttl_s=60)
    request("rotate", version="v2", path=str(models / "v2"), bake=300, lease="fleet-x",
            strategy="surge")
    for _ in range(50):
        fake.bring_up("v2")
        if fake.rotations.current.phase == Phase.BAKING:
            break
    assert request("rollback", lease="fleet-x")["kind"] == "abort"  # the judge's
    assert fake.rotations.current.phase == Phase.ROLLING_BACK
    rollout.report.source = "v1"
    rollout.report.pools = [PoolReport("a", "v1", phase="baking")]
    assert rollout._roll_back(), rollout.report.pools[0].reason
    assert rollout.report.pools[0].phase == "rolled_back"
    assert fake.broker.active == "v1" and fake.rotations.current.outcome == "rolled_back"
    assert fake.rotations.current.target == "v2", "no second rotation was started"


def test_a_malformed_control_message_is_answered_and_the_socket_serves_on(
        tmp_path: Path) -> None:
    import zmq

    from pool.config import control_endpoint_for

    ctx = zmq.Context()
    server = ControlServer.local(ctx, tmp_path, {"status": lambda req: {"state": "serving"},
                                                 "odd": lambda req: {"value": object()}})
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(control_endpoint_for(tmp_path))
    try:
        for request, want in [(b'{"cmd": ["status"]}', "unknown command"),
                              (b'{"cmd": {"a": 1}}', "unknown command"),
                              (b"not json", "unknown command"),
                              (b'{"cmd": "odd"}', "internal error"),
                              (b'{"cmd": "status"}', None)]:
            client.send_multipart([b"", request])
            assert server.sock.poll(5000)
            server.handle()
            assert client.poll(5000)
            reply = orjson.loads(client.recv_multipart()[-1])
            if want is None:
                assert reply == {"ok": True, "state": "serving"}
            else:
                assert not reply["ok"] and want in reply["error"], reply
    finally:
        client.close()
        server.close()
        ctx.term()
