"""A pool joining a fleet starts on the version the fleet serves now.

A Kubernetes pod that starts mid-rollout, or long after one, would otherwise serve whatever
its registry (or the model volume's model_versions.json) said when it was first made. With
`--join PEERS` (the other pools' front ends: endpoints, or dns://NAME:PORT of the headless
Service), `pool serve` pings each peer before it loads anything, and serves the version most
of them route to; one not registered here stops the start (pool.settings.joined_version).
Peers that do not answer in time are left out; none answering (the first pod) leaves the
choice to the registry, as without --join.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from router.client import Client, ZeroPoolError
from router.failover import expand_targets, resolve_addresses
from router.keys import ClientKeys, KeyFileError, load_key_pair

log = logging.getLogger("zeropool.join")

JOIN_TIMEOUT_S = 3.0  # per peer: a pool answers a ping in milliseconds, or is not there

Ping = Callable[[str], str]  # endpoint -> the version it routes to (raises if no answer)


def peer_endpoints(peers: str) -> list[str]:
    """`--join`'s endpoints, dns:// names as their addresses now."""
    targets = [p.strip() for p in peers.split(",") if p.strip()]
    expanded = expand_targets(targets, resolve_addresses, {})
    return list(dict.fromkeys(e for found in expanded.values() for e in found))


def fleet_version(endpoints: list[str], ping: Ping) -> str | None:
    """The version most answering peers route to; None when none answers or it is a tie."""
    seen: Counter[str] = Counter()
    for endpoint in endpoints:
        try:
            seen[ping(endpoint)] += 1
        except (ZeroPoolError, OSError, ValueError) as exc:
            log.warning("join: %s did not answer (%s)", endpoint, exc)
    ranked = seen.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def pinger(curve: ClientKeys | None, timeout_s: float = JOIN_TIMEOUT_S) -> Ping:
    def ping(endpoint: str) -> str:
        with Client(endpoint, timeout=timeout_s, curve=curve) as client:
            return client.ping().version
    return ping


def own_keys(curve_secret_key: Path | None) -> ClientKeys | None:
    """Peers sharing this pool's Curve key pair (one Kubernetes Secret) are pinged with it:
    their --curve-allow must list its public half."""
    if curve_secret_key is None:
        return None
    try:
        public, secret = load_key_pair(Path(curve_secret_key))
    except KeyFileError as exc:
        raise ValueError(f"--join: {exc}") from None
    return ClientKeys(public, public, secret)
