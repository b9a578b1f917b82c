"""What the tests share, imported as a library (tests/conftest.py holds only the fixtures):
tiny BERT models generated on the spot, the seed's reference computation, real `pool serve`
processes on ipc sockets, the load run beside them, the CLI as a user runs it, and polling
for a condition."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import psutil
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from pool.control import control_request
from tooling.launch import PoolProcess
from tooling.loadgen import ThreadLoad

T = TypeVar("T")
TINY_MAX_LENGTH = 48
HANG_REPORT_S = 10.0  # for a hung CLI to print its stacks after SIGABRT
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Sentences the tests use; every character of them is in the vocabulary.
SENTENCES = [
    "今天天气真好", "今日阳光明媚", "我想订一张去北京的机票", "帮我买一张到北京的飞机票",
    "这家餐厅的菜很好吃", "股票市场今天大跌", "hello world", "the quick brown fox",
]


def _vocab() -> list[str]:
    chars = {ch for s in SENTENCES for ch in s if not ch.isspace()}
    # A broad block of common CJK ideographs, ASCII letters and digits.
    chars |= {chr(cp) for cp in range(0x4E00, 0x4E00 + 1500)}
    chars |= set("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
    words = ["hello", "world", "the", "quick", "brown", "fox"]
    return SPECIAL + sorted(chars) + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def make_tiny_bert(directory: Path, seed: int, unknown_to_model: Sequence[str] = (),
                   hidden_size: int = 32) -> Path:
    """A 2-layer BERT with random weights and a vocab covering Chinese characters.

    Tokens in `unknown_to_model` are in the tokenizer's vocab but beyond the model's
    embedding table, as with a tokenizer shipped for another model: a text holding one makes
    the forward pass fail."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join([*_vocab(), *unknown_to_model]) + "\n", encoding="utf-8")
    # transformers 5 takes `vocab`, 4.x `vocab_file`.
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters \
        else "vocab_file"
    tokenizer = BertTokenizerFast(**{key: str(vocab_file)}, model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size - len(unknown_to_model), hidden_size=hidden_size,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=TINY_MAX_LENGTH,
        # Wide initial weights spread the scores, so versions and sentences differ clearly.
        initializer_range=1.0,
    )
    BertModel(config).eval().save_pretrained(directory)
    return directory


class Reference:
    """The seed's computation, in process: one pair per forward pass, padding + truncation."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def similarity(self, a: str, b: str) -> float:
        emb = self.embed([a, b])
        return float((emb[0] * emb[1]).sum())


def run_cli(*args: str, env: dict[str, str], timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """`pool ARGS...` as a user runs it. One still running after `timeout` fails the test with
    where it was: faulthandler (on in the child) prints every thread's stack on SIGABRT."""
    argv = [sys.executable, "-m", "cli.main", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**env, "PYTHONFAULTHANDLER": "1"}) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            stdout, stderr = proc.communicate(timeout=HANG_REPORT_S)
            raise AssertionError(f"`pool {' '.join(args)}` still running after {timeout}s; "
                                 f"its stacks:\n{stderr[-6000:]}\nits stdout:\n{stdout[-2000:]}"
                                 ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def cli_in_background(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`pool ARGS...` running beside the test (stdout and stderr piped, text); killed and
    reaped on the way out if it is still running."""
    process = subprocess.Popen([sys.executable, "-m", "cli.main", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def short_tmpdir() -> Path:
    # ipc:// paths must stay under ~107 bytes, so not pytest's long tmp_path.
    return Path(tempfile.mkdtemp(prefix="zp-"))


class RunningPool:
    def __init__(self, process: PoolProcess, state_dir: Path, endpoint: str) -> None:
        self.process = process
        self.state_dir = state_dir
        self.endpoint = endpoint

    def status(self) -> dict:
        return control_request(self.state_dir, "status")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def children(self) -> list[psutil.Process]:
        """Every process the server started (workers, multiprocessing's resource tracker)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "ZEROPOOL_STATE_DIR": str(self.state_dir),
                "ZEROPOOL_ENDPOINT": self.endpoint}


def start_pool(path: Path | None, *extra: str, workers: int | None = 2,
               version: str | None = None, state_dir: Path | None = None, wait: bool = True,
               own_group: bool = False, endpoint: str | None = None,
               prefix: tuple[str, ...] = ()) -> RunningPool:
    """`pool serve` on ipc sockets (or `endpoint`); no path means "restore from the
    registry"; `prefix` runs it through a command that execs it (`ip netns exec NS`);
    `workers=None`: workers and threads as the pool sizes them (waits for one worker).

    float32 unless `extra` says otherwise: the tests hold the pool to the seed's scores
    within 1e-4, and `--dtype auto` runs bf16 on CPUs that have it."""
    state_dir = state_dir or short_tmpdir()
    endpoint = endpoint or f"ipc://{state_dir}/front.sock"
    sizes = ["--workers", str(workers), "--threads", "1"] if workers is not None else []
    args = [*sizes, "--bind", endpoint, "--state-dir", str(state_dir), *extra]
    if "--dtype" not in extra:
        args += ["--dtype", "float32"]
    if path is not None:
        args += ["--path", str(path)]
    if version is not None:
        args += ["--version", version]
    process = PoolProcess(args, state_dir / "console.log", own_group=own_group, prefix=prefix)
    pool = RunningPool(process, state_dir, endpoint)
    if wait:
        process.wait_ready(endpoint, workers=workers or 1, timeout=120)
    return pool


def stop_pool(pool: RunningPool) -> int:
    children = pool.children()
    code = pool.process.stop(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"workers outlived the pool: {[p.pid for p in alive]}"
    shutil.rmtree(pool.state_dir, ignore_errors=True)
    return code


def thread_niceness(pid: int) -> dict[int, int]:
    """Each thread of process `pid`: its nice value (per thread on Linux)."""
    return {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in psutil.Process(pid).threads()}


def wait_for(condition: Callable[[], T], timeout: float = 60.0, what: str = "",
             poll: float = 0.2) -> T:
    """Poll `condition` until it returns something true, and return that; AssertionError
    naming `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what or condition}")


# The tests' load is paced: their assertions are about every request (none failed, none
# lost, none answered twice), not throughput, and an unpaced closed loop takes every core from
# the tests running beside it (pytest -n). `max_rate=None` is the closed loop at full speed.
LOAD_RATE = 400.0


class Load(ThreadLoad):
    """The tests' load: up to `in_flight` requests over SENTENCES at `max_rate` per second,
    optionally pinned to a version, every reply recorded (tooling.loadgen.ThreadLoad)."""

    def __init__(self, endpoint: str, in_flight: int = 64, pinned: str = "",
                 max_rate: float | None = LOAD_RATE) -> None:
        super().__init__(endpoint, SENTENCES, in_flight=in_flight, pinned=pinned,
                         max_rate=max_rate)

    def stop(self, timeout: float = 60) -> Load:
        super().stop(timeout)
        # A request answered twice breaks the protocol's promise whatever the test checks.
        assert not self.repeats, f"{len(self.repeats)} replies to requests already answered"
        return self


def labelled_file(path: Path, identical_label: int, distinct_label: int,
                  repeats: int = 1) -> Path:
    """A labelled set of the test sentences: each with itself (score 1) and with the next
    (11 pairs), `repeats` times over."""
    rows = [f"{identical_label}\t{s}\t{s}" for s in SENTENCES[:4]]
    rows += [f"{distinct_label}\t{a}\t{b}" for a, b in itertools.pairwise(SENTENCES)]
    path.write_text("\n".join(rows * repeats) + "\n", encoding="utf-8")
    return path
