"""The version registry: `versions.json` in the state directory, written atomically.

Shape (a superset of the seed's model_versions.json):
{"format": 1, "active": "v1", "previous": null,
 "versions": {"v1": {"path": "...", "auto_load": true, "added_at": 1700000000.0,
                     "expect": null, "thresholds": [0.92, 0.86],
                     "eval": "/data/golden.tsv"}},
 "history": [{"t": ..., "event": "serve", ...}]}
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from pool.gate import PACKAGED_SETS, read_eval_set
from pool.health import Expectation, json_kind
from pool.modeldir import check_model_dir
from pool.quality import Thresholds
from pool.thresholds import (
    VersionThresholds,
    entry_thresholds,
    resolve_entry,
    resolve_thresholds,
    thresholds_from_json,
    thresholds_to_json,
)

REGISTRY_FILE = "versions.json"
HISTORY_LIMIT = 500


class Registry:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / REGISTRY_FILE
        self.data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = {}
        data.setdefault("format", 1)
        data.setdefault("active", None)
        data.setdefault("previous", None)
        data.setdefault("versions", {})
        data.setdefault("history", [])
        return data

    def snapshot(self) -> dict[str, Any]:
        """A copy of everything recorded, for `restore` to undo a change that failed."""
        return orjson.loads(orjson.dumps(self.data))

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.data = snapshot

    @property
    def active(self) -> str | None:
        return self.data["active"]

    def version(self, name: str) -> dict[str, Any] | None:
        return self.data["versions"].get(name)

    def put_version(self, name: str, path: str, *, auto_load: bool = False,
                    expect: list[float] | None = None,
                    thresholds: Thresholds | None = None,
                    eval_set: str | None = None) -> None:
        """Record a version; `expect`, `thresholds` and `eval_set` replace the stored ones
        when given (None keeps them)."""
        entry = self.data["versions"].setdefault(name, {"added_at": time.time()})
        entry.update(path=path, auto_load=auto_load)
        if expect is not None:
            entry["expect"] = expect
        entry.setdefault("expect", None)
        if thresholds is not None:
            entry["thresholds"] = thresholds_to_json(thresholds)
        entry.setdefault("thresholds", None)
        if eval_set is not None:
            entry["eval"] = eval_set
        entry.setdefault("eval", None)

    def add(self, name: str, path: str, *, auto_load: bool = False,
            expect: dict | None = None, thresholds: Any = None,
            eval_set: str | None = None) -> dict[str, Any]:
        """Register (or update) a version after checking its path holds a model.
        `thresholds`: Thresholds or `[high, low]` (ValueError if out of order or range).
        `eval_set`: its quality gate's labelled set (checked to parse; pool.gate)."""
        check_version_name(name)
        if expect is not None:
            Expectation.from_dict(expect)  # raises ValueError on a malformed file
        own = thresholds_from_json(thresholds)
        gate_set = None if eval_set is None else check_eval_set(eval_set)
        self.put_version(name, check_model_dir(path), auto_load=auto_load, expect=expect,
                         thresholds=own, eval_set=gate_set)
        self.log("version_added", version=name, path=path, auto_load=auto_load,
                 thresholds=None if own is None else thresholds_to_json(own), eval=gate_set)
        return self.data["versions"][name]

    def set_thresholds(self, name: str, thresholds: Any) -> Thresholds | None:
        """Give a registered version thresholds of its own (Thresholds or `[high, low]`), or
        None to fall back to its built-in's or the seed's. Returns what was stored."""
        entry = self.version(name)
        if entry is None:
            raise ValueError(f"unknown version {name!r}")
        own = thresholds_from_json(thresholds)
        entry["thresholds"] = None if own is None else thresholds_to_json(own)
        self.log("thresholds_set", version=name, thresholds=entry["thresholds"])
        return own

    def set_eval_set(self, name: str, spec: str | None) -> str | None:
        """Give a registered version its quality gate's set (checked), or None for the
        pool's. Returns what was stored."""
        entry = self.version(name)
        if entry is None:
            raise ValueError(f"unknown version {name!r}")
        entry["eval"] = None if spec is None else check_eval_set(spec)
        self.log("eval_set", version=name, eval=entry["eval"])
        return entry["eval"]

    def own_thresholds(self, name: str) -> Thresholds | None:
        """The thresholds stored on a version (None: none of its own, or not registered)."""
        return entry_thresholds(self.version(name))

    def thresholds_of(self, name: str, path: str) -> VersionThresholds:
        """What version `name` at `path` answers with: its own, its built-in's, the seed's."""
        return resolve_thresholds(self.own_thresholds(name), path)

    def remove(self, name: str) -> None:
        if name not in self.data["versions"]:
            raise ValueError(f"unknown version {name!r}")
        if name == self.active:
            raise ValueError(f"{name} is the active version; rotate to another one first")
        del self.data["versions"][name]
        if self.data["previous"] == name:
            self.data["previous"] = None
        self.log("version_removed", version=name)

    def import_seed(self, doc: Any) -> list[str]:
        """Merge the seed's model_versions.json: {current_version, versions: {v: {path, ...}}}.
        All or nothing: ValueError saying what is wrong (the document's shape, a version's
        path), and the registry as it was."""
        check_seed_document(doc)
        snapshot = self.snapshot()
        current = doc.get("current_version")
        added = []
        try:
            for name, entry in doc["versions"].items():
                auto = bool(entry.get("auto_load", name == current))
                self.add(name, entry["path"], auto_load=auto)
                added.append(name)
        except ValueError:
            self.restore(snapshot)  # half an import would register what nobody asked for
            raise
        if current and self.active is None:
            self.set_active(current)
        return added

    def listing(self) -> list[dict[str, Any]]:
        """Each version's entry, with the thresholds it answers with (`thresholds`, its own
        or else derived) and where they come from (`thresholds_source`)."""
        last = self.last_rotations()
        return [{"version": name, **entry, **_shown_thresholds(entry),
                 "active": name == self.active, "previous": name == self.data["previous"],
                 "last_rotation": last.get(name)}
                for name, entry in sorted(self.data["versions"].items())]

    def last_rotations(self) -> dict[str, dict[str, Any]]:
        """Each version's last rotation to it, from the history: its id, outcome and reason
        (a version whose rotation rolled back says why, in `pool versions list`)."""
        targets: dict[Any, str] = {}
        last: dict[str, dict[str, Any]] = {}
        for entry in self.data["history"]:
            if entry.get("event") == "rotation_started":
                targets[entry.get("rotation")] = entry.get("target")
            elif entry.get("event") == "rotation_finished":
                target = entry.get("target") or targets.get(entry.get("rotation"))
                if target:
                    last[target] = {"id": entry.get("rotation"),
                                    "outcome": entry.get("outcome"),
                                    "reason": entry.get("reason"), "t": entry.get("t")}
        return last

    def set_active(self, name: str) -> None:
        if self.data["active"] != name:
            self.data["previous"] = self.data["active"]
        self.data["active"] = name

    def switch_back(self, active: str, previous: str | None) -> None:
        """Undo a switch: `active` serves again, and the previous version is what it was
        before the switch (never the version just rejected)."""
        self.data["active"], self.data["previous"] = active, previous

    def last_rotation_id(self) -> int:
        """The highest rotation id in the history: a pool started again numbers on from it."""
        return max((e.get("rotation") or 0 for e in self.data["history"]
                    if e.get("event") == "rotation_started"), default=0)

    def close_interrupted_rotations(self, reason: str) -> list[int]:
        """Record as interrupted every rotation started and never finished (its pool stopped
        or died in the middle); their ids."""
        open_ids: dict[Any, None] = {}
        for entry in self.data["history"]:
            if entry.get("event") == "rotation_started":
                open_ids[entry.get("rotation")] = None
            elif entry.get("event") == "rotation_finished":
                open_ids.pop(entry.get("rotation"), None)
        for rotation in open_ids:
            self.log("rotation_finished", rotation=rotation, outcome="interrupted",
                     reason=reason)
        return list(open_ids)

    def log(self, event: str, **fields: Any) -> None:
        history = self.data["history"]
        history.append({"t": time.time(), "event": event, **fields})
        del history[:-HISTORY_LIMIT]

    def save(self) -> None:
        """Temp file, fsync, rename, fsync the directory: readable after a crash at any point."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw = orjson.dumps(self.data, option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(prefix=".versions.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _shown_thresholds(entry: dict[str, Any]) -> dict[str, Any]:
    try:
        return resolve_entry(entry).as_dict()
    except ValueError as exc:  # a registry file edited by hand: say so, list the rest
        return {"thresholds": entry.get("thresholds"), "thresholds_source": f"invalid: {exc}"}


SEED_SHAPE = '{"current_version": NAME, "versions": {NAME: {"path": DIR}, ...}}'


def check_seed_document(doc: Any) -> None:
    """ValueError unless `doc` has the shape of the seed's model_versions.json (any JSON can
    come from the file or the control socket)."""
    if not isinstance(doc, dict):
        raise ValueError(f"expected {SEED_SHAPE}, not a JSON {json_kind(doc)}")
    versions = doc.get("versions")
    if not isinstance(versions, dict):
        raise ValueError(f'expected {SEED_SHAPE}: "versions" is '
                         + ("missing" if versions is None
                            else f"not an object (a JSON {json_kind(versions)})"))
    current = doc.get("current_version")
    if current is not None and not isinstance(current, str):
        raise ValueError(f'"current_version" is not a version name (a JSON '
                         f"{json_kind(current)})")
    for name, entry in versions.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f'version {name!r} has no path: expected {{"path": DIR}}')


def check_eval_set(spec: str) -> str:
    """A quality gate's labelled set as the registry keeps it (a file's absolute path, or a
    packaged set's name), after checking it parses; PairsFileError (a ValueError with the
    line number) if not."""
    read_eval_set(spec)
    return spec if spec in PACKAGED_SETS else str(Path(spec).expanduser().resolve())


def check_version_name(name: str) -> None:
    if not name or len(name) > 64 or not all(ch.isalnum() or ch in "._-" for ch in name):
        raise ValueError(f"bad version name {name!r}: use 1-64 letters, digits, '.', '_', '-'")
