"""Operator commands of a running pool, as control-socket handlers (JSON in, JSON out).

Commands see the pool through `PoolHandle`, a small interface the serve process implements,
plus the rotation controller and the registry; they never reach into the router or the
supervisor. The JSON is made in pool/status.py from typed snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pool.control import BAD_COMMAND, UNKNOWN_VERSION, ControlError, Handler
from pool.gate import QualityGate
from pool.health import Expectation
from pool.judge import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_P99_RATIO, BakeLimits
from pool.modeldir import check_model_dir
from pool.registry import Registry
from pool.rotation import DEFAULT_DRAIN_TIMEOUT_S, RotationController, RotationError
from pool.status import PoolSnapshot, health_document, status_document
from pool.thresholds import VersionThresholds


class PoolHandle(Protocol):
    """What commands may ask of the serve process."""

    @property
    def stopping(self) -> bool: ...

    @property
    def active_version(self) -> str | None: ...

    @property
    def default_workers(self) -> int:
        """Workers a version gets when the operator names no number."""

    def snapshot(self) -> PoolSnapshot: ...

    def begin_shutdown(self) -> None: ...

    def loaded(self, version: str) -> bool:
        """Whether `version` has a plan (loaded, loading, or on its way out)."""

    def load_version(self, version: str, path: str, workers: int) -> None: ...

    def unload_version(self, version: str) -> None: ...

    def thresholds_in_use(self, version: str) -> VersionThresholds | None:
        """What the loaded workers of `version` answer with (None: not loaded)."""

    def quality_gate(self, version: str) -> QualityGate | None:
        """The gate a rotation to `version` passes first: its own eval set, else the pool's
        (`--eval`); None: no gate. ValueError if the set does not parse."""


MAX_LEASE_S = 3600.0


@dataclass
class Lease:
    """A fleet rotation's hold on this pool: other owners may not rotate it meanwhile."""

    owner: str
    expires: float  # monotonic


