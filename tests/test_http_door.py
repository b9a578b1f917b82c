"""The HTTP door in-process (Starlette's TestClient, a fake pool on a real socket): version
names beyond Latin-1 in the x-zeropool-version header, and the bounded cache of model names
that are not versions. Fast; the end-to-end door is tests/test_http.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from router import http as door_http
from router.client import BadRequest, Embeddings, TooLarge, UnknownVersion
from router.http import (
    VERSION_HEADER,
    Door,
    HttpError,
    HttpSettings,
    build_app,
    json_response,
    list_names,
    named_as,
    sentence_names,
)
from tests.zp1_peer import ZP1Peer

NAME = "模型v2"  # a valid version name (str.isalnum), not Latin-1
NAME_IN_HEADER = "%E6%A8%A1%E5%9E%8Bv2"


@pytest.mark.parametrize(("version", "header"), [
    ("v2", "v2"),
    ("e5-small_v1.2", "e5-small_v1.2"),  # every character a name may hold, as it is
    ("café", "caf%C3%A9"),
    (NAME, NAME_IN_HEADER),
])
def test_the_version_header_is_ascii_percent_encoded_utf8(version: str, header: str) -> None:
    response = json_response({"version": version}, version)
    assert response.headers[VERSION_HEADER] == header
    assert response.body.decode() == f'{{"version":"{version}"}}'  # the body keeps the name


@pytest.fixture
def door() -> Iterator[tuple[TestClient, ZP1Peer]]:
    with ZP1Peer(name=NAME) as peer, \
            TestClient(build_app(HttpSettings(peer.endpoint, timeout_s=3.0))) as client:
        yield client, peer


def test_a_version_named_beyond_latin1_is_served_not_500(
        door: tuple[TestClient, ZP1Peer]) -> None:
    client, _peer = door
    health = client.get("/health")
    assert health.status_code == 200
    assert health.headers[VERSION_HEADER] == NAME_IN_HEADER
    assert health.json()["version"] == NAME
    embedded = client.post("/v1/embeddings", json={"input": "x"})
    assert embedded.status_code == 200
    assert embedded.json()["model"] == NAME
    assert embedded.headers[VERSION_HEADER] == NAME_IN_HEADER


@pytest.mark.parametrize("sent", [NAME_IN_HEADER.encode(), NAME.encode()],
                         ids=["percent-encoded", "raw-utf8"])
def test_a_strict_pin_header_takes_the_name_percent_encoded_or_raw(
        door: tuple[TestClient, ZP1Peer], sent: bytes) -> None:
    client, peer = door
    response = client.post("/embed", json={"inputs": "x"}, headers={VERSION_HEADER: sent})
    assert response.status_code == 200
    assert peer.received[-1][:2] == (b"embed", NAME.encode())


class NoSuchVersions:
    """A pool where no `model` name is a version: a pinned embed is unknown_version."""

    def __init__(self) -> None:
        self.pinned = 0
        self.deadlines: set[int | None] = set()

    async def embed(self, texts: list[str], version: str | None = None,
                    timeout_ms: int | None = None, truncate: bool = True,
                    prompt_name: str | None = None) -> Embeddings:
        self.deadlines.add(timeout_ms)
        if version:
            self.pinned += 1
            raise UnknownVersion(f"version {version!r} is not serving")
        return Embeddings([[1.0]], 1, "v1")


class FakeTime:
    now = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


def test_names_known_not_to_be_versions_are_remembered_a_while_and_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(door_http, "time", FakeTime)
    pool = NoSuchVersions()
    door = Door(HttpSettings("tcp://unused:1"), client=pool)  # type: ignore[arg-type]

    async def ask(*names: str) -> None:
        for name in names:
            await door.embed(["x"], name, None)

    asyncio.run(ask("text-embedding-3-small", "text-embedding-3-small"))
    assert pool.pinned == 1  # the second cost one round trip, not two
    FakeTime.now = door_http.NOT_A_VERSION_TTL_S + 1
    asyncio.run(ask("other"))
    assert list(door.not_versions) == ["other"]  # the expired name dropped on insert
    asyncio.run(ask(*(f"name-{i}" for i in range(3000))))  # a caller inventing names
    assert len(door.not_versions) < 3000
    assert len(door.not_versions) == door_http.NOT_A_VERSION_MAX
    assert "name-2999" in door.not_versions and "other" not in door.not_versions
    # Every request carries the door's --timeout as its deadline: the pool drops what the
    # caller has stopped waiting for.
    assert pool.deadlines == {int(door_http.DEFAULT_TIMEOUT_S * 1000)}


@pytest.mark.parametrize(("error", "names", "status", "message"), [
    (TooLarge("texts[3] has 12000 characters, over ...", None, ("texts", 3)),
     list_names("input", False), 413, "input[3] has 12000 characters, over ..."),
    (TooLarge("texts[0] has 12000 characters", None, ("texts", 0)),
     list_names("input", True), 413, "input has 12000 characters"),
    (TooLarge("texts holds 1025 items, over ...", None, ("texts",)),
     list_names("inputs", False), 413, "inputs holds 1025 items, over ..."),
    (TooLarge("pairs[2][0] has 60 tokens", None, ("pairs", 2, 0)), sentence_names(False), 413,
     "inputs.source_sentence has 60 tokens"),
    (TooLarge("pairs[2][1] has 60 tokens", None, ("pairs", 2, 1)), sentence_names(False), 413,
     "inputs.sentences[2] has 60 tokens"),
    (TooLarge("pairs[0][1] has 60 tokens", None, ("pairs", 0, 1)), sentence_names(True), 413,
     "inputs.sentences has 60 tokens"),  # sent as one string
    # No place, or one the route has no name for: the pool's message as it is.
    (BadRequest("body must be a JSON object"), sentence_names(False), 400,
     "body must be a JSON object"),
    (BadRequest("truncate must be true or false", None, ("truncate",)),
     list_names("input", False), 400, "truncate must be true or false"),
])
def test_the_pools_item_errors_name_the_item_as_the_caller_sent_it(
        error: Exception, names: door_http.Names, status: int, message: str) -> None:
    with pytest.raises(HttpError) as raised, named_as(names):
        raise error
    assert (raised.value.status, raised.value.message) == (status, message)
