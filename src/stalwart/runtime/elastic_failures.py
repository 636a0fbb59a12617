"""Which worker of an elastic attempt failed first, and how: the cause, not its consequences.

When one worker fails, the others fail after it: torch elastic's agent stops them with SIGTERM, and a
worker waiting in a collective for the dead one fails with a connection error of its own. torch's
error files have one-second timestamps, so "the smallest timestamp" often names one of those. Each
worker therefore leaves a report when it raises (its exception, pickled, with a precise time, and
whether it only lost a peer), and the attempt picks, in this order: a worker that raised an error of
its own or died of a signal the agent did not send, then one that lost a peer, then one the agent
stopped; the earliest within each kind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from .protocol import AttemptResult

__all__ = [
    "WorkerFailedError",
    "WorkerFailure",
    "first_failure",
    "peer_loss",
    "preemption_reported",
    "read_report",
    "write_report",
]

REPORT_PREFIX = "worker-failure-"
AGENT_STOP_SIGNAL = signal.SIGTERM  # what torch elastic's agent sends the workers it tears down

# Messages of torch.distributed's errors (RuntimeError subclasses) when a peer went away, from gloo,
# NCCL or the c10d store: a consequence of another worker's failure, not a cause.
_PEER_LOSS_TEXT = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


@dataclass(frozen=True)
class WorkerReport:
    """What a worker that raised left behind for its agent."""

    pid: int
    rank: int
    time: float
    peer_lost: bool
    result: AttemptResult  # ok=False: the exception, pickled, its traceback and retryability


class WorkerFailedError(Exception):
    """An elastic attempt failed; ``result`` describes its first failed worker for the runner."""

    def __init__(self, result: AttemptResult) -> None:
        super().__init__(result.description)
        self.result = result


def peer_loss(exc: BaseException) -> str | None:
    """The sign that another worker died under this one (e.g. "Connection reset by peer"), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RuntimeError):  # what torch.distributed raises; not a user's OSError
            text = str(current)
            found = next((t for t in _PEER_LOSS_TEXT if t in text), None)
            if found is not None:
                return found
            if type(current).__name__ == "DistNetworkError":
                return f"{type(current).__name__}: {text[:120]}"
        todo += [current.__cause__, current.__context__]
    return None


def report_path(attempt_dir: str | Path, pid: int) -> Path:
    return Path(attempt_dir) / f"{REPORT_PREFIX}{pid}.pkl"


def write_report(attempt_dir: str | Path, result: AttemptResult, peer_lost: bool) -> WorkerReport:
    """Leave this worker's failure for its agent (called as the exception leaves the task)."""
    report = WorkerReport(os.getpid(), int(os.environ.get("RANK", "0")), time.time(), peer_lost, result)
    write_atomic(report_path(attempt_dir, report.pid), pickle.dumps(report), fsync=True)
    return report


