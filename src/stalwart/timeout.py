"""``Timeout``: wall-clock bounds on a task, with the Flyte SDK's fields.

- ``max_runtime``: per attempt. An attempt still running then is told to stop (SIGTERM: a flash
  checkpointer saves its step first), killed after a grace period, and retried like a failure.
- ``deadline``: the whole run, from its first attempt's start, across retries and backoffs. When it
  passes, the attempt running is stopped the same way and the run fails with no retry.
- ``max_queued_time``: accepted for Flyte programs; a local run never queues, so it never fires.

A bare int (seconds) or ``timedelta`` given as ``timeout=`` is ``max_runtime``; 0 or None is no bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Timeout", "as_timeout", "seconds"]


def seconds(field: str, value: object) -> float | None:
    """``value`` (seconds as an int or float, or a ``timedelta``) in seconds; None for no bound (None
    or 0); a ValueError naming ``field`` for anything else."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{field}={value!r} is not accepted; use seconds (an int or float >= 0), a datetime.timedelta, "
            "or None (0 and None mean no bound)"
        )
    return float(value) or None


@dataclass(frozen=True)
class Timeout:
    """Wall-clock bounds on a task: per attempt (``max_runtime``) and for the whole run
    (``deadline``); see the module docstring.

    Args:
        max_runtime: an attempt running longer gets SIGTERM (a flash checkpointer saves its step), is
            killed after a grace period and is retried.
        max_queued_time: the longest a pod may wait to be scheduled (for Kubernetes manifests).
        deadline: the whole run's bound: past it the attempt is stopped and no retry follows.

    Each is seconds, a ``datetime.timedelta``, or None (0 too) for no bound.
    """

    max_runtime: timedelta | int | float | None = None
    max_queued_time: timedelta | int | float | None = None
    deadline: timedelta | int | float | None = None

    def __post_init__(self) -> None:
        for name in ("max_runtime", "max_queued_time", "deadline"):
            seconds(f"Timeout.{name}", getattr(self, name))

    @property
    def runtime_seconds(self) -> float | None:
        return seconds("Timeout.max_runtime", self.max_runtime)

    @property
    def deadline_seconds(self) -> float | None:
        return seconds("Timeout.deadline", self.deadline)


def as_timeout(value: object) -> Timeout | None:
    """Normalise the ``timeout=`` argument of a task: a ``Timeout``, seconds, a ``timedelta``, or None."""
    if value is None or isinstance(value, Timeout):
        return value
    if isinstance(value, (int, float, timedelta)) and not isinstance(value, bool):
        return Timeout(max_runtime=value)
    raise ValueError(
        f"timeout={value!r} is not accepted; use seconds, a datetime.timedelta (the limit of each "
        "attempt), stalwart.Timeout(max_runtime=..., deadline=...), or None"
    )
