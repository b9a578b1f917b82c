"""The web console: the page (Streamlit's AppTest) against a live pool and against none, the
`pool ui` command, and one real browser (headless Debian Chromium driven by Playwright)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from cli.doors import UI_EXTRA_MISSING
from cli.main import app
from pool.control import control_request
from router.client import Client, verdict
from tests.support import RunningPool, free_port, short_tmpdir

pytestmark = pytest.mark.slow

PAGE = str(Path(__file__).resolve().parents[1] / "cli" / "web.py")
PAIR = ("今天天气真好", "今日阳光明媚")  # the page's defaults
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_S = 90  # one script run; the machine is shared and slow


def open_page(monkeypatch: pytest.MonkeyPatch, state_dir: Path, endpoint: str) -> AppTest:
    monkeypatch.setenv("ZEROPOOL_STATE_DIR", str(state_dir))
    monkeypatch.setenv("ZEROPOOL_ENDPOINT", endpoint)
    return AppTest.from_file(PAGE, default_timeout=PAGE_TIMEOUT_S).run()


def click(at: AppTest, label: str) -> AppTest:
    [button] = [b for b in at.button if b.label == label]
    return button.click().run()


def texts(elements: object) -> list[str]:
    return [e.value for e in elements]  # type: ignore[attr-defined]


def client_score(pool: RunningPool) -> float:
    with Client(pool.endpoint, timeout=60) as client:
        return client.similarity([PAIR]).scores[0]


def test_the_page_scores_the_default_pair_like_the_client(
        pool: RunningPool, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(monkeypatch, pool.state_dir, pool.endpoint)
    assert not at.exception and not at.error
    at = click(at, "Compute similarity")
    assert not at.exception and not at.error
    expected = client_score(pool)
    [metric] = [m for m in at.metric if m.label == "Similarity"]
    assert metric.value == f"{expected:.4f}"
    shown = texts(at.success) + texts(at.warning) + texts(at.error)
    assert f"Verdict: {verdict(expected)}" in shown
    # The live panel: the active version and one row per worker.
    assert "v1" in [m.value for m in at.metric if m.label == "Active"]
    workers = at.dataframe[0].value
    assert len(workers) == 2 and set(workers["version"]) == {"v1"}


def test_the_page_without_a_pool_shows_errors_not_tracebacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = short_tmpdir()
    try:
        at = open_page(monkeypatch, state_dir, f"ipc://{state_dir}/front.sock")
        assert not at.exception
        assert any("not running" in e for e in texts(at.error))
        at = click(at, "Compute similarity")
        assert not at.exception
        assert any("No pool listens" in e for e in texts(at.error))
        at = click(at, "Roll back")
        assert not at.exception
        assert any("not running" in e for e in texts(at.error))
    finally:
        os.rmdir(state_dir)


def test_pool_ui_without_streamlit_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "streamlit" else real(name, *a))
    result = CliRunner().invoke(app, ["ui", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["message"] == UI_EXTRA_MISSING



def wait_http(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "pool ui exited before serving"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"pool ui did not serve {url} within {timeout}s")


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("ZEROPOOL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and ZEROPOOL_REQUIRE_BROWSER=1")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def pool_ui(pool: RunningPool, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`pool ui --json` on a free port against the shared pool; killed and reaped after."""
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "ui", "--json", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=pool.env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, process)
        yield url, process, log
    finally:
        tree = [process, *psutil.Process(process.pid).children(recursive=True)] \
            if process.poll() is None else []
        for proc in tree:
            proc.kill()
        psutil.wait_procs(tree, timeout=30)
        process.wait(timeout=30)


@pytest.mark.browser
def test_a_browser_gets_the_clients_score(
        chromium: Path, pool: RunningPool,
        pool_ui: tuple[str, subprocess.Popen, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, process, log = pool_ui
    assert json.JSONDecoder().raw_decode(log.read_text())[0] == {"url": url}
    expected = client_score(pool)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            page.goto(url)
            page.get_by_role("button", name="Compute similarity").click()
            metric = page.get_by_test_id("stMetric").filter(has_text="Similarity")
            expect(metric.get_by_test_id("stMetricValue")).to_have_text(
                f"{expected:.4f}", timeout=PAGE_TIMEOUT_S * 1000)
            expect(page.get_by_text(f"Verdict: {verdict(expected)}")).to_be_visible()
        finally:
            browser.close()
    # SIGTERM reaches Streamlit through `pool ui`, which exits once its child is reaped.
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_the_sidebar_adds_a_version_and_rotates_to_it(
        pool: RunningPool, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(monkeypatch, pool.state_dir, pool.endpoint)
    at.text_input(key="add_path").input(str(models["v2"]))
    at.text_input(key="add_version").input("v2")
    at = click(at, "Add version")
    assert not at.exception
    assert "registered v2" in texts(at.success)
    at.selectbox(key="rotate_version").select("v2")
    at = click(at, "Rotate")
    assert not at.exception
    assert any("to v2 started" in s for s in texts(at.success)), texts(at.error)
    deadline = time.monotonic() + 300
    while True:
        status = control_request(pool.state_dir, "status")
        rotation = status["rotation"]
        if status["active"] == "v2" and rotation and rotation["outcome"] == "done":
            break
        assert rotation is None or rotation["outcome"] in (None, "done"), rotation
        assert time.monotonic() < deadline, f"rotation not done in time: {rotation}"
        time.sleep(0.5)
    at = at.run()
    assert not at.exception
    assert any("**v2**" in i for i in texts(at.info))
