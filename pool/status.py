"""`pool status` and `pool health` documents, assembled from the components' snapshots.

Each component describes itself in a typed snapshot (router.broker.BrokerSnapshot,
pool.supervisor.SupervisorSnapshot, the rotation's record); the serve process bundles them
into one `PoolSnapshot`; the JSON the control socket sends is made here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pool.health import SEVERITY, VersionFacts, assess_pool, assess_version
from pool.metrics import RECENT_WINDOW_S
from pool.supervisor import SupervisorSnapshot, VersionView, WorkerView
from router import protocol
from router.broker import BrokerSnapshot

EVENTS_SHOWN = 20  # the latest supervisor events in `pool status`


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """The whole serve process at one moment."""

    pid: int
    uptime_s: float
    stopping: bool
    now: float  # the components' clock, for ages
    previous: str | None  # the registry's previous active version
    requests_per_s: float
    latency_ms: dict | None
    replies_by_code: dict[str, dict[str, int]]  # per version, over the recent window
    metrics_url: str | None
    log_file: str
    system: dict
    settings: dict[str, Any]  # what `pool status` shows of the settings
    broker: BrokerSnapshot
    supervisor: SupervisorSnapshot
    rotation: dict | None
    curve: dict | None = None  # CurveZMQ on the frontend: refused handshakes (None: off)
    # --control-bind: its endpoint and the operator handshakes it refused (None: off)
    remote_control: dict | None = None


def status_document(snap: PoolSnapshot) -> dict[str, Any]:
    broker = snap.broker
    return {
        "pid": snap.pid,
        "uptime_s": snap.uptime_s,
        "endpoint": broker.endpoint,
        "state": "stopping" if snap.stopping else "serving",
        "active": broker.active,
        "previous": snap.previous,
        "canary": ({"version": broker.canary[0], "share": broker.canary[1]}
                   if broker.canary else None),
        "queue_depth": broker.queued,
        "inflight": broker.inflight,
        "requests_per_s": snap.requests_per_s,
        "latency_ms": snap.latency_ms,
        "metrics_url": snap.metrics_url,
        "log_file": snap.log_file,
        "system": snap.system,
        "versions": {name: _version_row(view, broker)
                     for name, view in snap.supervisor.versions.items()},
        "workers": [worker_row(w) for w in snap.supervisor.workers],
        "rotation": snap.rotation,
        "curve": snap.curve,
        "remote_control": snap.remote_control,
        "requests": {"received": broker.stats.received, "ok": broker.stats.replied_ok,
                     "errors": broker.stats.replied_error, "dropped": broker.stats.dropped,
                     "errors_by_code": broker.stats.errors_by_code},
        "events": snap.supervisor.events[-EVENTS_SHOWN:],
        "settings": {**snap.settings, "start_method": snap.supervisor.start_method},
    }


def _version_row(view: VersionView, broker: BrokerSnapshot) -> dict[str, Any]:
    lane = broker.lanes.get(view.version)
    return {"path": view.path, "workers_wanted": view.workers_wanted,
            "workers_ready": view.workers_ready, "failed": view.failed,
            "crash_loop": view.crash_loop, "next_try_s": view.next_try_s,
            "restarts": view.restarts, "serving": lane is not None,
            "served": lane.served if lane is not None else None,
            "errors": lane.errors if lane is not None else None,
            **view.thresholds.as_dict()}


def worker_row(worker: WorkerView) -> dict[str, Any]:
    row = asdict(worker)
    row["batching"] = worker.batching.as_dict() if worker.batching is not None else {}
    return row


def health_document(snap: PoolSnapshot, version: str | None = None) -> dict[str, Any]:
    """Per-version healthy / degraded / failed with reasons, the pool's verdict, the machine.
    Raises KeyError naming the loaded versions if `version` is not one of them."""
    versions = {name: assess_version(_facts(view, snap))
                for name, view in snap.supervisor.versions.items()}
    if version and version not in versions:
        raise KeyError(f"{version} is not loaded (loaded: {', '.join(versions)})")
    pool = assess_pool(versions, snap.broker.active, snap.stopping)
    verdict = versions[version] if version else pool
    return {"status": verdict["status"], "exit_code": SEVERITY[verdict["status"]],
            "pool": pool, "active": snap.broker.active, "versions": versions,
            "system": snap.system}


def _facts(view: VersionView, snap: PoolSnapshot) -> VersionFacts:
    workers = [{"id": w.id, "state": w.state, "last_heartbeat_s": w.last_heartbeat_s}
               for w in snap.supervisor.workers if w.version == view.version]
    return VersionFacts(
        version=view.version, workers_wanted=0 if view.retired else view.workers_wanted,
        workers=workers, failed=view.failed, crash_loop=view.crash_loop,
        ever_ready=view.ever_ready,
        recent_crashes=sum(1 for t in view.crash_times if snap.now - t < RECENT_WINDOW_S),
        replies_by_code=snap.replies_by_code.get(view.version, {}),
        golden=view.golden.as_dict() if view.golden is not None else None,
        pool_faults=protocol.POOL_FAULTS)
