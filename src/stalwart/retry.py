"""Retry policy of a task: how many more attempts, and how long to wait between them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from .checks import int_at_least

__all__ = ["Backoff", "NonRetryableError", "RetryStrategy", "as_retry_strategy"]


class NonRetryableError(Exception):
    """Raise (or subclass) inside a task to fail the run at once: retrying would not help.

    Bad inputs and configuration errors belong here; a crash, an OOM kill or a flaky network do not.
    """


def _positive_number(field: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"{field}={value!r} is not accepted; use a finite number of seconds, e.g. 1.0, or a "
            "datetime.timedelta"
        )
    if value < 0 or (value == 0 and not allow_zero):
        lowest = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field}={value!r} is not accepted; use a number {lowest}")
    return float(value)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: wait ``min(cap, base * factor ** (retry - 1))`` seconds before retry n (n >= 1).

    A delay gives a flaky dependency (a preempted node, a storage outage) time to come back before the
    next attempt spends its start-up cost. ``base`` and ``cap`` are seconds or ``datetime.timedelta``
    (kept as seconds).

    Args:
        base: the wait before the first retry.
        factor: how much each wait grows over the previous one (>= 1).
        cap: the longest wait.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", _positive_number("Backoff.base", self.base, allow_zero=True))
        object.__setattr__(self, "cap", _positive_number("Backoff.cap", self.cap, allow_zero=True))
        if _positive_number("Backoff.factor", self.factor, allow_zero=False) < 1:
            raise ValueError(f"Backoff.factor={self.factor!r} is not accepted; use a number >= 1")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        if retry < 1:
            return 0.0
        try:
            return min(self.cap, self.base * self.factor ** (retry - 1))
        except OverflowError:
            return self.cap


@dataclass(frozen=True)
class RetryStrategy:
    """``count`` retries after the first attempt, so at most ``count + 1`` attempts in all.

    Args:
        count: retries after the first attempt (>= 0).
        backoff: how long to wait before each retry; None: retry at once.
    """

    count: int
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        int_at_least("retries", self.count, 0, note=", e.g. retries=3")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise ValueError(
                f"backoff={self.backoff!r} is not accepted; use None or Backoff(base, factor, cap)"
            )

    @property
    def max_attempts(self) -> int:
        return self.count + 1

    def delay(self, retry: int) -> float:
        return self.backoff.delay(retry) if self.backoff else 0.0


def as_retry_strategy(retries: int | RetryStrategy | None) -> RetryStrategy:
    """Normalise the ``retries=`` argument of a task."""
    if retries is None:
        return RetryStrategy(0)
    if isinstance(retries, RetryStrategy):
        return retries
    if isinstance(retries, int) and not isinstance(retries, bool):
        return RetryStrategy(retries)
    raise ValueError(
        f"retries={retries!r} is not accepted; use an int >= 0 or RetryStrategy(count, backoff=Backoff(...))"
    )
