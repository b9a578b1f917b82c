"""`pool http` end to end: a real pool, a real `pool http` process, real HTTP clients (the
official openai package, LangChain, httpx)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.client import Client, Embeddings, decode_reply
from router.http import STATUS_BY_CODE, load_tokens, status_for
from tests.support import (
    SENTENCES,
    Reference,
    RunningPool,
    free_port,
    run_cli,
    short_tmpdir,
    wait_for,
)

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"
TOLERANCE = 1e-5
SMALL_BODY_LIMIT = 4096  # the door under test refuses bodies past this, cheaply provoked
SMALL_HEADER_LIMIT = 8192  # and request heads (line + headers) past this
BODY_TIMEOUT_S = 2.0  # and gives up on a body that stops arriving this soon



class Door:
    """A `pool http` subprocess on a free loopback port."""

    def __init__(self, endpoint: str, *extra: str, token: str | None = TOKEN,
                 verify: Path | bool = False, healthy: bool = True) -> None:
        self.healthy = healthy  # wait for /health to say so, else for any answer
        self.port = free_port()
        self.verify = verify  # with --tls-cert: the certificate to trust
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        args = ["--endpoint", endpoint, "--port", str(self.port), *extra]
        if token is not None:
            token_file = short_tmpdir() / "tokens"
            token_file.write_text(f"# tokens\nother-token\n{token}\n")
            args += ["--token-file", str(token_file)]
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "http", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(self._up, timeout=60, what="pool http to listen")
        except BaseException:
            self.proc.kill()  # a door that never came up must not outlive the test
            self.proc.wait()
            raise

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.proc.communicate()
        try:
            status = httpx.get(f"{self.url}/health", timeout=5,
                               verify=self._ssl_context()).status_code
            return status == 200 or not self.healthy
        except httpx.TransportError:
            return False

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self.verify:
            return True
        return ssl.create_default_context(cafile=str(self.verify))

    def stop(self) -> str:
        """Its log (stderr), once it has exited."""
        self.proc.terminate()
        _out, errors = self.proc.communicate(timeout=30)
        assert "Traceback" not in errors, errors
        return errors


@pytest.fixture(scope="module")
def door(pool: RunningPool) -> Iterator[Door]:
    running = Door(pool.endpoint, "--max-body-bytes", str(SMALL_BODY_LIMIT), "--body-timeout",
                   str(BODY_TIMEOUT_S), "--max-header-bytes", str(SMALL_HEADER_LIMIT))
    yield running
    running.stop()


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE


def test_openai_sdk_gets_the_pools_vectors_float_and_base64(
    door: Door, pool: RunningPool, reference: dict[str, Reference]
) -> None:
    from openai import OpenAI

    texts = SENTENCES[:4]
    with Client(pool.endpoint) as client:
        want = client.embed(texts)
    assert want.tokens is not None and all(n > 2 for n in want.tokens)  # [CLS] x [SEP]
    sdk = OpenAI(base_url=f"{door.url}/v1", api_key=TOKEN)
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    for options in ({}, {"encoding_format": "float"}):
        got = sdk.embeddings.create(model="default", input=texts, **options)
        assert got.model == "v1"
        assert [d.index for d in got.data] == [0, 1, 2, 3]
        assert_close([d.embedding for d in got.data], want.embeddings)
        assert got.usage.prompt_tokens == got.usage.total_tokens == sum(want.tokens)
    pinned = sdk.embeddings.create(model="v1", input="hello world")
    # usage counts what the model read: special tokens included.
    expected = len(reference["v1"].tokenizer("hello world")["input_ids"])
    assert pinned.model == "v1" and pinned.usage.prompt_tokens == expected
    # A name that is not a version (a tool's hard-coded default) means "whatever serves now".
    other = sdk.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert_close([other.data[0].embedding], [pinned.data[0].embedding])


def test_base64_is_little_endian_float32(door: Door, pool: RunningPool) -> None:
    reply = httpx.post(f"{door.url}/v1/embeddings", headers=auth(), json={
        "input": "hello world", "encoding_format": "base64"}).json()
    raw = base64.b64decode(reply["data"][0]["embedding"])
    vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    with Client(pool.endpoint) as client:
        assert_close([vector], client.embed(["hello world"]).embeddings)


def test_langchain_openai_embeddings(door: Door, pool: RunningPool) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    embedder = langchain_openai.OpenAIEmbeddings(
        base_url=f"{door.url}/v1", api_key=TOKEN, model="default",
        check_embedding_ctx_length=False)
    texts = SENTENCES[:3]
    with Client(pool.endpoint) as client:
        want = client.embed(texts).embeddings
    assert_close(embedder.embed_documents(texts), want)
    assert_close([embedder.embed_query(texts[0])], want[:1])


def test_tei_embed_similarity_models_and_health_shapes(door: Door, pool: RunningPool) -> None:
    with Client(pool.endpoint) as client:
        want = client.embed(SENTENCES[:2]).embeddings
        scores = client.similarity([(SENTENCES[0], s) for s in SENTENCES[1:3]]).scores
    embedded = httpx.post(f"{door.url}/embed", headers=auth(),
                          json={"inputs": SENTENCES[:2], "normalize": True})
    assert embedded.status_code == 200 and embedded.headers["x-zeropool-version"] == "v1"
    assert_close(embedded.json(), want)
    one = httpx.post(f"{door.url}/embed", headers=auth(), json={"inputs": SENTENCES[0]})
    assert_close(one.json(), want[:1])  # a single string still gets a list of vectors
    similar = httpx.post(f"{door.url}/similarity", headers=auth(), json={"inputs": {
        "source_sentence": SENTENCES[0], "sentences": SENTENCES[1:3]}})
    assert similar.status_code == 200 and similar.headers["x-zeropool-version"] == "v1"
    assert max(abs(a - b) for a, b in zip(similar.json(), scores, strict=True)) < TOLERANCE
    models = httpx.get(f"{door.url}/v1/models", headers=auth()).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["v1"]
    health = httpx.get(f"{door.url}/health")  # no token: probes carry none
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": "v1", "workers": 2}


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"},
                                     {"authorization": f"Basic {TOKEN}"}])
def test_missing_or_wrong_token_is_401(door: Door, headers: dict[str, str]) -> None:
    for path in ("/v1/embeddings", "/embed", "/similarity"):
        response = httpx.post(f"{door.url}{path}", headers=headers, json={"input": "x"})
        assert_error(response, 401, "invalid_api_key")
    assert_error(httpx.get(f"{door.url}/v1/models", headers=headers), 401, "invalid_api_key")


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'{"input": []}', b'{"input": [1, 2, 3]}', b'{"input": [[1, 2]]}',
    b'{"input": "x", "encoding_format": "int8"}', b'{"input": "x", "dimensions": 7}',
    b'{"input": "x", "model": 3}', b'{"input": ""}', b'{"input": ["a", ""]}',
    b'{"input": "x", "dimensions": true}', b'{"input": "x", "encoding_format": 0}',
    b'{"input": "x", "encoding_format": false}',
])
def test_bad_requests_are_400(door: Door, body: bytes) -> None:
    response = httpx.post(f"{door.url}/v1/embeddings", headers=auth(), content=body)
    assert_error(response, 400, "bad_request")


def test_tei_bad_requests_are_400(door: Door) -> None:
    for path, body in [("/embed", {"inputs": 3}), ("/embed", {"inputs": "x", "normalize": False}),
                       ("/similarity", {"inputs": ["a", "b"]}),
                       ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}),
                       ("/similarity", {"inputs": {"source_sentence": "", "sentences": ["b"]}})]:
        assert_error(httpx.post(f"{door.url}{path}", headers=auth(), json=body), 400,
                     "bad_request")
    error = assert_error(httpx.post(f"{door.url}/embed", headers=auth(),
                                    json={"inputs": ["a", 3]}), 400, "bad_request")
    assert error["message"] == "inputs[1] must be a string"


def test_tei_truncate_false_is_413_naming_the_callers_field(door: Door) -> None:
    long_text = "今天天气真好" * 10  # 62 tokens, over the tiny model's 48
    cases = [
        ("/embed", {"inputs": ["好", long_text], "truncate": False}, "inputs[1] has 62 tokens"),
        ("/embed", {"inputs": long_text, "truncate": False}, "inputs has 62 tokens"),
        ("/similarity", {"inputs": {"source_sentence": long_text, "sentences": ["好"]},
                         "parameters": {"truncate": False}}, "inputs.source_sentence has 62"),
        ("/similarity", {"inputs": {"source_sentence": "好", "sentences": ["好", long_text]},
                         "parameters": {"truncate": False}}, "inputs.sentences[1] has 62"),
    ]
    for path, body, begins in cases:
        error = assert_error(httpx.post(f"{door.url}{path}", headers=auth(), json=body), 413,
                             "too_large")
        assert error["message"].startswith(begins), (path, error)
    # Absent (or true), a long text is cut to fit, as TEI's --auto-truncate does.
    assert httpx.post(f"{door.url}/embed", headers=auth(),
                      json={"inputs": long_text}).status_code == 200
    assert httpx.post(f"{door.url}/similarity", headers=auth(), json={
        "inputs": {"source_sentence": long_text, "sentences": ["好"]},
        "parameters": {"truncate": True, "truncation_direction": "Right"}}).status_code == 200
    for path, body in [("/embed", {"inputs": "x", "truncate": "no"}),
                       ("/embed", {"inputs": "x", "truncation_direction": "Left"}),
                       ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]},
                                        "parameters": []})]:
        assert_error(httpx.post(f"{door.url}{path}", headers=auth(), json=body), 400,
                     "bad_request")


def test_tei_prompt_name_reaches_the_pool_which_names_the_models_prompts(door: Door) -> None:
    for path, body in [("/embed", {"inputs": "x", "prompt_name": "query"}),
                       ("/v1/embeddings", {"input": "x", "prompt_name": "query"}),
                       ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]},
                                        "parameters": {"prompt_name": "query"}})]:
        error = assert_error(httpx.post(f"{door.url}{path}", headers=auth(), json=body), 400,
                             "bad_request")
        assert "prompt_name is 'query', not one of this version's prompts (its model " \
               "declares none)" in error["message"], error
    assert_error(httpx.post(f"{door.url}/embed", headers=auth(),
                            json={"inputs": "x", "prompt_name": 7}), 400, "bad_request")


def test_oversized_body_is_413_and_unknown_pinned_version_404(door: Door) -> None:
    big = {"input": ["今天天气真好" * 100] * 10}
    assert_error(httpx.post(f"{door.url}/v1/embeddings", headers=auth(), json=big), 413,
                 "too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"input": ["'
        for _ in range(SMALL_BODY_LIMIT // 100 + 1):
            yield b"a" * 100
        yield b'"]}'

    assert_error(httpx.post(f"{door.url}/v1/embeddings", headers=auth(), content=chunked()),
                 413, "too_large")
    pinned = {**auth(), "x-zeropool-version": "v9"}
    for path, body in [("/v1/embeddings", {"input": "x"}), ("/embed", {"inputs": "x"})]:
        assert_error(httpx.post(f"{door.url}{path}", headers=pinned, json=body), 404,
                     "unknown_version")
    assert_error(httpx.get(f"{door.url}/nowhere"), 404, "not_found")


def test_embed_reply_tokens_are_optional() -> None:
    def reply(body: bytes) -> Embeddings:
        result = decode_reply(b"embed", [b"ZP1", b"r", b"ok", body])
        assert isinstance(result, Embeddings)
        return result

    assert reply(b'{"embeddings": [[1.0]], "dim": 1, "version": "v1"}').tokens is None
    assert reply(b'{"embeddings": [[1.0]], "dim": 1, "version": "v1", "tokens": [4]}'
                 ).tokens == [4]
    assert reply(b'{"embeddings": [[1.0]], "dim": 1, "version": "v1", "tokens": [4, 5]}'
                 ).tokens is None  # not one count per text: ignored


def test_every_protocol_code_has_its_status() -> None:
    assert status_for("overloaded") == 429 and status_for("timeout") == 504
    assert {status_for(c) for c in ("shutting_down", "worker_failed", "no_reply")} == {503}
    assert status_for("something new") == 500
    assert set(STATUS_BY_CODE) >= {"bad_request", "too_large", "unknown_version", "internal"}


def test_overload_is_429_with_retry_after(pool_factory, models: dict[str, Path]) -> None:
    # One worker taking one item per pass, a queue of one: a concurrent burst overflows it.
    small = pool_factory(models["v1"], "--max-queue", "1", "--max-batch", "1", workers=1)
    door = Door(small.endpoint, token=None)
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=door.url, timeout=60) as http:
                bodies = [{"input": [f"{s} {i}" for s in SENTENCES]} for i in range(48)]
                return await asyncio.gather(*(http.post("/v1/embeddings", json=body)
                                              for body in bodies))

        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 429]
        assert refused, [r.status_code for r in responses]
        assert {r.status_code for r in responses} <= {200, 429}
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert_error(refused[0], 429, "overloaded")
    finally:
        door.stop()


def test_health_is_503_when_the_pool_is_gone() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "http", "--endpoint",
                             f"ipc://{short_tmpdir()}/nobody.sock", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def probe() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
            except httpx.TransportError:
                return None

        response = wait_for(probe, timeout=60, what="pool http to listen")
        assert_error(response, 503, "no_reply")
        assert response.headers["retry-after"] == "1"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_refuses_a_public_host_without_tokens() -> None:
    done = run_cli("http", "--host", "0.0.0.0", "--endpoint", "ipc:///tmp/none", "--json",
                   env=dict(os.environ))
    assert done.returncode == 2 and "--token-file" in done.stdout


def test_rotation_under_http_load_fails_nothing(pool_factory, models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"], version="v1")
    door = Door(pool.endpoint)
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []

    async def one_client(index: int) -> None:
        # Keep-alive: one connection per client for the whole run.
        async with httpx.AsyncClient(base_url=door.url, headers=auth(), timeout=60) as http:
            while not stop.is_set():
                response = await http.post("/v1/embeddings", json={
                    "input": [SENTENCES[index % 8], SENTENCES[(index + 3) % 8]]})
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                model = response.json()["model"]
                seen[model] = seen.get(model, 0) + 1
                await asyncio.sleep(0.01)  # paced: the rotation's workers need the cores

    async def load() -> None:
        await asyncio.gather(*(one_client(i) for i in range(8)))

    runner = threading.Thread(target=asyncio.run, args=(load(),))
    runner.start()
    try:
        wait_for(lambda: seen.get("v1", 0) > 20, timeout=60, what="load on v1")
        done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--json",
                       env=pool.env)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: seen.get("v2", 0) > 20, timeout=60, what="load on v2")
    finally:
        stop.set()
        runner.join(timeout=120)
        door.stop()
    assert not failures, failures[:3]
    assert set(seen) == {"v1", "v2"}, seen


def test_the_door_counts_its_answers_for_prometheus(door: Door) -> None:
    httpx.post(f"{door.url}/v1/embeddings", headers=auth(), json={"input": "hello world"})
    httpx.get(f"{door.url}/v1/models")  # no token: 401, counted too
    scraped = httpx.get(f"{door.url}/metrics")
    assert scraped.status_code == 200
    text = scraped.text
    assert 'zeropool_http_requests_total{route="/v1/embeddings",status="200"}' in text
    assert 'zeropool_http_requests_total{route="/v1/models",status="401"}' in text
    assert 'zeropool_http_request_seconds_count{route="/v1/embeddings"}' in text


def raw_exchange(door: Door, chunks: list[bytes]) -> bytes:
    """What the door answers on one connection to `chunks` sent one by one, until it closes."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as conn:
        for chunk in chunks:
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # it answered and closed: read what it said
        reply = b""
        while (data := conn.recv(65536)):
            reply += data
    return reply


