"""`pool fleet`: parsing --pools and printing fleets (the rollout itself is pool.fleet)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pool.control import control_request
from pool.fleet import FleetError, FleetReport, PoolLink
from router.failover import DNS_SCHEME, Resolver, parse_dns_target, resolve_addresses

RemoteLink = Callable[[str], PoolLink]  # a pool's control endpoint -> its link


def pool_entries(spec: str, resolve: Resolver = resolve_addresses) -> list[str]:
    """`--pools`: comma-separated control endpoints (tcp://HOST:PORT), local state
    directories, or dns://NAME:PORT (every address the name has, e.g. a Kubernetes headless
    Service's ready pods), in the order given, each once."""
    entries: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part.startswith(DNS_SCHEME):
            entries += [part] if part else []
            continue
        host, port = parse_dns_target(part)
        try:
            found = sorted(resolve(host, port))
        except OSError as exc:
            raise FleetError(f"{part}: {exc}") from None
        if not found:
            raise FleetError(f"{part}: the name has no addresses")
        entries += [f"tcp://{address}:{port}" for address in found]
    if not entries:
        raise FleetError("--pools names no pool")
    return list(dict.fromkeys(entries))


def pool_links(entries: list[str], remote: RemoteLink | None) -> list[PoolLink]:
    """A link per pool: a local pool through its state directory's control socket, a
    remote one through `remote` (its control endpoint, the operator's Curve keys)."""
    links = []
    for entry in entries:
        if "://" in entry:
            if remote is None:
                raise FleetError(f"{entry}: a remote pool needs the operator's keys "
                                 "(--server-key and --client-key)")
            links.append(remote(entry))
        else:
            links.append(PoolLink(entry, partial(control_request, Path(entry))))
    return links


# -- printing ----------------------------------------------------------------------------------


def print_fleet_status(out: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="fleet", title_justify="left")
    for column in ("pool", "version", "state", "req/s", "p99 ms", "workers", "rotation"):
        table.add_column(column)
    for row in rows:
        if not row["reachable"]:
            table.add_row(row["pool"], "-", "[red]unreachable[/]", "", "", "", "")
            continue
        rotation = row["rotation"]
        rot = "-" if not rotation else (
            f"{rotation['target']}: {rotation['outcome'] or rotation['phase']}")
        if row.get("lease"):
            rot += f" (leased to {row['lease']['owner']})"
        p99 = (row.get("latency_ms") or {}).get("p99")
        table.add_row(row["pool"], str(row["active"]), row["state"],
                      f"{row['requests_per_s'] or 0:,.1f}", "-" if p99 is None else f"{p99:.1f}",
                      str(row["workers"]), rot)
    out.print(table)
    for row in rows:
        if not row["reachable"]:
            out.print(f"[red]{row['pool']}[/]: {row['error']}", soft_wrap=True)
    versions = {row["active"] for row in rows if row["reachable"]}
    if len(versions) > 1:
        out.print(f"[yellow]the pools serve {len(versions)} versions: "
                  f"{', '.join(sorted(map(str, versions)))}[/]")


def progress_printer(out: Console) -> Callable[[FleetReport], None]:
    """Prints each pool's phase as it changes, with the fleet's traffic at that moment."""
    seen: dict[str, str] = {}

    def show(report: FleetReport) -> None:
        point = report.traffic[-1] if report.traffic else None
        traffic = "" if point is None else (
            f"  [dim](fleet {point.requests_per_s:,.0f} req/s, {point.errors} errors, p99 "
            f"{point.p99_ms if point.p99_ms is not None else '-'} ms)[/]")
        for pool in report.pools:
            if seen.get(pool.name) != pool.phase:
                seen[pool.name] = pool.phase
                out.print(f"{pool.name}: {pool.phase}{traffic}")

    return show


def print_report(out: Console, report: FleetReport) -> None:
    table = Table(title=f"fleet rotation {report.source} -> {report.target}: "
                        f"{report.outcome} in {report.seconds:.1f}s", title_justify="left")
    for column in ("pool", "before", "phase", "started s", "took s", "phases (s)", "reason"):
        table.add_column(column)
    for pool in report.pools:
        timings = (pool.rotation or {}).get("timings") or {}
        took = "-" if pool.started_s is None or pool.finished_s is None else \
            f"{pool.finished_s - pool.started_s:.1f}"
        table.add_row(pool.name, str(pool.before), pool.phase,
                      "-" if pool.started_s is None else f"{pool.started_s:.1f}", took,
                      " ".join(f"{k} {v:.1f}" for k, v in timings.items()),
                      pool.reason or "")
    out.print(table)
    if report.traffic:
        rates = [p.requests_per_s for p in report.traffic]
        p99s = [p.p99_ms for p in report.traffic if p.p99_ms is not None]
        out.print(f"fleet traffic throughout: {min(rates):,.0f}-{max(rates):,.0f} req/s, "
                  f"{sum(p.errors for p in report.traffic)} errors, highest p99 "
                  f"{max(p99s) if p99s else '-'} ms")
    if report.canary:
        out.print(f"canary against the rest: {report.canary['reason'] or 'no regression'}")
    if report.reason:
        out.print(f"[red]reason[/]: {report.reason}")