class Commands:
    def __init__(self, pool: PoolHandle, rotations: RotationController,
                 registry: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.rotations = rotations
        self.registry = registry
        self.clock = clock
        self._lease: Lease | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "health": self.health,
            "stop": self.stop,
            "rotate": self.rotate,
            "rotation": self.rotation,
            "promote": self.promote,
            "rollback": self.rollback,
            "lease": self.lease,
            "load": self.load,
            "unload": self.unload,
            "versions": self.versions,
            "versions_add": self.versions_add,
            "versions_remove": self.versions_remove,
            "versions_import": self.versions_import,
            "versions_thresholds": self.versions_thresholds,
        }

    # -- seeing ------------------------------------------------------------------------------

    def status(self, _req: dict) -> dict:
        return {**status_document(self.pool.snapshot()), "lease": self._lease_view()}

    def health(self, req: dict) -> dict:
        try:
            return health_document(self.pool.snapshot(), req.get("version"))
        except KeyError as exc:
            raise ControlError(exc.args[0], UNKNOWN_VERSION) from None

    def rotation(self, _req: dict) -> dict:
        return {"rotation": self.rotations.status()}

    # -- changing ----------------------------------------------------------------------------

    def stop(self, _req: dict) -> dict:
        if self.pool.stopping:
            raise ControlError("already stopping")
        self.pool.begin_shutdown()
        return {"stopping": True}

    def rotate(self, req: dict) -> dict:
        self._check_lease(req)
        try:
            bake_limits = bake_limits_of(req)
        except (TypeError, ValueError) as exc:
            raise ControlError(str(exc), BAD_COMMAND) from None
        return self._rotate_to(
            str(req.get("version") or ""), req.get("path"),
            workers=int(req.get("workers") or self.pool.default_workers),
            strategy=req.get("strategy") or "auto",
            drain_timeout_s=float(DEFAULT_DRAIN_TIMEOUT_S if req.get("drain_timeout") is None
                                  else req["drain_timeout"]),
            canary=req.get("canary"), thresholds=req.get("thresholds"),
            eval_set=req.get("eval"), allow_dim_change=bool(req.get("allow_dim_change")),
            bake_s=req.get("bake"), bake_limits=bake_limits)

    def _rotate_to(self, target: str, path: str | None, *, workers: int, strategy: str,
                   drain_timeout_s: float, canary: float | None,
                   thresholds: list[float] | None = None, eval_set: str | None = None,
                   allow_dim_change: bool = False, gated: bool = True,
                   bake_s: float | None = None, bake_limits: BakeLimits | None = None) -> dict:
        if self.pool.stopping:
            raise ControlError("the pool is stopping")
        # A refused rotation changes nothing: a path or thresholds stored for it first
        # would be saved by the next write and loaded by the next restart, unchecked.
        before = self.registry.snapshot()
        try:
            if path:
                # Checks the directory; thresholds and an eval set given are stored on it.
                self.registry.add(target, path, auto_load=False, thresholds=thresholds,
                                  eval_set=eval_set)
            entry = self.registry.version(target)
            if entry is None:
                raise ControlError(f"unknown version {target!r}: give --path or add it with "
                                   "`pool versions add`", UNKNOWN_VERSION)
            if not path:
                check_model_dir(entry["path"])  # registered earlier: it may have gone since
                if thresholds is not None:
                    self.registry.set_thresholds(target, thresholds)
                if eval_set is not None:
                    self.registry.set_eval_set(target, eval_set)
            self.rotations.start(target, entry["path"], workers=workers, strategy=strategy,
                                 drain_timeout_s=drain_timeout_s, canary=canary,
                                 expect=Expectation.from_dict(entry.get("expect")),
                                 thresholds=self.registry.thresholds_of(target, entry["path"]),
                                 gate=self.pool.quality_gate(target) if gated else None,
                                 allow_dim_change=allow_dim_change, bake_s=bake_s,
                                 bake_limits=bake_limits)
        except (RotationError, ValueError, KeyError) as exc:
            self.registry.restore(before)  # a RotationError says its code; the rest: arguments
            raise ControlError(str(exc), getattr(exc, "code", BAD_COMMAND)) from None
        self.registry.save()
        return {"rotation": self.rotations.status()}

    def promote(self, req: dict) -> dict:
        self._check_lease(req)
        try:
            self.rotations.promote()
        except RotationError as exc:
            raise ControlError(str(exc), exc.code) from None
        return {"rotation": self.rotations.status()}

    def rollback(self, req: dict) -> dict:
        """Abort a rotation or canary in progress, else rotate back to the previous version
        (or to `version`, a registered one: what a fleet's rollback returns each pool to)."""
        self._check_lease(req)
        try:
            if self.rotations.rollback() is not None:
                return {"rotation": self.rotations.status(), "kind": "abort"}
        except RotationError:
            pass  # switched already: a rotation back is what is asked for
        previous = str(req.get("version") or "") or self.registry.data["previous"]
        if not previous or self.registry.version(previous) is None:
            raise ControlError(f"unknown version {previous!r} to roll back to", UNKNOWN_VERSION) \
                if previous else ControlError("there is no previous version to roll back to")
        # Back to what served before: its embeddings are what producers had, and it passed
        # its own checks then; only the health probe stands between it and traffic.
        reply = self._rotate_to(previous, None, workers=self.pool.default_workers,
                                strategy="auto", drain_timeout_s=DEFAULT_DRAIN_TIMEOUT_S,
                                canary=None, allow_dim_change=True, gated=False)
        return {**reply, "kind": "rotate"}

    # -- leases ------------------------------------------------------------------------------

    def lease(self, req: dict) -> dict:
        """Take, renew (`ttl_s`) or `release` this pool's lease for `owner`."""
        owner = str(req.get("owner") or "")
        if not owner:
            raise ControlError("a lease needs an owner", BAD_COMMAND)
        self._check_lease({"lease": owner})
        if req.get("release"):
            self._lease = None
            return {"lease": None}
        ttl = float(req.get("ttl_s") or 60.0)
        if not 0 < ttl <= MAX_LEASE_S:
            raise ControlError(f"a lease lasts between 0 and {MAX_LEASE_S:.0f} seconds",
                               BAD_COMMAND)
        self._lease = Lease(owner, self.clock() + ttl)
        return {"lease": self._lease_view()}

    def _held(self) -> Lease | None:
        lease = self._lease
        return lease if lease is not None and lease.expires > self.clock() else None

    def _check_lease(self, req: dict) -> None:
        held = self._held()
        if held is not None and held.owner != req.get("lease"):
            raise ControlError(f"this pool is leased to {held.owner} (a fleet rotation) for "
                               f"{held.expires - self.clock():.0f}s more; wait for it to end")

    def _lease_view(self) -> dict[str, Any] | None:
        held = self._held()
        return None if held is None else {
            "owner": held.owner, "expires_in_s": round(held.expires - self.clock(), 1)}

    def load(self, req: dict) -> dict:
        """Start workers of a registered version beside the active one (pinned traffic)."""
        version = str(req.get("version") or "")
        entry = self.registry.version(version)
        if entry is None:
            raise ControlError(f"unknown version {version!r}: `pool versions add` it first",
                               UNKNOWN_VERSION)
        if self.pool.loaded(version):
            raise ControlError(f"{version} is already loaded")
        try:
            check_model_dir(entry["path"])
        except ValueError as exc:  # as a rotation to it would be: the directory is wrong
            raise ControlError(str(exc), BAD_COMMAND) from None
        self.pool.load_version(version, entry["path"],
                               int(req.get("workers") or self.pool.default_workers))
        return {"loading": version}

    def unload(self, req: dict) -> dict:
        version = str(req.get("version") or "")
        if version == self.pool.active_version:
            raise ControlError(f"{version} is the active version; rotate away from it first")
        rot = self.rotations.current
        if rot is not None and not rot.finished and version in (rot.source, rot.target):
            raise ControlError(f"{version} takes part in rotation {rot.id}; wait or roll back")
        if not self.pool.loaded(version):
            raise ControlError(f"{version} has no workers")
        self.pool.unload_version(version)
        return {"unloading": version}

    # -- the registry --------------------------------------------------------------------------

    def versions(self, _req: dict) -> dict:
        return {"versions": self.registry.listing(), "active": self.registry.active}

    def versions_add(self, req: dict) -> dict:
        return self._edit_registry(lambda r: r.add(
            req["version"], req["path"], auto_load=bool(req.get("auto_load")),
            expect=req.get("expect"), thresholds=req.get("thresholds"),
            eval_set=req.get("eval")))

    def versions_thresholds(self, req: dict) -> dict:
        """Store thresholds on a registered version (`[high, low]`, or null for the default).
        Workers already running keep theirs: a version's workers never disagree, and the new
        ones apply when the version is next loaded (a rotation to it, a restart)."""
        version = str(req.get("version") or "")
        reply = self._edit_registry(lambda r: r.set_thresholds(version, req.get("thresholds")))
        plan_thresholds = self.pool.thresholds_in_use(version)
        return {**reply, "in_use": None if plan_thresholds is None
                else plan_thresholds.as_dict()}

    def versions_remove(self, req: dict) -> dict:
        version = str(req.get("version"))
        # The active version first: "unload it" would be refused for it in turn.
        if version != self.registry.active and self.pool.loaded(version):
            raise ControlError(f"{version} is loaded; `pool unload` it first")
        return self._edit_registry(lambda r: r.remove(req["version"]))

    def versions_import(self, req: dict) -> dict:
        return self._edit_registry(lambda r: r.import_seed(req["doc"]))

    def _edit_registry(self, edit: Callable[[Registry], Any]) -> dict:
        try:
            edit(self.registry)
        except (ValueError, KeyError) as exc:  # what the edit was given
            raise ControlError(str(exc), BAD_COMMAND) from None
        self.registry.save()
        return {"versions": self.registry.listing()}


def bake_limits_of(req: dict) -> BakeLimits:
    """The bake's limits a rotate request names (ValueError if out of range)."""
    return BakeLimits(
        max_error_rate=float(req.get("max_error_rate", DEFAULT_MAX_ERROR_RATE)),
        max_p99_ratio=float(req.get("max_p99_ratio", DEFAULT_MAX_P99_RATIO)))