def test_a_request_head_past_the_bound_is_431_and_the_door_keeps_serving(door: Door) -> None:
    body = b'{"input": "hello"}'
    ok_head = (f"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
               f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
               "connection: close\r\n").encode()
    many = [b"x-a: " + b"a" * 100 + b"\r\n"] * 100  # complete, ~10 KiB in all
    endless = [b"x-b: ", *[b"b" * 4096] * 8]  # a header value that never ends
    for chunks in ([ok_head, *many, b"\r\n", body], [ok_head + b"".join(many) + b"\r\n" + body],
                   [ok_head, *endless]):
        reply = raw_exchange(door, chunks)
        status_line, _, rest = reply.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", reply[:200]
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "headers_too_large" and "--max-header-bytes" in error["message"]
    # Within the bound, a body sent with its head in one chunk is the body's, not the head's.
    padded = ok_head + b"x-c: " + b"c" * (SMALL_HEADER_LIMIT // 2) + b"\r\n\r\n" + body
    assert raw_exchange(door, [padded]).startswith(b"HTTP/1.1 200")
    assert httpx.post(f"{door.url}/v1/embeddings", headers=auth(),
                      json={"input": "hello"}).status_code == 200


def test_a_431_is_not_logged_as_a_malformed_request(pool: RunningPool) -> None:
    own = Door(pool.endpoint, "--max-header-bytes", "1024")
    try:
        big = (b"GET /health HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 2048 + b"\r\n\r\n")
        assert raw_exchange(own, [big]).startswith(b"HTTP/1.1 431")
        assert raw_exchange(own, [b"NOT HTTP AT ALL\r\n\r\n"]).startswith(b"HTTP/1.1 400")
    finally:
        log = own.stop()
    assert log.count("Invalid HTTP request received") == 1, log  # the garbage's, not the 431's


def test_a_method_or_path_no_route_takes_is_the_callers_error_and_counted(door: Door) -> None:
    wrong = httpx.get(f"{door.url}/v1/embeddings", headers=auth())
    error = assert_error(wrong, 405, "method_not_allowed")
    assert error["type"] == "invalid_request_error" and wrong.headers["allow"] == "POST"
    assert_error(httpx.get(f"{door.url}/nowhere", headers=auth()), 404, "not_found")
    text = httpx.get(f"{door.url}/metrics").text
    assert 'zeropool_http_requests_total{route="unrouted",status="405"}' in text
    assert 'zeropool_http_requests_total{route="unrouted",status="404"}' in text


def test_models_retrieve_names_a_serving_version_or_404s(door: Door) -> None:
    one = httpx.get(f"{door.url}/v1/models/v1", headers=auth())
    assert one.status_code == 200 and one.json()["id"] == "v1", one.text
    assert_error(httpx.get(f"{door.url}/v1/models/v9", headers=auth()), 404,
                 "unknown_version")
    text = httpx.get(f"{door.url}/metrics").text
    assert 'route="/v1/models/{model}",status="404"' in text and "/v1/models/v9" not in text


def test_a_body_that_stops_arriving_is_408_not_held(door: Door) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=BODY_TIMEOUT_S + 10) as conn:
        conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n" + b'{"input"')
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = conn.recv(65536)
            if not part:
                break
            reply += part
    waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"body_timeout"' in reply and BODY_TIMEOUT_S - 0.5 < waited < 10, waited


def test_a_token_file_skips_indented_comments(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret123\n  # old: retired456\n\n")
    assert load_tokens(tokens) == frozenset({"secret123"})


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "door.crt", directory / "door.key"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_door_serves_https_with_the_given_certificate(pool: RunningPool) -> None:
    from openai import DefaultHttpxClient, OpenAI

    cert, key = self_signed(short_tmpdir())
    door = Door(pool.endpoint, "--tls-cert", str(cert), "--tls-key", str(key), verify=cert)
    try:
        client = OpenAI(base_url=f"{door.url}/v1", api_key=TOKEN,
                        http_client=DefaultHttpxClient(verify=door._ssl_context()))
        got = client.embeddings.create(model="default", input=SENTENCES[:2])
        with Client(pool.endpoint) as zmq_client:
            want = zmq_client.embed(SENTENCES[:2]).embeddings
        client.close()
        for row, vector in zip(got.data, want, strict=True):
            assert max(abs(a - b) for a, b in zip(row.embedding, vector, strict=True)) < 1e-6
        # Plain HTTP on the TLS port is refused; so is a client that does not trust the cert.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{door.port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{door.url}/health", timeout=5)
    finally:
        door.stop()
    done = run_cli("http", "--tls-cert", str(cert), "--endpoint", pool.endpoint, "--json",
                   env=pool.env)
    assert done.returncode == 2 and "both --tls-cert and --tls-key" in done.stdout
    done = run_cli("http", "--tls-cert", str(key), "--tls-key", str(key), "--endpoint",
                   pool.endpoint, "--json", env=pool.env)
    assert done.returncode == 2 and "--tls-cert/--tls-key" in done.stdout


def test_the_door_reaches_a_curve_pool_with_its_keys_and_says_when_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from router.keys import create_keys
    from tests.support import start_pool, stop_pool

    keys, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    for name in ("server", "door", "stranger"):
        create_keys(keys, name)
    shutil.copy(keys / "door.key", allow)
    pool = start_pool(models["v1"], "--curve-secret-key", str(keys / "server.key_secret"),
                      "--curve-allow", str(allow), workers=1, wait=False)
    doors = []
    try:
        wait_for(lambda: run_cli("health", "--json", env=pool.env).returncode == 0, 120,
                 "the Curve pool to serve")
        for name in ("door", "stranger"):
            doors.append(Door(pool.endpoint, "--server-key", str(keys / "server.key"),
                              "--client-key", str(keys / f"{name}.key_secret"),
                              healthy=name == "door"))
        allowed, refused = (httpx.Client(base_url=door.url, headers=auth(), timeout=60)
                            for door in doors)
        body = {"model": "default", "input": SENTENCES[0]}
        response = allowed.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) > 0
        response = refused.post("/v1/embeddings", json=body)
        assert response.status_code == 503
        assert "Curve" in response.json()["error"]["message"]
    finally:
        for door in doors:
            door.stop()
        assert stop_pool(pool) == 0