def read_report(attempt_dir: str | Path, pid: int) -> WorkerReport | None:
    try:
        report = pickle.loads(report_path(attempt_dir, pid).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None
    return report if isinstance(report, WorkerReport) and report.pid == pid else None


def preemption_reported(attempt_dir: str | Path) -> WorkerReport | None:
    """The first report of a worker that saved its step and stopped on SIGTERM (``Preempted``), if any."""
    reports = []
    for path in Path(attempt_dir).glob(f"{REPORT_PREFIX}*.pkl"):
        pid = path.stem.removeprefix(REPORT_PREFIX)
        report = read_report(attempt_dir, int(pid)) if pid.isdigit() else None
        if report is not None and report.result.preempted:
            reports.append(report)
    return min(reports, key=lambda r: r.time, default=None)


def clear_reports(attempt_dir: str | Path) -> None:
    for path in Path(attempt_dir).glob(f"{REPORT_PREFIX}*.pkl"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class WorkerFailure:
    """One failed worker of the last round, as the agent saw it plus what it reported."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    seen: float  # when the agent saw it (its own clock, one-second resolution)
    report: WorkerReport | None

    @property
    def stopped_by_agent(self) -> bool:
        return self.report is None and self.exitcode == -AGENT_STOP_SIGNAL

    @property
    def kind(self) -> int:
        """0: failed on its own, 1: lost a peer, 2: stopped by the agent."""
        if self.report is not None:
            return 1 if self.report.peer_lost else 0
        return 2 if self.stopped_by_agent else 0

    @property
    def time(self) -> float:
        return self.report.time if self.report is not None else self.seen

    @property
    def retryable(self) -> bool:
        return self.report is None or self.report.result.retryable

    def what(self, *, detail: bool = True) -> str:
        """How this worker failed, as a predicate: "raised ValueError: ...", "was killed by SIGKILL"."""
        if self.report is not None:
            result = self.report.result
            name = (result.error_type or "").rsplit(".", 1)[-1] or "an exception"
            if self.report.peer_lost:
                return f"lost a peer: {name}: {result.error_message}" if detail else "lost a peer"
            return f"raised {name}: {result.error_message}" if detail else f"raised {name}"
        if self.exitcode < 0:
            name = _signal_name(-self.exitcode)
            return f"was stopped by the agent ({name})" if self.stopped_by_agent else f"was killed by {name}"
        return f"exited with code {self.exitcode}"


def first_failure(
    failures: Mapping[int, Any], attempt_dir: str | Path
) -> tuple[WorkerFailure, list[WorkerFailure]]:
    """The failure that came first (see the module docstring), and the others in the order they came.

    ``failures`` maps global ranks to torch's ``ProcessFailure`` (local_rank, pid, exitcode, timestamp).
    """
    found = [
        WorkerFailure(
            rank=rank,
            local_rank=failure.local_rank,
            pid=failure.pid,
            exitcode=failure.exitcode,
            seen=float(failure.timestamp),
            report=read_report(attempt_dir, failure.pid),
        )
        for rank, failure in failures.items()
    ]
    if not found:
        raise ValueError("no failed worker to choose from")
    ordered = sorted(found, key=lambda f: (f.kind, f.time, f.rank))
    return ordered[0], ordered[1:]


def attempt_result(first: WorkerFailure, others: list[WorkerFailure], restarts: int) -> AttemptResult:
    """The attempt's result: the first failed worker's exception (if it raised) and a description."""
    if first.retryable:
        rounds = f"after {restarts} restart{'s' * (restarts != 1)} of the worker group"
    else:
        rounds = "not restarted: it raised NonRetryableError"
    description = f"worker rank {first.rank} of the elastic task failed first: it {first.what()} ({rounds})"
    if others:
        shown = ", ".join(f"rank {f.rank} {f.what(detail=False)}" for f in others[:4])
        more = f" and {len(others) - 4} more" if len(others) > 4 else ""
        description += f"; then {shown}{more}"
    report = first.report.result if first.report is not None else None
    preempted = all(f.report is not None and f.report.result.preempted for f in [first, *others])
    if preempted:  # every worker saved the step it was told to stop at: a clean stop, not a failure
        description = f"preempted: {report.error_message if report else ''} (every worker stopped at it)"
    return AttemptResult(
        ok=False,
        error_type=report.error_type if report else None,
        error_message=report.error_message if report else f"worker rank {first.rank} {first.what()}",
        traceback=report.traceback if report else None,
        exception=report.exception if report else None,
        retryable=first.retryable,
        description=description,
        preempted=preempted,
    )


def any_non_retryable(failures: Mapping[int, Any], attempt_dir: str | Path) -> bool:
    """True when a failed worker raised NonRetryableError, or every one stopped on a preemption notice
    (its node is going away): restarting the group would not help."""
    reports = [read_report(attempt_dir, failure.pid) for failure in failures.values()]
    if any(report is not None and not report.result.retryable for report in reports):
        return True
    return bool(reports) and all(report is not None and report.result.preempted for report in reports)
