"""Is a new version worse than the old one at serving? The one judge of a bake.

`pool rotate --bake` compares the new version's replies since the switch with the old
version's before it; a fleet rollout compares its canary pool with the rest of the fleet the
same way. Only what the pool itself fell short on counts as an error (internal faults,
failed workers, timeouts, overload: router.protocol.POOL_FAULTS): a producer's bad request says
nothing about a version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_MAX_ERROR_RATE = 0.01  # the new version may fail 1% more of its requests, no more
DEFAULT_MAX_P99_RATIO = 1.5  # ... and its p99 may be 1.5x the old one's, no more
# Errors are judged as a rate over at least this many requests: one failure among the first
# few is not a failure rate.
MIN_REQUESTS = 50
# Latency is judged on a quantile that rests on at least ten replies: a p99 over 1,000 or
# more, a p90 over 200 to 1,000 (a tenth of the replies slower than the limit: a gross
# regression, found early). A p99 over fewer is the slowest few, which one busy moment
# decides: on a 2-core machine a clean v2's p99 over ~750 replies read 2.4x v1's.
P99_REQUESTS = 1000
MIN_LATENCY_REQUESTS = 200
MIN_ERRORS = 2  # one failed request can be one odd input: it alone never ends a bake
# Latency is estimated from histogram buckets (steps of 1.5x, pool.metrics): a p99 within this
# of the old one is never a regression, whatever the ratio.
P99_SLACK_MS = 5.0


@dataclass(frozen=True, slots=True)
class Traffic:
    """One version's (or one pool's) replies over some span."""

    requests: int = 0
    errors: int = 0  # pool faults only
    p99_ms: float | None = None
    p90_ms: float | None = None
    # The replies the latencies are over when not all of them (a bake leaves out its first
    # moments).
    latency_over: int | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency_replies(self) -> int:
        return self.requests if self.latency_over is None else self.latency_over

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": round(self.error_rate, 5)}

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Traffic:
        """The inverse of as_dict (a verdict read back from a pool's status)."""
        return cls(int(fields.get("requests") or 0), int(fields.get("errors") or 0),
                   fields.get("p99_ms"), fields.get("p90_ms"), fields.get("latency_over"))


@dataclass(frozen=True, slots=True)
class BakeLimits:
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    max_p99_ratio: float = DEFAULT_MAX_P99_RATIO

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError("--max-error-rate is a share of requests between 0 and 1")
        if self.max_p99_ratio < 1:
            raise ValueError("--max-p99-ratio is at least 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    regressed: bool
    reason: str | None
    baseline: Traffic
    candidate: Traffic

    def as_dict(self) -> dict[str, Any]:
        return {"regressed": self.regressed, "reason": self.reason,
                "baseline": self.baseline.as_dict(), "candidate": self.candidate.as_dict()}


def judge(baseline: Traffic, candidate: Traffic, limits: BakeLimits,
          names: tuple[str, str] = ("the new version", "the old version")) -> Verdict:
    """Whether `candidate` regressed against `baseline` beyond `limits`; the reason says by
    how much, in words an operator reads in `pool status`."""
    new, old = names
    reason = _error_regression(baseline, candidate, limits, new, old) or \
        _latency_regression(baseline, candidate, limits, new, old)
    return Verdict(reason is not None, reason, baseline, candidate)


def _error_regression(baseline: Traffic, candidate: Traffic, limits: BakeLimits,
                      new: str, old: str) -> str | None:
    # The old version's rate on too few requests is no rate either (1 of 3 would allow 34%).
    allowed = baseline.errors / max(baseline.requests, MIN_REQUESTS) + limits.max_error_rate
    # Too few requests for a rate: judged as if MIN_REQUESTS had come, the rest all fine, so a
    # single early error does not end a bake, and enough errors end it before many more come.
    rate = candidate.errors / max(candidate.requests, MIN_REQUESTS)
    if rate <= allowed or candidate.errors < MIN_ERRORS:
        return None
    return (f"{new} failed {candidate.errors} of {candidate.requests} requests "
            f"({candidate.error_rate:.1%}) where {old} failed {baseline.error_rate:.1%}: over "
            f"the allowed {limits.max_error_rate:.1%} more")


def _latency_regression(baseline: Traffic, candidate: Traffic, limits: BakeLimits,
                        new: str, old: str) -> str | None:
    if baseline.p99_ms is None or baseline.latency_replies < MIN_LATENCY_REQUESTS:
        return None
    allowed = max(baseline.p99_ms * limits.max_p99_ratio, baseline.p99_ms + P99_SLACK_MS)
    replies = candidate.latency_replies
    if candidate.p99_ms is not None and replies >= P99_REQUESTS and candidate.p99_ms > allowed:
        return (f"{new}'s p99 is {candidate.p99_ms:.1f} ms against {old}'s "
                f"{baseline.p99_ms:.1f} ms ({candidate.p99_ms / max(baseline.p99_ms, 1e-9):.2f}x, "
                f"over the allowed {limits.max_p99_ratio}x)")
    if candidate.p90_ms is not None and replies >= MIN_LATENCY_REQUESTS and \
            candidate.p90_ms > allowed:
        return (f"{new}'s p90 is {candidate.p90_ms:.1f} ms against {old}'s p99 of "
                f"{baseline.p99_ms:.1f} ms: a tenth of its {replies} replies took longer than "
                f"the allowed {allowed:.1f} ms ({limits.max_p99_ratio}x {old}'s p99)")
    return None
