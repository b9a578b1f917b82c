"""A real `pool serve` with real ZeroMQ sockets: raw producers, the clients and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
import torch
import zmq
from transformers import AutoModel, AutoTokenizer

from pool.control import control_request
from router.client import (
    AsyncClient,
    BadRequest,
    Client,
    NoReply,
    Similarity,
    TooLarge,
    UnknownVersion,
)
from router.protocol import PROTOCOL
from tests.modelstub import weights_of_another_shape, with_pooling, with_prompts
from tests.support import (
    SENTENCES,
    TINY_MAX_LENGTH,
    Reference,
    RunningPool,
    make_tiny_bert,
    run_cli,
    short_tmpdir,
    start_pool,
    stop_pool,
    thread_niceness,
    wait_for,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def recv_all(sock: zmq.Socket, count: int, timeout_s: float = 60) -> dict[bytes, list[bytes]]:
    replies: dict[bytes, list[bytes]] = {}
    deadline = time.monotonic() + timeout_s
    while len(replies) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and sock.poll(int(remaining * 1000)), \
            f"only {len(replies)} of {count} replies arrived"
        frames = sock.recv_multipart()
        assert frames[1] not in replies, "two replies to one request"
        replies[frames[1]] = frames
    return replies


def test_raw_dealer_200_requests_in_flight_all_scored_correctly(
    pool: RunningPool, reference: dict[str, Reference]
) -> None:
    sock = dealer(pool.endpoint)
    sent: dict[bytes, list[list[str]]] = {}
    for i in range(200):
        pairs = [[SENTENCES[(i + k) % 8], SENTENCES[(i * 3 + k) % 8]] for k in range(1 + i % 4)]
        rid = f"r{i}".encode()
        sent[rid] = pairs
        sock.send_multipart([PROTOCOL, rid, b"similarity", b"", orjson.dumps({"pairs": pairs})])
    replies = recv_all(sock, 200)
    assert set(replies) == set(sent)
    for rid, frames in replies.items():
        tag, _, status, body = frames
        assert (tag, status) == (PROTOCOL, b"ok"), body
        reply = orjson.loads(body)
        assert reply["version"] == "v1"
        assert len(reply["scores"]) == len(sent[rid])
        for (a, b), score in zip(sent[rid], reply["scores"], strict=True):
            assert abs(score - reference["v1"].similarity(a, b)) < TOLERANCE
    sock.close()


def test_bad_bodies_get_bad_request_and_the_pool_keeps_serving(pool: RunningPool) -> None:
    sock = dealer(pool.endpoint)
    bad = [
        [PROTOCOL, b"b1", b"similarity", b"", b"not json"],
        [PROTOCOL, b"b2", b"similarity", b"", b'{"pairs": [["only one"]]}'],
        [PROTOCOL, b"b3", b"similarity", b"", b'{"pairs": []}'],
        [PROTOCOL, b"b4", b"embed", b"", b'{"texts": [42]}'],
        [PROTOCOL, b"b5", b"transmogrify", b"", b"{}"],
        [b"ZP2", b"b6", b"ping", b"", b"{}"],
        [PROTOCOL, b"b7", b"ping", b""],
        [PROTOCOL, b"b8", b"similarity", b"", b'{"pairs": [["a", "b"]], "timeout_ms": -1}'],
    ]
    for frames in bad:
        sock.send_multipart(frames)
    sock.send_multipart([PROTOCOL])  # no request_id: dropped, never answered
    replies = recv_all(sock, len(bad))
    for rid, (_, _, status, body) in replies.items():
        assert status == b"error", rid
        assert orjson.loads(body)["code"] == "bad_request", (rid, body)
        assert orjson.loads(body)["message"]
    assert not sock.poll(300), "a message without request_id must not be answered"
    with Client(pool.endpoint) as client:
        assert client.similarity([("今天天气真好", "今日阳光明媚")]).version == "v1"
    sock.close()


def test_unknown_pinned_version(pool: RunningPool) -> None:
    with Client(pool.endpoint) as client:
        with pytest.raises(UnknownVersion) as exc:
            client.similarity([("a", "b")], version="v9")
        assert exc.value.code == "unknown_version"
        assert client.similarity([("a", "b")], version="v1").version == "v1"


def test_truncate_false_refuses_a_text_over_the_models_limit_and_says_which(
        pool: RunningPool) -> None:
    long_text = "今天天气真好" * 10  # 60 characters, a token each: 62 with [CLS] and [SEP]
    at_limit = long_text[:TINY_MAX_LENGTH - 2]
    with Client(pool.endpoint) as client:
        assert len(client.embed(["好", long_text]).embeddings) == 2  # the default: cut to fit
        with pytest.raises(TooLarge) as exc:
            client.embed(["好", long_text], truncate=False)
        assert exc.value.at == ("texts", 1)
        assert exc.value.message.startswith("texts[1] has 62 tokens, over version v1's input "
                                            f"limit of {TINY_MAX_LENGTH}")
        with pytest.raises(TooLarge) as exc:
            client.similarity([("好", "好"), ("好", long_text)], truncate=False)
        assert exc.value.at == ("pairs", 1, 1)
        assert exc.value.message.startswith("pairs[1][1] has 62 tokens")
        # At the limit exactly, nothing is cut: served, the same vectors as by default.
        whole = client.embed([at_limit], truncate=False)
        assert whole.embeddings == client.embed([at_limit]).embeddings
    refused = run_cli("embed", "好", long_text, "--no-truncate", "--json", env=pool.env)
    assert refused.returncode == 1, refused.stdout
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "too_large" and error["message"].startswith("texts[1] has 62")
    assert error["at"] == ["texts", 1]


def test_req_socket_works(pool: RunningPool) -> None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.endpoint)
    sock.send_multipart([PROTOCOL, b"q", b"ping", b"", b"{}"])
    assert sock.poll(10_000)
    tag, rid, status, body = sock.recv_multipart()
    assert (tag, rid, status) == (PROTOCOL, b"q", b"ok")
    assert orjson.loads(body) == {"version": "v1", "workers": 2, "versions": {"v1": 2}}
    sock.close()


def test_embed_returns_normalised_vectors(pool: RunningPool, reference: dict[str, Reference]
                                          ) -> None:
    with Client(pool.endpoint) as client:
        result = client.embed(["今天天气真好", "hello world"])
    assert result.dim == 32 and len(result.embeddings) == 2
    want = reference["v1"].embed(["今天天气真好"])[0].tolist()
    assert max(abs(a - b) for a, b in zip(result.embeddings[0], want, strict=True)) < TOLERANCE


def test_blocking_client_pipelines_and_reports_errors_in_place(pool: RunningPool) -> None:
    with Client(pool.endpoint) as client:
        batches = [[("今天天气真好", "今日阳光明媚")]] * 100 + [[]]
        results = client.similarity_many(batches, in_flight=32)
    assert all(isinstance(r, Similarity) for r in results[:100])
    assert isinstance(results[100], BadRequest)


def test_async_client_many_in_flight(pool: RunningPool, reference: dict[str, Reference]) -> None:
    async def run() -> list[Similarity]:
        async with AsyncClient(pool.endpoint) as client:
            return await asyncio.gather(*[
                client.similarity([(SENTENCES[i % 8], SENTENCES[(i + 1) % 8])])
                for i in range(150)
            ])

    results = asyncio.run(run())
    for i, result in enumerate(results):
        want = reference["v1"].similarity(SENTENCES[i % 8], SENTENCES[(i + 1) % 8])
        assert abs(result.scores[0] - want) < TOLERANCE


def test_cli_similarity_embed_ping_status(pool: RunningPool) -> None:
    done = run_cli("similarity", "今天天气真好", "今日阳光明媚", "--json", env=pool.env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["version"] == "v1" and -1 <= reply["score"] <= 1
    assert reply["verdict"] in ("very similar", "related", "unrelated")

    human = run_cli("similarity", "今天天气真好", "今日阳光明媚", env=pool.env)
    assert human.returncode == 0 and f"{reply['score']:.4f}" in human.stdout

    embedded = json.loads(run_cli("embed", "a", "b", "--json", env=pool.env).stdout)
    assert embedded["dim"] == 32 and len(embedded["embeddings"]) == 2

    assert json.loads(run_cli("ping", "--json", env=pool.env).stdout)["workers"] == 2

    status = json.loads(run_cli("status", "--json", env=pool.env).stdout)
    assert status["active"] == "v1"
    assert len(status["workers"]) == 2
    assert {w["state"] for w in status["workers"]} == {"ready"}
    assert {(w["dtype"], w["graph"]) for w in status["workers"]} == {("float32", "traced")}
    assert sum(w["served"] for w in status["workers"]) > 0

    missing = run_cli("similarity", "a", "b", "--version", "nope", "--json", env=pool.env)
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"]["code"] == "unknown_version"


def test_documented_raw_producer_runs(pool: RunningPool) -> None:
    example = ROOT / "docs" / "examples" / "raw_producer.py"
    assert example.read_text() in (ROOT / "docs" / "protocol.md").read_text()
    done = subprocess.run([sys.executable, str(example), pool.endpoint, "50"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == 50


def test_killed_worker_loses_no_request_and_is_respawned(models: dict[str, Path]) -> None:
    running = start_pool(models["v1"])
    try:
        victim = running.worker_pids()[0]
        sock = dealer(running.endpoint)
        pairs = [["今天天气真好" * 5, "今日阳光明媚" * 5]] * 16
        for i in range(300):
            sock.send_multipart([PROTOCOL, b"%d" % i, b"similarity", b"",
                                 orjson.dumps({"pairs": pairs})])
            if i == 100:
                os.kill(victim, signal.SIGKILL)
        replies = recv_all(sock, 300, timeout_s=120)
        statuses = {frames[2] for frames in replies.values()}
        assert statuses == {b"ok"}, [f[3] for f in replies.values() if f[2] != b"ok"][:3]
        running.process.wait_ready(running.endpoint, workers=2, timeout=60)
        assert victim not in running.worker_pids()
        assert len(running.worker_pids()) == 2
        sock.close()
    finally:
        assert stop_pool(running) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_cleanly_and_reaps_every_worker(models: dict[str, Path],
                                                            signum: int) -> None:
    running = start_pool(models["v1"])
    workers = [psutil.Process(pid) for pid in running.worker_pids()]
    assert len(workers) == 2
    sock = dealer(running.endpoint)
    for i in range(50):
        sock.send_multipart([PROTOCOL, b"%d" % i, b"similarity", b"",
                             orjson.dumps({"pairs": [["今天天气真好", "今日阳光明媚"]] * 8})])
    time.sleep(0.05)
    running.process.proc.send_signal(signum)
    replies = recv_all(sock, 50)
    codes = {f[2] if f[2] == b"ok" else orjson.loads(f[3])["code"] for f in replies.values()}
    assert codes <= {b"ok", "shutting_down"}
    assert running.process.proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert not (running.state_dir / "control.sock").exists()
    assert orjson.loads((running.state_dir / "versions.json").read_bytes())["active"] == "v1"
    sock.close()
    stop_pool(running)


def test_a_bfloat16_pool_says_so_and_scores_within_the_low_precision_bound(
        models: dict[str, Path], reference: dict[str, Reference]) -> None:
    running = start_pool(models["v1"], "--dtype", "bfloat16", workers=1)
    try:
        status = running.status()
        assert [w["dtype"] for w in status["workers"]] == ["bfloat16"]
        assert status["settings"]["dtype"] == "bfloat16"
        human = run_cli("status", env=running.env)
        assert "bfloat16" in human.stdout
        pairs = [(SENTENCES[i], SENTENCES[i + 1]) for i in range(len(SENTENCES) - 1)]
        with Client(running.endpoint) as client:
            scores = client.similarity(pairs).scores
        drift = max(abs(got - reference["v1"].similarity(a, b))
                    for (a, b), got in zip(pairs, scores, strict=True))
        assert 0 < drift < 0.1  # the tiny model's wide weights: 3e-2 (test_runtime)
    finally:
        stop_pool(running)


def test_a_cls_pooled_model_is_served_as_its_config_says_and_status_shows_it(
        models: dict[str, Path], tmp_path: Path) -> None:
    # As BAAI's bge models are: sentence-transformers' Pooling module with its CLS token.
    model = with_pooling(models["v1"], tmp_path / "cls", "cls_token")
    tokenizer, bert = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model)
    with torch.inference_mode():
        cls = bert(**tokenizer(["今天天气真好"], return_tensors="pt")).last_hidden_state[0, 0]
    want = torch.nn.functional.normalize(cls, dim=0).tolist()
    running = start_pool(model, workers=1)
    try:
        assert [w["pooling"] for w in running.status()["workers"]] == ["cls"]
        assert "float32 traced cls" in run_cli("status", env=running.env).stdout
        with Client(running.endpoint) as client:
            got = client.embed(["今天天气真好", "hello"]).embeddings[0]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE
    finally:
        stop_pool(running)


def test_a_models_prompts_go_before_its_texts_the_default_unless_one_is_named(
        models: dict[str, Path], tmp_path: Path) -> None:
    # As e5's sentence-transformers release declares them (config_sentence_transformers.json).
    model = with_prompts(models["v1"], tmp_path / "e5like",
                         {"query": "query: ", "passage": "passage: "}, default="query")
    seed = Reference(model)
    a, b = SENTENCES[0], SENTENCES[1]
    running = start_pool(model, workers=1)
    try:
        with Client(running.endpoint) as client:
            default = client.similarity([(a, b)]).scores[0]
            passage = client.similarity([(a, b)], prompt_name="passage").scores[0]
            with pytest.raises(BadRequest) as exc:
                client.embed([a], prompt_name="document")
        assert [w["prompt"] for w in running.status()["workers"]] == ["query"]
        assert "traced mean prompt query" in run_cli("status", env=running.env).stdout
        assert abs(default - seed.similarity("query: " + a, "query: " + b)) < TOLERANCE
        assert abs(passage - seed.similarity("passage: " + a, "passage: " + b)) < TOLERANCE
        assert abs(default - seed.similarity(a, b)) > TOLERANCE  # the prompt counts
        assert exc.value.at == ("prompt_name",)
        assert "not one of this version's prompts (query, passage)" in str(exc.value)
        shown = run_cli("similarity", a, b, "--prompt-name", "passage", "--json",
                        env=running.env)
        assert shown.returncode == 0, shown.stderr
        assert abs(json.loads(shown.stdout)["score"] - passage) < 1e-6
    finally:
        stop_pool(running)


def test_a_token_budget_keeps_every_pass_under_it_and_scores_unchanged(
        models: dict[str, Path], reference: dict[str, Reference]) -> None:
    from transformers import AutoTokenizer

    from pool.reports import BATCH_SIZE_BUCKETS

    budget = 60
    tokenizer = AutoTokenizer.from_pretrained(models["v1"])
    pairs = [(SENTENCES[i % 8], SENTENCES[(i * 3 + 1) % 8]) for i in range(80)]
    tokens = sorted(len(tokenizer(a)["input_ids"]) + len(tokenizer(b)["input_ids"])
                    for a, b in pairs)
    most = max(k for k in range(1, len(tokens) + 1) if sum(tokens[:k]) <= budget)
    running = start_pool(models["v1"], "--max-batch-tokens", str(budget), "--max-wait-ms",
                         "20", workers=1)
    try:
        status = running.status()
        assert status["settings"]["max_batch_tokens"] == budget
        time.sleep(1.2)  # the health probe (one request over the budget: it ran alone) is
        before = running.status()["workers"][0]["batching"]["batch_size_counts"]  # counted
        sock = dealer(running.endpoint)
        for i, pair in enumerate(pairs):
            sock.send_multipart([PROTOCOL, b"%d" % i, b"similarity", b"",
                                 orjson.dumps({"pairs": [list(pair)]})])
        replies = recv_all(sock, len(pairs))
        sock.close()
        for i, (a, b) in enumerate(pairs):
            frames = replies[b"%d" % i]
            assert frames[2] == b"ok"
            score = orjson.loads(frames[3])["scores"][0]
            assert score == pytest.approx(reference["v1"].similarity(a, b), abs=1e-4)
        time.sleep(1.5)  # a heartbeat carries the batch sizes
        after = running.status()["workers"][0]["batching"]["batch_size_counts"]
        counts = [b - a for a, b in zip(before, after, strict=True)]
        lowest = [1] + [bound + 1 for bound in BATCH_SIZE_BUCKETS]  # of each bucket
        over = [n for low, n in zip(lowest, counts, strict=True) if low > most and n]
        assert sum(counts) > 0 and not over, f"passes over the budget: {counts}"
    finally:
        stop_pool(running)


def test_serve_refuses_an_unknown_dtype(models: dict[str, Path], tmp_path: Path) -> None:
    done = run_cli("serve", "--path", str(models["v1"]), "--dtype", "int4",
                   "--state-dir", str(tmp_path), env=dict(os.environ), timeout=60)
    assert done.returncode == 2
    assert "--dtype must be one of auto, float16" in done.stderr


def test_serve_refuses_a_path_that_is_not_a_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--path", str(tmp_path), "--state-dir",
         str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not a transformers model directory" in done.stderr


def test_serve_refuses_weights_that_are_not_weights_naming_the_file(models: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["v1"], broken)
    (broken / "model.safetensors").write_bytes(b"garbage" * 100)
    done = run_cli("serve", "--path", str(broken), "--state-dir", str(tmp_path / "state"),
                   "--json", env=dict(os.environ), timeout=60)
    assert done.returncode == 2, done.stdout
    message = json.loads(done.stdout)["error"]["message"]
    assert f"{broken / 'model.safetensors'} is not a safetensors file" in message


def test_serve_exits_with_the_reason_when_weights_do_not_load(models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    broken = weights_of_another_shape(models["v1"], tmp_path / "broken")
    running = start_pool(broken, workers=1, wait=False)
    assert running.process.proc.wait(120) == 1
    log = running.process.log_tail(200)
    assert "cannot serve" in log and "exit" in log
    stop_pool(running)
    # A script asking for --json gets the reason on stdout, as from any other command.
    done = run_cli("serve", "--path", str(broken), "--workers", "1", "--state-dir",
                   str(tmp_path / "state"), "--bind", f"ipc://{short_tmpdir()}/fe", "--json",
                   env=dict(os.environ), timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "version_failed"
    assert error["message"].startswith("version v1 cannot serve: ") and \
        "ModelWeightsError: the weights do not fit config.json" in error["message"]


def test_second_pool_on_the_same_state_dir_is_refused(pool: RunningPool,
                                                      models: dict[str, Path]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--path", str(models["v1"]),
         "--state-dir", str(pool.state_dir), "--bind", "ipc:///tmp/zp-unused.sock"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "already serving" in done.stderr


def test_a_request_the_model_cannot_take_fails_alone_not_the_batch_it_shares(
    pool_factory,
) -> None:
    poison = "毒"
    path = make_tiny_bert(short_tmpdir() / "mismatched", seed=3, unknown_to_model=[poison])
    pool = pool_factory(path, workers=1)
    worker = pool.worker_pids()
    sock = dealer(pool.endpoint)
    good = orjson.dumps({"pairs": [["今天天气真好", "今日阳光明媚"]]})
    # One burst: the worker gathers the poisoned request into a batch with good ones.
    for i in range(40):
        sock.send_multipart([PROTOCOL, b"good%d" % i, b"similarity", b"", good])
    sock.send_multipart([PROTOCOL, b"bad", b"similarity", b"",
                         orjson.dumps({"pairs": [["今天" + poison, "今日阳光明媚"]]})])
    for i in range(40, 80):
        sock.send_multipart([PROTOCOL, b"good%d" % i, b"similarity", b"", good])
    replies = recv_all(sock, 81)
    bad = replies.pop(b"bad")
    assert bad[2] == b"error", bad
    error = orjson.loads(bad[3])
    assert error["code"] == "internal" and "no embedding for" in error["message"]
    assert {f[2] for f in replies.values()} == {b"ok"}, "a good request failed with the bad one"
    assert pool.worker_pids() == worker, "the worker must live on"
    with Client(pool.endpoint) as client:
        assert client.similarity([("今天天气真好", "今日阳光明媚")]).version == "v1"
    sock.close()


def test_workers_serve_at_the_priority_of_the_server(pool: RunningPool) -> None:
    # They load their model on a thread niced by --load-niceness; serving must not inherit it.
    server = psutil.Process(pool.process.pid).nice()
    assert [psutil.Process(pid).nice() for pid in pool.worker_pids()] == [server, server]


def test_requests_in_flight_share_forward_passes_and_texts_are_deduplicated(
    pool: RunningPool
) -> None:
    def totals() -> dict[str, int]:
        rows = [w["batching"] for w in pool.status()["workers"]]
        return {k: sum(r.get(k, 0) for r in rows) for k in ("batches", "requests", "texts",
                                                             "unique_texts")}

    def golden_checked_at() -> float:
        return control_request(pool.state_dir, "health")["versions"]["v1"]["golden"]["at"]

    def counted_while_300_requests_run() -> dict[str, int]:
        time.sleep(1.2)  # a heartbeat carries the counters so far
        before = totals()
        sock = dealer(pool.endpoint)
        for i in range(300):  # 8 sentences: the same texts recur across requests
            pair = [SENTENCES[i % 8], SENTENCES[(i // 8) % 8]]
            body = orjson.dumps({"pairs": [pair]})
            sock.send_multipart([PROTOCOL, b"%d" % i, b"similarity", b"", body])
        replies = recv_all(sock, 300)
        assert {f[2] for f in replies.values()} == {b"ok"}
        sock.close()
        time.sleep(1.5)
        after = totals()
        return {k: after[k] - before[k] for k in after}

    # The golden re-check (a real request, every GOLDEN_RECHECK_S) is counted too: a window
    # it fell into is measured again (the next one is a minute away).
    checked = golden_checked_at()
    delta = counted_while_300_requests_run()
    if golden_checked_at() != checked:
        delta = counted_while_300_requests_run()
    assert delta["requests"] == 300 and delta["texts"] == 600
    assert delta["batches"] < 150, f"{delta['batches']} forward passes for 300 requests"
    assert delta["unique_texts"] < delta["texts"] / 2, delta


def test_a_full_queue_answers_overloaded_at_once(models: dict[str, Path]) -> None:
    # 2 workers x 2 requests of credit (max-batch 1) and 4 queue slots: a burst overflows.
    running = start_pool(models["v1"], "--max-batch", "1", "--max-queue", "4")
    try:
        sock = dealer(running.endpoint)
        for i in range(200):
            sock.send_multipart([PROTOCOL, b"%d" % i, b"similarity", b"",
                                 orjson.dumps({"pairs": [["今天天气真好" * 8, "今日阳光明媚"]]})])
        replies = recv_all(sock, 200)
        outcomes = [f[2] if f[2] == b"ok" else orjson.loads(f[3])["code"]
                    for f in replies.values()]
        assert outcomes.count(b"ok") >= 8
        assert outcomes.count("overloaded") > 100
        assert set(outcomes) == {b"ok", "overloaded"}
        with Client(running.endpoint) as client:  # and it serves normally right after
            assert client.similarity([("a", "b")]).version == "v1"
        sock.close()
    finally:
        assert stop_pool(running) == 0


def test_timeout_ms_is_answered_at_the_deadline_while_the_request_waits_for_a_worker(
    pool_factory, models: dict[str, Path]
) -> None:
    # One worker with 2 requests of credit (max-batch 1), frozen: what comes after waits in
    # the router's queue, and only the router can answer it.
    running = pool_factory(models["v1"], "--max-batch", "1", workers=1)
    worker = running.worker_pids()[0]
    sock = dealer(running.endpoint)
    body = {"pairs": [["今天天气真好", "今日阳光明媚"]]}
    os.kill(worker, signal.SIGSTOP)
    try:
        for i in range(2):
            sock.send_multipart([PROTOCOL, b"held%d" % i, b"similarity", b"", orjson.dumps(body)])
        sent = time.monotonic()
        sock.send_multipart([PROTOCOL, b"late", b"similarity", b"",
                             orjson.dumps({**body, "timeout_ms": 300})])
        sock.send_multipart([PROTOCOL, b"patient", b"similarity", b"",
                             orjson.dumps({**body, "timeout_ms": 600_000})])
        late = recv_all(sock, 1, timeout_s=20)[b"late"]
        waited = time.monotonic() - sent
        assert psutil.Process(worker).status() == psutil.STATUS_STOPPED  # not the worker
        assert late[2] == b"error"
        error = orjson.loads(late[3])
        assert error["code"] == "timeout" and "timeout_ms=300" in error["message"]
        assert waited >= 0.3
    finally:
        os.kill(worker, signal.SIGCONT)
    # Nothing else was given up: the held requests and the patient one are scored.
    rest = recv_all(sock, 3)
    assert {f[2] for f in rest.values()} == {b"ok"}, rest
    sock.close()


def test_serve_reports_an_endpoint_it_cannot_bind(pool: RunningPool, models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--path", str(models["v1"]),
         "--state-dir", str(tmp_path / "s"), "--bind", pool.endpoint],  # taken by `pool`
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot listen on" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s" / "serve.pid").exists()


def test_one_client_spreads_over_two_pools_and_skips_one_that_stops(
        models: dict[str, Path]) -> None:
    pool_a = start_pool(models["v1"], workers=1, version="a")
    pool_b = start_pool(models["v2"], workers=1, version="b")
    try:
        with Client([pool_a.endpoint, pool_b.endpoint], timeout=30) as client:
            # Both serve, once both are connected (the second may connect a moment later).
            wait_for(lambda: {client.similarity([("今天天气真好", "今日阳光明媚")]).version
                              for _ in range(4)} == {"a", "b"},
                     timeout=10, what="both pools serving", poll=0.05)
            assert stop_pool(pool_b) == 0
            after = [client.similarity([("今天天气真好", "今日阳光明媚")]).version
                     for _ in range(20)]
            assert after == ["a"] * 20
            assert stop_pool(pool_a) == 0
            with pytest.raises(NoReply):  # nothing connected: a prompt, clear error
                client.ping(timeout=1)
    finally:
        for pool in (pool_a, pool_b):
            if pool.process.proc.poll() is None:
                stop_pool(pool)


def test_tokenizer_threads_are_the_workers_own_rayon_pool(
    pool_factory, models: dict[str, Path]
) -> None:
    """--tokenizer-threads N: the Rust tokenizer of each worker tokenises on N threads of its
    own (a GPU worker's default); 1 (a CPU worker's default) starts none. They serve at the
    normal priority: not the load niceness of the thread that loaded the model."""
    threads = {}
    for count in (1, 3):
        pool = pool_factory(models["v1"], "--tokenizer-threads", str(count), workers=1)
        with Client(pool.endpoint, timeout=30) as client:
            for _ in range(3):  # batches of many texts: the tokenizer goes parallel
                assert len(client.embed(SENTENCES * 4).embeddings) == len(SENTENCES) * 4
        (pid,) = pool.worker_pids()
        threads[count] = psutil.Process(pid).num_threads()
        niceness = thread_niceness(pid)
        assert set(niceness.values()) == {0}, niceness
        assert pool.status()["settings"]["tokenizer_threads"] == count
        stop_pool(pool)
    assert threads[3] >= threads[1] + 3, threads
