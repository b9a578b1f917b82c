"""Which verdict thresholds a version answers with, and where they came from (issue #16).

A score's verdict ("very similar" above `high`, "related" above `low`) only means something
for the model that produced it: the multilingual e5 model scores every pair in 0.8-0.97, so
the seed's 0.85 / 0.5 call nearly everything "very similar" there. So each version carries
its own thresholds, in this order of preference:

  version       set on the version (`pool versions add --thresholds`, `pool rotate
                --thresholds`, `pool serve --thresholds`, `pool calibrate --save`)
  builtin       its model directory is a built-in model, which has calibrated thresholds
                (pool.builtin.builtin_thresholds)
  seed default  the seed's 0.85 / 0.5 (pool.quality.SEED_THRESHOLDS)

They are resolved once in the serve process when a version is loaded (a `VersionPlan`) and
handed to its workers, which put them in every similarity reply. Typed here; a JSON list
`[high, low]` only in the registry file and on the sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pool.quality import SEED_THRESHOLDS, Thresholds

SOURCE_VERSION = "version"
SOURCE_BUILTIN = "builtin"
SOURCE_SEED = "seed default"
SOURCES = (SOURCE_VERSION, SOURCE_BUILTIN, SOURCE_SEED)


@dataclass(frozen=True, slots=True)
class VersionThresholds:
    """The thresholds a version's verdicts use, and which rule gave them."""

    thresholds: Thresholds
    source: str  # one of SOURCES

    def as_dict(self) -> dict[str, Any]:
        """The keys `pool status` and `pool versions list` show for a version."""
        return {"thresholds": thresholds_to_json(self.thresholds),
                "thresholds_source": self.source}

    def describe(self) -> str:
        """"0.92 / 0.86 (builtin)", for a terminal."""
        return f"{self.thresholds.high:g} / {self.thresholds.low:g} ({self.source})"


SEED_VERSION_THRESHOLDS = VersionThresholds(SEED_THRESHOLDS, SOURCE_SEED)


def thresholds_to_json(thresholds: Thresholds) -> list[float]:
    """The wire and registry form: `[high, low]`."""
    return [thresholds.high, thresholds.low]


def thresholds_from_json(value: Any, what: str = "thresholds") -> Thresholds | None:
    """`[high, low]` (or None) as Thresholds; ValueError saying what is wrong otherwise:
    not two numbers, out of order, or outside [-1, 1]."""
    if value is None:
        return None
    if isinstance(value, Thresholds):
        return value
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != 2:
        raise ValueError(f"{what} must be [high, low], two numbers, not {value!r}")
    high, low = value
    for name, number in (("high", high), ("low", low)):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"{what}: {name} {number!r} is not a number")
    try:
        return Thresholds(high=float(high), low=float(low))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def resolve_thresholds(own: Thresholds | None, path: str) -> VersionThresholds:
    """A version's own thresholds, else its built-in model's, else the seed's."""
    if own is not None:
        return VersionThresholds(own, SOURCE_VERSION)
    from pool.builtin import builtin_thresholds

    builtin = builtin_thresholds(path)
    if builtin is not None:
        return VersionThresholds(builtin, SOURCE_BUILTIN)
    return SEED_VERSION_THRESHOLDS


def entry_thresholds(entry: dict[str, Any] | None) -> Thresholds | None:
    """The thresholds a registry entry stores (None: none of its own). A registry edited by
    hand into something invalid raises ValueError naming the problem."""
    if entry is None:
        return None
    return thresholds_from_json(entry.get("thresholds"), "the registry's thresholds")


def resolve_entry(entry: dict[str, Any]) -> VersionThresholds:
    """What a registry entry's version answers with (its path decides builtin or seed)."""
    return resolve_thresholds(entry_thresholds(entry), entry["path"])
