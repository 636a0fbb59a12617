"""What became of an attempt: its result file read back, or its exit status explained.

The runner reads the result file the attempt process left (``protocol``) and unpickles the task's
output here, where the task's script is ``__main__``. An attempt killed by SIGKILL is said to be
the OOM killer's doing only when the kernel counted an OOM kill in its cgroup meanwhile.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import RESULT_FILE, AttemptResult, loads

__all__ = ["Outcome", "describe_exit", "load_output", "oom_kill_count", "oom_killed", "read_outcome"]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: str  # succeeded, failed, killed, exited, preempted
    description: str | None  # a predicate: "raised ValueError: ...", "was killed by SIGKILL"
    exit_code: int | None
    result: AttemptResult | None
    output: Any = None
    retryable: bool = True
    oom: bool = False  # killed by the kernel's OOM killer (counted in the cgroup meanwhile)
    timed_out: str | None = None  # "max_runtime" or "deadline": the runner stopped it (``Timeout``)


def oom_kill_count(cgroup_file: str | Path | None = None) -> int | None:
    """The kernel's count of OOM kills in this process's memory cgroup; None when it cannot be read.

    cgroup v2 keeps it in ``memory.events``, v1 in ``memory.oom_control`` (both ``oom_kill N``).
    """
    path = Path(cgroup_file) if cgroup_file is not None else _own_oom_file()
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^oom_kill (\d+)$", text, re.M)
    return int(match.group(1)) if match else None


def _own_oom_file() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates += [
                Path("/sys/fs/cgroup", relative, "memory.events"),
                Path("/sys/fs/cgroup/unified", relative, "memory.events"),
            ]
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory", relative, "memory.oom_control"))
    # Only the cgroup's own file: a parent's (the host's) counts other processes' OOM kills too.
    return next((c for c in candidates if c.is_file()), None)


def oom_killed(code: int, oom_kills: tuple[int | None, int | None]) -> int:
    """How many OOM kills the cgroup counted while an attempt that died of SIGKILL ran (0: no evidence
    that the OOM killer did it)."""
    before, after = oom_kills
    if code != -signal.SIGKILL or before is None or after is None:
        return 0
    return max(0, after - before)


def describe_exit(code: int, oom_kills: tuple[int | None, int | None] = (None, None)) -> str:
    """An exit status without a result file, as a predicate (``attempt 3 <was killed by SIGKILL>``)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if killed := oom_killed(code, oom_kills):
            return (
                f"was killed by {name}, while the kernel's OOM killer killed {killed} process"
                f"{'es' * (killed != 1)} of its cgroup (out of memory)"
            )
        return f"was killed by {name}"
    return f"exited with code {code} without reporting a result"


def read_outcome(attempt_dir: Path, code: int, oom_kills: tuple[int | None, int | None]) -> Outcome:
    """The outcome of the attempt that ran in ``attempt_dir`` and exited with ``code``."""
    result: AttemptResult | None = None
    result_path = attempt_dir / RESULT_FILE
    if result_path.exists():
        try:
            result = loads(result_path.read_bytes())
        except Exception as exc:
            return Outcome(False, "failed", f"left a result that could not be read: {exc}", code, None)
    if result is not None and result.ok and code == 0:
        try:
            output = _unpickle_output(result)
        except Exception as exc:  # the next attempt would return the same thing
            description = f"returned a value that cannot be unpickled here: {type(exc).__name__}: {exc}"
            return Outcome(False, "failed", description, code, result, retryable=False)
        return Outcome(True, "succeeded", None, code, result, output)
    if result is not None and not result.ok:
        if getattr(result, "preempted", False):  # a result file of an older stalwart has no such field
            return Outcome(False, "preempted", f"was preempted: {result.error_message}", code, result)
        if result.description:  # an elastic attempt: which worker failed first, and how
            description = f"failed: {result.description}"
        else:
            description = f"raised {result.error_type}: {result.error_message}"
        return Outcome(False, "failed", description, code, result, retryable=result.retryable)
    status = "killed" if code < 0 else "exited"
    oom = oom_killed(code, oom_kills) > 0
    return Outcome(False, status, describe_exit(code, oom_kills), code, None, oom=oom)


def load_output(attempt_dir: str | Path) -> Any:
    """The output of a succeeded attempt, from the result file it left (FileNotFoundError if gone)."""
    result = loads((Path(attempt_dir) / RESULT_FILE).read_bytes())
    if not isinstance(result, AttemptResult) or not result.ok:
        raise ValueError(f"{Path(attempt_dir) / RESULT_FILE} does not hold a successful result")
    return _unpickle_output(result)


def _unpickle_output(result: AttemptResult) -> Any:
    if result.output_pickle is None:
        # A result file of an older stalwart held the output itself, already unpickled with the result.
        return vars(result).get("output")
    return loads(result.output_pickle)
