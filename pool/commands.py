"""Operator commands of a running pool, as control-socket handlers (JSON in, JSON out)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from pool import config as c
from pool.control import ControlError, Handler
from pool.health import SEVERITY, Expectation, VersionFacts, assess_pool, assess_version
from pool.metrics import POOL_FAULTS, RECENT_WINDOW_S
from pool.registry import check_model_dir
from pool.rotation import DEFAULT_DRAIN_TIMEOUT_S, RotationError

if TYPE_CHECKING:
    from pool.server import PoolServer


class Commands:
    def __init__(self, server: PoolServer) -> None:
        self.server = server

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "health": self.health,
            "stop": self.stop,
            "rotate": self.rotate,
            "rotation": self.rotation,
            "promote": self.promote,
            "rollback": self.rollback,
            "load": self.load,
            "unload": self.unload,
            "versions": self.versions,
            "versions_add": self.versions_add,
            "versions_remove": self.versions_remove,
            "versions_import": self.versions_import,
        }

    # -- seeing ------------------------------------------------------------------------------

    def status(self, _req: dict) -> dict:
        srv = self.server
        b, sup, s = srv.broker, srv.supervisor, srv.settings
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - srv.started, 1),
            "endpoint": b.frontend_endpoint,
            "state": "stopping" if srv.stopping_since is not None else "serving",
            "active": b.active,
            "previous": srv.registry.data["previous"],
            "canary": {"version": b.canary[0], "share": b.canary[1]} if b.canary else None,
            "queue_depth": b.queued,
            "inflight": b.inflight,
            "requests_per_s": round(srv.metrics.recent.per_second(), 1),
            "latency_ms": srv.metrics.recent.latency_ms(),
            "metrics_url": srv.metrics_url,
            "log_file": str(srv.state_dir / c.LOG_FILE),
            "system": srv.system,
            "versions": {
                name: {"path": plan.path, "workers_wanted": plan.workers,
                       "workers_ready": sup.count(name, "ready"),
                       "failed": sup.failure(name), "crash_loop": plan.crash_loop,
                       "next_try_s": sup.next_try_s(name), "restarts": plan.restarts,
                       "serving": name in b.lanes,
                       "served": b.lanes[name].served if name in b.lanes else None,
                       "errors": b.lanes[name].errors if name in b.lanes else None}
                for name, plan in sup.plans.items()
            },
            "workers": sup.worker_rows(),
            "rotation": srv.rotations.status(),
            "requests": {"received": b.stats.received, "ok": b.stats.replied_ok,
                         "errors": b.stats.replied_error, "dropped": b.stats.dropped,
                         "errors_by_code": b.stats.errors_by_code},
            "events": list(sup.events)[-20:],
            "settings": {"workers": s.workers, "devices": s.devices, "dtype": s.dtype,
                         "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                         "threads": s.threads, "start_method": sup.start_method,
                         "load_niceness": s.load_niceness, "crash_retry_s": s.crash_retry_s,
                         "max_queue": s.max_queue,
                         "queue_timeout_s": s.queue_timeout_s, "max_pairs": s.max_pairs,
                         "max_text_chars": s.max_text_chars,
                         "max_message_bytes": s.max_message_bytes,
                         "metrics_port": s.metrics_port},
        }

    def health(self, req: dict) -> dict:
        """Per-version healthy / degraded / failed with reasons, the pool's verdict, the machine."""
        srv = self.server
        sup = srv.supervisor
        rows = sup.worker_rows()
        now = time.monotonic()
        versions = {}
        for name, plan in sup.plans.items():
            facts = VersionFacts(
                version=name, workers_wanted=0 if plan.retired else plan.workers,
                workers=[r for r in rows if r["version"] == name],
                failed=sup.failure(name), crash_loop=plan.crash_loop,
                ever_ready=plan.ever_ready,
                recent_crashes=sum(1 for t in plan.crashes if now - t < RECENT_WINDOW_S),
                replies_by_code=srv.metrics.recent.by_code(name),
                golden=plan.golden, pool_faults=POOL_FAULTS)
            versions[name] = assess_version(facts)
        wanted = req.get("version")
        if wanted and wanted not in versions:
            raise ControlError(f"{wanted} is not loaded (loaded: {', '.join(versions)})")
        pool = assess_pool(versions, srv.broker.active, srv.stopping_since is not None)
        verdict = versions[wanted] if wanted else pool
        return {"status": verdict["status"], "exit_code": SEVERITY[verdict["status"]],
                "pool": pool, "active": srv.broker.active, "versions": versions,
                "system": srv.system}

    def rotation(self, _req: dict) -> dict:
        return {"rotation": self.server.rotations.status()}

    # -- changing ----------------------------------------------------------------------------

    def stop(self, _req: dict) -> dict:
        if self.server.stopping_since is not None:
            raise ControlError("already stopping")
        self.server.begin_shutdown()
        return {"stopping": True}

    def rotate(self, req: dict) -> dict:
        srv = self.server
        if srv.stopping_since is not None:
            raise ControlError("the pool is stopping")
        target = str(req.get("version") or "")
        path = req.get("path")
        try:
            if path:
                srv.registry.add(target, path, auto_load=False)
            entry = srv.registry.version(target)
            if entry is None:
                raise ControlError(f"unknown version {target!r}: give --path or add it with "
                                   "`pool versions add`")
            check_model_dir(entry["path"])
            rot = srv.rotations.start(
                target, entry["path"],
                workers=int(req.get("workers") or srv.settings.workers),
                strategy=req.get("strategy") or "auto",
                drain_timeout_s=float(req.get("drain_timeout") or DEFAULT_DRAIN_TIMEOUT_S),
                canary=req.get("canary"),
                expect=Expectation.from_dict(entry.get("expect")),
            )
        except (RotationError, ValueError, KeyError) as exc:
            raise ControlError(str(exc)) from None
        srv.registry.save()
        return {"rotation": rot.as_dict()}

    def promote(self, _req: dict) -> dict:
        try:
            return {"rotation": self.server.rotations.promote().as_dict()}
        except RotationError as exc:
            raise ControlError(str(exc)) from None

    def rollback(self, req: dict) -> dict:
        """Abort a rotation or canary in progress, else rotate back to the previous version."""
        srv = self.server
        try:
            rot = srv.rotations.rollback()
            if rot is not None:
                return {"rotation": rot.as_dict(), "kind": "abort"}
        except RotationError:
            pass  # switched already: a rotation back is what is asked for
        previous = srv.registry.data["previous"]
        if not previous or srv.registry.version(previous) is None:
            raise ControlError("there is no previous version to roll back to")
        return {**self.rotate({**req, "version": previous, "path": None}), "kind": "rotate"}

    def load(self, req: dict) -> dict:
        """Start workers of a registered version beside the active one (pinned traffic)."""
        srv = self.server
        version = str(req.get("version") or "")
        entry = srv.registry.version(version)
        if entry is None:
            raise ControlError(f"unknown version {version!r}: `pool versions add` it first")
        if version in srv.supervisor.plans:
            raise ControlError(f"{version} is already loaded")
        try:
            check_model_dir(entry["path"])
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        srv.load_version(version, entry["path"], int(req.get("workers") or
                                                     srv.settings.workers))
        return {"loading": version}

    def unload(self, req: dict) -> dict:
        srv = self.server
        version = str(req.get("version") or "")
        if version == srv.broker.active:
            raise ControlError(f"{version} is the active version; rotate away from it first")
        rot = srv.rotations.current
        if rot is not None and not rot.finished and version in (rot.source, rot.target):
            raise ControlError(f"{version} takes part in rotation {rot.id}; wait or roll back")
        if version not in srv.supervisor.plans:
            raise ControlError(f"{version} has no workers")
        srv.broker.close_lane(version)
        srv.supervisor.retire_version(version)
        return {"unloading": version}

    # -- the registry --------------------------------------------------------------------------

    def versions(self, _req: dict) -> dict:
        return {"versions": self.server.registry.listing(), "active": self.server.broker.active}

    def versions_add(self, req: dict) -> dict:
        return self._edit_registry(lambda r: r.add(
            req["version"], req["path"], auto_load=bool(req.get("auto_load")),
            expect=req.get("expect")))

    def versions_remove(self, req: dict) -> dict:
        if req.get("version") in self.server.supervisor.plans:
            raise ControlError(f"{req.get('version')} is loaded; `pool unload` it first")
        return self._edit_registry(lambda r: r.remove(req["version"]))

    def versions_import(self, req: dict) -> dict:
        return self._edit_registry(lambda r: r.import_seed(req["doc"]))

    def _edit_registry(self, edit: Any) -> dict:
        registry = self.server.registry
        try:
            edit(registry)
        except (ValueError, KeyError) as exc:
            raise ControlError(str(exc)) from None
        registry.save()
        return {"versions": registry.listing()}
