"""Only who is allowed: CurveZMQ on the frontend, and the control socket's permissions."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from router.auth import is_loopback
from router.client import AsyncClient, AuthenticationFailed, Client
from router.keys import ClientKeys, create_keys
from tests.support import free_port, run_cli, start_pool, stop_pool

pytestmark = pytest.mark.slow
PAIR = ("今天天气真好", "今日阳光明媚")



def test_curve_lets_in_allowed_keys_only_and_rereads_the_allow_dir(
        models: dict[str, Path], tmp_path: Path) -> None:
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    create_keys(keys, "server")
    for name in ("alice", "mallory"):
        create_keys(keys, name)
    shutil.copy(keys / "alice.key", allow)
    pool = start_pool(models["v1"], "--curve-secret-key", str(keys / "server.key_secret"),
                      "--curve-allow", str(allow), workers=1, wait=False)
    try:
        # wait_ready pings without keys, which Curve refuses: wait for the control socket.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = run_cli("health", "--json", env=pool.env)
            if done.returncode == 0:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stdout + done.stderr
        alice = ClientKeys.from_files(keys / "server.key", keys / "alice.key_secret")
        mallory = ClientKeys.from_files(keys / "server.key", keys / "mallory.key_secret")
        with Client(pool.endpoint, timeout=30, curve=alice) as client:
            assert -1 <= client.similarity([PAIR]).scores[0] <= 1
        # Refused at the handshake, and said so at once: not a NoReply after the timeout.
        for curve, why in ((mallory, "refused this client's Curve key (ZAP 400)"),
                           (None, "the pool requires CurveZMQ")):
            with Client(pool.endpoint, timeout=60, curve=curve) as client, \
                    pytest.raises(AuthenticationFailed, match=re.escape(why)):
                client.similarity([PAIR])

            async def async_call(keys: ClientKeys | None = curve) -> None:
                async with AsyncClient(pool.endpoint, timeout=60, curve=keys) as client:
                    await client.ping()

            with pytest.raises(AuthenticationFailed, match=re.escape(why)):
                asyncio.run(async_call())
        done = run_cli("ping", "--json", "--server-key", str(keys / "server.key"),
                       "--client-key", str(keys / "mallory.key_secret"), env=pool.env)
        assert done.returncode == 3, done.stdout + done.stderr
        assert json.loads(done.stdout)["error"]["code"] == "auth_failed"
        done = run_cli("bench", "--duration", "2", "--server-key", str(keys / "server.key"),
                       "--client-key", str(keys / "mallory.key_secret"), env=pool.env)
        assert done.returncode == 3 and "refused this client's Curve key" in done.stderr
        curve_status = json.loads(run_cli("status", "--json", env=pool.env).stdout)["curve"]
        assert curve_status["refused_handshakes"] >= 3
        assert curve_status["last_refused_from"]  # the peer's address, as ZAP saw it
        assert "refused a CurveZMQ handshake from" in (pool.state_dir / "console.log").read_text()

        done = run_cli("similarity", *PAIR, "--json", "--server-key", str(keys / "server.key"),
                       "--client-key", str(keys / "alice.key_secret"), env=pool.env)
        assert done.returncode == 0 and json.loads(done.stdout)["ok"], done.stderr
        done = run_cli("ping", "--server-key", str(keys / "server.key"), env=pool.env)
        assert done.returncode == 2 and "both --server-key" in done.stderr

        shutil.copy(keys / "mallory.key", allow)  # let mallory in, no restart
        time.sleep(2.5)  # the allow directory is re-read once a second when it changed
        with Client(pool.endpoint, timeout=30, curve=mallory) as client:
            assert -1 <= client.similarity([PAIR]).scores[0] <= 1

        allow.rename(tmp_path / "gone")  # an operator's slip must not take the pool down
        time.sleep(2.5)
        with Client(pool.endpoint, timeout=30, curve=alice) as client:
            assert -1 <= client.similarity([PAIR]).scores[0] <= 1
    finally:
        assert stop_pool(pool) == 0


def test_exposed_without_curve_warns_loudly_and_permissions_are_private(
        models: dict[str, Path]) -> None:
    port = free_port()
    pool = start_pool(models["v1"], "--bind", f"tcp://0.0.0.0:{port}", workers=1, wait=False)
    pool.endpoint = f"tcp://127.0.0.1:{port}"
    try:
        pool.process.wait_ready(pool.endpoint, workers=1, timeout=120)
        log = (pool.state_dir / "console.log").read_text()
        assert "Curve is off" in log
        assert stat.S_IMODE(pool.state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((pool.state_dir / "control.sock").stat().st_mode) == 0o600
        assert stat.S_IMODE((pool.state_dir / "pool.log").stat().st_mode) == 0o600
    finally:
        assert stop_pool(pool) == 0


@pytest.mark.parametrize(("endpoint", "loopback"), [
    ("ipc:///tmp/x.sock", True), ("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:5555", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://10.1.2.3:5555", False),
])
def test_loopback_detection(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback
