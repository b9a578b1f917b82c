"""router.client against a fake pool on real sockets (tests/zp1_peer.py): a call's requests
are its own however it ends, an unreadable reply fails only its call, close() ends what
waits, and a slow DNS resolver never holds a call past its deadline. In-process and fast."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from router import protocol
from router.client import (
    AsyncClient,
    BadRequest,
    Client,
    InternalError,
    NoReply,
    Ping,
    Similarity,
    decode_reply,
)
from router.failover import FailoverPolicy
from tests.zp1_peer import ZP1Peer, within

# -- a call's requests are its own ---------------------------------------------------------


@pytest.fixture
def peer() -> Iterator[ZP1Peer]:
    # "second" is answered later than anything else: a stale reply would come first.
    with ZP1Peer(delays={"second": 0.3}) as running:
        yield running


def assert_dispatcher_empty(client: Client) -> None:
    core = client._pools.core
    assert not core.waiting and not core.sent and not core.finished
    assert all(p.in_flight == 0 for p in core.pools.values())


def test_a_body_that_cannot_be_encoded_raises_before_anything_is_sent(peer: ZP1Peer) -> None:
    with Client(peer.endpoint, timeout=3) as client:
        with pytest.raises(BadRequest, match="cannot be sent as JSON"):
            client.similarity_many([[("first", "x")], [(b"bad", "y")]], in_flight=4)  # type: ignore[list-item]
        assert_dispatcher_empty(client)
        result = within(5, lambda: client.similarity([("second", "x")]))
        assert result.version == "second"
    assert peer.texts() == ["second"]  # "first" was never sent


def interrupt_next_wait(client: Client) -> None:
    """The client's next wait for replies raises KeyboardInterrupt (a Ctrl-C mid-call)."""
    real_wait = client._wait

    def interrupted(*args: object) -> None:
        client._wait = real_wait  # type: ignore[method-assign]
        raise KeyboardInterrupt

    client._wait = interrupted  # type: ignore[method-assign]


def test_an_interrupted_call_leaves_nothing_for_the_next_call_to_take(peer: ZP1Peer) -> None:
    with Client(peer.endpoint, timeout=3) as client:
        interrupt_next_wait(client)
        with pytest.raises(KeyboardInterrupt):
            client.similarity([("first", "x")])  # sent, then interrupted
        assert_dispatcher_empty(client)
        # The stale reply to "first" comes before "second"'s: it must not be taken for it.
        result = within(5, lambda: client.similarity([("second", "x")]))
        assert result.version == "second"
        assert_dispatcher_empty(client)


def test_interrupted_pipelined_calls_never_make_a_later_call_hang(peer: ZP1Peer) -> None:
    with Client(peer.endpoint, timeout=3) as client:
        for _ in range(2):
            interrupt_next_wait(client)
            with pytest.raises(KeyboardInterrupt):
                client.similarity_many([[("a", "x")], [("b", "x")], [("c", "x")]], in_flight=4)
        results = within(5, lambda: client.similarity_many(
            [[("second", "x")], [("d", "x")]], timeout=2))
        assert [r.version for r in results] == ["second", "d"]
        assert_dispatcher_empty(client)


# -- unreadable replies ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "body"), [
    (b"ok", b"not json"),
    (b"ok", b"[0.5]"),
    (b"ok", b'"a string"'),
    (b"ok", b'{"scores": [0.5]}'),  # no "version"
    (b"ok", b'{"version": "v1"}'),  # no "scores"
    (b"error", b"<html>502</html>"),
    (b"error", b'{"code": ["overloaded"], "message": "x"}'),
])
def test_an_unreadable_reply_decodes_as_internal_error(status: bytes, body: bytes) -> None:
    result = decode_reply(protocol.OP_SIMILARITY, [protocol.PROTOCOL, b"r1", status, body])
    assert isinstance(result, InternalError)
    assert result.code == protocol.INTERNAL


def garbage_for_bad(op: bytes, text: str) -> tuple[bytes, bytes] | None:
    return (b"ok", b"not json") if text == "bad" else None


def test_the_blocking_client_raises_internal_error_for_an_unreadable_reply() -> None:
    with ZP1Peer(answer=garbage_for_bad) as peer, Client(peer.endpoint, timeout=3) as client:
        with pytest.raises(InternalError, match="unreadable"):
            within(5, lambda: client.similarity([("bad", "x")]))
        assert_dispatcher_empty(client)
        assert client.similarity([("good", "x")]).version == "good"


def test_an_unreadable_reply_fails_its_async_call_only_and_the_reader_goes_on() -> None:
    async def scenario(endpoint: str) -> None:
        client = AsyncClient(endpoint, timeout=2.0)
        bad = asyncio.ensure_future(client.similarity([("bad", "x")]))
        good = asyncio.ensure_future(client.similarity([("good", "x")]))
        with pytest.raises(InternalError, match="unreadable"):
            await asyncio.wait_for(bad, 1.5)  # within its own timeout, not past it
        assert (await asyncio.wait_for(good, 1.5)).version == "good"
        later = await asyncio.wait_for(client.similarity([("later", "x")]), 1.5)
        assert later.version == "later"  # the reader still reads
        assert not any(t.done() for t in client._tasks[endpoint])
        await client.close()  # nothing to re-raise

    with ZP1Peer(answer=garbage_for_bad) as peer:
        asyncio.run(scenario(peer.endpoint))


# -- AsyncClient.close() -------------------------------------------------------------------


def test_close_ends_every_waiting_async_call_with_noreply() -> None:
    async def scenario(endpoint: str) -> None:
        client = AsyncClient(endpoint, timeout=30.0)
        calls = [asyncio.ensure_future(client.similarity([(str(i), "x")])) for i in range(3)]
        await asyncio.sleep(0.05)  # sent, unanswered
        await client.close()
        for call in calls:
            with pytest.raises(NoReply, match="client closed"):
                await asyncio.wait_for(call, 1.0)
        with pytest.raises(NoReply, match="client closed"):
            await client.ping()

    with ZP1Peer(silent=True) as peer:
        asyncio.run(scenario(peer.endpoint))


# -- DNS looked up off the call's path -------------------------------------------------------


class SlowResolver:
    """127.0.0.1 at first; once `slow` is set, every look-up blocks until released (a
    resolver timing out) and then answers `address`."""

    def __init__(self) -> None:
        self.address = "127.0.0.1"
        self.slow = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if self.slow.is_set():
            self.release.wait(5)
        return [self.address]


def test_a_slow_resolver_never_holds_a_blocking_call_past_its_deadline() -> None:
    resolver = SlowResolver()
    policy = FailoverPolicy(resolve_every_s=0.05)
    with ZP1Peer() as peer, Client(f"dns://pool.test:{peer.port}", timeout=2.0,
                                   resolver=resolver, policy=policy) as client:
        try:
            assert isinstance(within(5, lambda: client.ping()), Ping)
            resolver.slow.set()
            time.sleep(0.1)  # a look-up is due
            started = time.monotonic()
            for _ in range(3):
                assert isinstance(within(5, lambda: client.ping(timeout=1.0)), Ping)
            assert time.monotonic() - started < 0.9  # not one resolver's wait
            assert resolver.calls >= 2  # a look-up did start, off the call's path
        finally:
            resolver.release.set()


def test_a_background_look_up_brings_its_pools_in() -> None:
    resolver = SlowResolver()
    policy = FailoverPolicy(resolve_every_s=0.05)
    with ZP1Peer(name="a") as first, ZP1Peer(name="b", host="127.0.0.2",
                                             port=first.port) as second, \
            Client(f"dns://pool.test:{first.port}", timeout=2.0, resolver=resolver,
                   policy=policy) as client:
        assert client.ping().version == "a"
        resolver.address = "127.0.0.2"  # the name now points at the other pool
        deadline = time.monotonic() + 5
        while client.ping().version != "b":
            assert time.monotonic() < deadline, "the new address was never used"
            time.sleep(0.02)
        assert set(client.pools()) == {second.endpoint}


def test_a_static_endpoint_starts_no_look_up() -> None:
    with ZP1Peer() as peer, Client(peer.endpoint, timeout=2.0) as client:
        assert isinstance(client.similarity([("x", "y")]), Similarity)
        assert not client._lookups.running


def test_pipelined_calls_go_on_when_every_reply_in_flight_came_at_once() -> None:
    """Replies that free all of `in_flight` at once must not leave the client waiting for a
    socket with nothing in flight (until its timeout, every later call NoReply)."""
    texts = [f"t{i}" for i in range(12)]
    with ZP1Peer(delays=dict.fromkeys(texts, 0.05)) as peer, \
            Client(peer.endpoint, timeout=3.0) as client:
        started = time.monotonic()
        results = client.similarity_many([[(t, "x")] for t in texts], in_flight=4)
        elapsed = time.monotonic() - started
    assert [getattr(r, "version", r) for r in results] == texts
    assert elapsed < 2.0
