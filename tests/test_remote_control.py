"""Remote operator control: `pool serve --control-bind tcp://...` over CurveZMQ, for the keys of
--operator-keys alone, and the operator commands' --pool. Real `pool serve` processes, real
TCP sockets on 127.0.0.1, the CLI as an operator runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pool.control import ControlTarget, PoolUnreachable, control_request
from router.client import AuthenticationFailed, Client
from router.keys import ClientKeys, create_keys
from tests.support import (
    RunningPool,
    free_port,
    run_cli,
    short_tmpdir,
    start_pool,
    stop_pool,
    wait_for,
)

pytestmark = pytest.mark.slow
PAIR = ("今天天气真好", "今日阳光明媚")



@dataclass(frozen=True)
class Keys:
    """The pool's key pair, one operator, one producer and a stranger; two allow-lists."""

    root: Path

    def public(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def secret(self, name: str) -> Path:
        return self.root / f"{name}.key_secret"

    @property
    def operators(self) -> Path:
        return self.root / "operators"

    @property
    def producers(self) -> Path:
        return self.root / "producers"

    def remote(self, client: str) -> list[str]:
        """The options of an operator command sent with `client`'s key."""
        return ["--server-key", str(self.public("server")), "--client-key",
                str(self.secret(client))]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    found = Keys(tmp_path_factory.mktemp("keys"))
    for name in ("server", "operator", "producer", "stranger"):
        create_keys(found.root, name)
    found.operators.mkdir()
    found.producers.mkdir()
    shutil.copy(found.public("operator"), found.operators)
    shutil.copy(found.public("producer"), found.producers)
    return found


@dataclass
class RemotePool:
    pool: RunningPool
    frontend: str
    control: str
    elsewhere: dict[str, str]  # an environment whose state directory holds no pool


@pytest.fixture(scope="module")
def remote(models: dict[str, Path], keys: Keys) -> Iterator[RemotePool]:
    """One pool: Curve on a TCP frontend (producers' list), control on TCP (operators')."""
    frontend, control = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    pool = start_pool(models["v1"], "--bind", frontend,
                      "--curve-secret-key", str(keys.secret("server")),
                      "--curve-allow", str(keys.producers), "--control-bind", control,
                      "--operator-keys", str(keys.operators), "--metrics-port", "0",
                      workers=1, wait=False)
    pool.endpoint = frontend
    try:
        # Its frontend lets no key-less ping in: ready is what the local control socket says.
        wait_for(lambda: _ready(pool), timeout=120, what="the pool's worker")
        nowhere = short_tmpdir()
        yield RemotePool(pool, frontend, control,
                         {**os.environ, "ZEROPOOL_STATE_DIR": str(nowhere)})
        shutil.rmtree(nowhere, ignore_errors=True)
    finally:
        assert stop_pool(pool) == 0


def _ready(pool: RunningPool) -> bool:
    if pool.process.proc.poll() is not None:
        raise AssertionError(f"pool serve exited:\n{pool.process.log_tail()}")
    try:
        return any(w["state"] == "ready" for w in pool.status()["workers"])
    except Exception:  # not listening yet
        return False


def cli_json(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, dict, str]:
    done = run_cli(*args, "--json", env=env, timeout=timeout)
    return done.returncode, json.loads(done.stdout), done.stderr


def test_an_operator_key_runs_status_and_a_rotation_from_afar(
        remote: RemotePool, keys: Keys, models: dict[str, Path]) -> None:
    # The environment names no running pool locally: what works went over TCP.
    rc, st, err = cli_json("status", "--pool", remote.control, *keys.remote("operator"),
                           env=remote.elsewhere)
    assert rc == 0, err
    assert st["active"] == "v1" and st["remote_control"]["endpoint"] == remote.control

    rc, reply, err = cli_json("rotate", "--version", "v2", "--path", str(models["v2"]),
                              "--pool", remote.control, *keys.remote("operator"),
                              env=remote.elsewhere)
    assert rc == 0, err
    assert reply["rotation"]["outcome"] == "done", reply
    # It really happened: the pool's own (local) control socket says so, and producers get v2.
    assert remote.pool.status()["active"] == "v2"
    producer = ClientKeys.from_files(keys.public("server"), keys.secret("producer"))
    with Client(remote.frontend, timeout=30, curve=producer) as client:
        assert client.similarity([PAIR]).version == "v2"

    # The same through the environment, as a shell of an operator would hold it.
    env = {**remote.elsewhere, "ZEROPOOL_POOL": remote.control,
           "ZEROPOOL_SERVER_KEY": str(keys.public("server")),
           "ZEROPOOL_CLIENT_KEY": str(keys.secret("operator"))}
    rc, listing, err = cli_json("versions", "list", env=env)
    assert rc == 0, err
    assert {v["version"]: v["active"] for v in listing["versions"]} == {"v1": False, "v2": True}
    rc, report, err = cli_json("health", env=env)
    assert rc == 0 and report["active"] == "v2", err
    # Who changed the pool from afar is in its log: the operator's public key.
    operator_key = re.search(r'public-key = "(.+)"', keys.public("operator").read_text())
    assert operator_key is not None
    log = (remote.pool.state_dir / "console.log").read_text()
    assert f"remote control: rotate from 127.0.0.1, operator key {operator_key.group(1)}" in log


def test_a_producer_key_is_refused_control_but_still_served(
        remote: RemotePool, keys: Keys) -> None:
    before = remote.pool.status()
    tries = [("producer", ["status"]), ("producer", ["rotate", "--version", "v1"]),
             ("producer", ["health"]), ("stranger", ["status"])]
    for name, command in tries:
        rc, reply, _ = cli_json(*command, "--pool", remote.control, *keys.remote(name),
                                env=remote.elsewhere, timeout=30)
        assert rc == 3, (name, command, reply)
        assert reply["error"]["code"] == "auth_failed"
        assert "not among the pool's operator keys (--operator-keys)" in reply["error"]["message"]
    after = remote.pool.status()
    # No rotation started: the last one is still the last.
    assert after["rotation"]["id"] == before["rotation"]["id"]
    assert after["active"] == before["active"]
    # Counted and logged as the operator door's refusals, not the frontend's.
    assert after["remote_control"]["refused_handshakes"] >= len(tries)
    assert after["remote_control"]["last_refused_from"] == "127.0.0.1"
    assert after["curve"]["refused_handshakes"] == before["curve"]["refused_handshakes"]
    log = (remote.pool.state_dir / "console.log").read_text()
    assert "refused a CurveZMQ handshake from 127.0.0.1 on the control socket" in log
    with urllib.request.urlopen(after["metrics_url"], timeout=10) as scraped:
        metrics = scraped.read().decode()
    assert re.search(r"^zeropool_control_refused_handshakes_total ([0-9.]+)$", metrics, re.M)

    # The producer still sends requests; the operator's key does not open the frontend.
    producer = ClientKeys.from_files(keys.public("server"), keys.secret("producer"))
    with Client(remote.frontend, timeout=30, curve=producer) as client:
        assert -1 <= client.similarity([PAIR]).scores[0] <= 1
    operator = ClientKeys.from_files(keys.public("server"), keys.secret("operator"))
    with Client(remote.frontend, timeout=30, curve=operator) as client, \
            pytest.raises(AuthenticationFailed):
        client.ping()


def test_the_operator_list_is_reread_without_a_restart(remote: RemotePool, keys: Keys) -> None:
    status = ["status", "--pool", remote.control]
    (keys.operators / "operator.key").unlink()  # the operator leaves the team
    try:
        wait_for(lambda: cli_json(*status, *keys.remote("operator"), env=remote.elsewhere,
                                  timeout=30)[0] == 3, timeout=15, what="the key refused")
    finally:
        shutil.copy(keys.public("operator"), keys.operators)
    wait_for(lambda: cli_json(*status, *keys.remote("operator"), env=remote.elsewhere,
                              timeout=30)[0] == 0, timeout=15, what="the key let in again")


def test_bad_remote_options_are_usage_errors(remote: RemotePool, keys: Keys) -> None:
    rc, reply, _ = cli_json("status", "--pool", remote.control, env=remote.elsewhere)
    assert rc == 2 and "remote control is CurveZMQ only" in reply["error"]["message"]
    rc, reply, _ = cli_json("status", "--pool", "ipc:///tmp/x.sock", *keys.remote("operator"),
                            env=remote.elsewhere)
    assert rc == 2 and "expected a tcp://HOST:PORT" in reply["error"]["message"]
    # The pool's public key is not its control key's? Here it is the operator's own: refused.
    rc, reply, _ = cli_json("status", "--pool", remote.control, "--server-key",
                            str(keys.public("operator")), "--client-key",
                            str(keys.secret("operator")), env=remote.elsewhere, timeout=30)
    assert rc in (1, 3) and "--server-key" in reply["error"]["message"], reply


def test_a_dead_address_fails_fast_and_clearly(keys: Keys) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PoolUnreachable, match="connection refused"):
        control_request(ControlTarget.remote(dead, ClientKeys.from_files(
            keys.public("server"), keys.secret("operator"))), "status", timeout_s=10)
    assert time.monotonic() - started < 5
    env = {**os.environ, "ZEROPOOL_STATE_DIR": str(keys.root / "none")}
    started = time.monotonic()
    rc, reply, _ = cli_json("health", "--pool", dead, *keys.remote("operator"), env=env,
                            timeout=30)
    assert rc == 2 and reply["error"]["code"] == "unreachable", reply
    assert "cannot connect to" in reply["error"]["message"]
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(("extra", "says"), [
    ([], "--control-bind needs CurveZMQ"),
    (["--curve-secret-key", "{secret}"], "--control-bind needs --operator-keys"),
    (["--curve-secret-key", "{secret}", "--curve-allow", "{producers}", "--operator-keys",
      "{producers}"], "must not be the producers' --curve-allow"),
    (["--control-secret-key", "{missing}", "--operator-keys", "{operators}"],
     "cannot read the key file"),
])
def test_control_bind_without_curve_refuses_to_start(keys: Keys, extra: list[str],
                                                     says: str) -> None:
    state = short_tmpdir()
    try:
        args = [a.format(secret=keys.secret("server"), producers=keys.producers,
                         operators=keys.operators, missing=keys.root / "nope.key_secret")
                for a in extra]
        done = run_cli("serve", "--model", "echo", "--workers", "1", "--state-dir", str(state),
                       "--bind", f"tcp://127.0.0.1:{free_port()}",
                       "--control-bind", f"tcp://127.0.0.1:{free_port()}", *args,
                       env=dict(os.environ), timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert says in done.stderr
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_the_web_console_runs_a_remote_pool_with_the_operator_s_keys(
        remote: RemotePool, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pool ui --pool`: the page (Streamlit's AppTest, as `pool ui` sets its environment)
    reads and operates the pool over the Curve control socket; its similarity form goes to
    the frontend with the same key, so until the operator's key is on the frontend's list it
    shows the refusal, not a traceback."""
    from streamlit.testing.v1 import AppTest

    for name, value in {"ZEROPOOL_POOL": remote.control, "ZEROPOOL_ENDPOINT": remote.frontend,
                        "ZEROPOOL_SERVER_KEY": str(keys.public("server")),
                        "ZEROPOOL_CLIENT_KEY": str(keys.secret("operator")),
                        "ZEROPOOL_STATE_DIR": remote.elsewhere["ZEROPOOL_STATE_DIR"]}.items():
        monkeypatch.setenv(name, value)
    page = str(Path(__file__).resolve().parents[1] / "cli" / "web.py")
    at = AppTest.from_file(page, default_timeout=90).run()
    assert not at.exception and not [e.value for e in at.error]
    active = remote.pool.status()["active"]
    assert [m.value for m in at.metric if m.label == "Active"] == [active]
    assert set(at.dataframe[0].value["version"]) == {active}
    assert any(remote.control in c.value for c in at.caption)

    [score] = [b for b in at.button if b.label == "Compute similarity"]
    at = score.click().run()
    assert not at.exception
    assert any("refused" in e.value.lower() for e in at.error), [e.value for e in at.error]

    operator = ClientKeys.from_files(keys.public("server"), keys.secret("operator"))
    shutil.copy(keys.public("operator"), keys.producers)  # the frontend rereads its list
    try:
        wait_for(lambda: frontend_lets_in(remote.frontend, operator), timeout=15,
                 what="the operator's key let in at the frontend")
        at = score.click().run()
        assert not at.exception and not [e.value for e in at.error]
        [metric] = [m for m in at.metric if m.label == "Similarity"]
        assert -1 <= float(metric.value) <= 1
    finally:
        (keys.producers / keys.public("operator").name).unlink()
        wait_for(lambda: not frontend_lets_in(remote.frontend, operator), timeout=15,
                 what="the operator's key refused at the frontend again")


def frontend_lets_in(frontend: str, keys: ClientKeys) -> bool:
    with Client(frontend, timeout=5, curve=keys) as client:
        try:
            client.ping()
        except AuthenticationFailed:
            return False
    return True
