"""The version registry: `versions.json` in the state directory, written atomically.

Shape (a superset of the seed's model_versions.json):
{"format": 1, "active": "v1", "previous": null,
 "versions": {"v1": {"path": "...", "auto_load": true, "added_at": 1700000000.0,
                     "expect": null}},
 "history": [{"t": ..., "event": "serve", ...}]}
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

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

    @property
    def active(self) -> str | None:
        return self.data["active"]

    def version(self, name: str) -> dict[str, Any] | None:
        return self.data["versions"].get(name)

    def put_version(self, name: str, path: str, *, auto_load: bool = False,
                    expect: list[float] | None = None) -> None:
        entry = self.data["versions"].setdefault(name, {"added_at": time.time()})
        entry.update(path=path, auto_load=auto_load)
        if expect is not None:
            entry["expect"] = expect
        entry.setdefault("expect", None)

    def set_active(self, name: str) -> None:
        if self.data["active"] != name:
            self.data["previous"] = self.data["active"]
        self.data["active"] = name

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
