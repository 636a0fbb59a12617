"""What happened inside an attempt (flash saves, restores, uploads, preemption, elastic restarts), from
every rank, for the run's records.

The training loop only appends to a list (``record``) or sets an attribute (``progress``, the newest
step reached): a daemon thread writes them as JSON lines to a file of this process under the
attempt's directory, at once after each event, the step reached every half second, and once more at
exit. The runner adds them to the run's records when the attempt ends (``read``). A process killed
mid-write loses what the thread had not written yet and leaves at most one torn line, which ``read``
skips. Outside a task nothing is written; every event is tallied in memory either way
(``stalwart.metrics``), for the trainer's log and Prometheus.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from .. import config
from ..metrics import tally

__all__ = ["Event", "progress", "reached_before", "read", "record"]

FLUSH_EVERY = 0.5  # seconds
_DIR = "events"


class Event(NamedTuple):
    """One recorded event of an attempt."""

    time: float
    rank: int
    restart: int  # torch elastic's restart round
    kind: str
    fields: dict


class _Recorder:
    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        rank = os.environ.get("RANK", "0")
        self.path = directory / _DIR / f"rank{rank}-pid{self.pid}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = int(rank) if rank.isdigit() else 0
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.restart = int(restart) if restart.isdigit() else 0
        self.pending: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        self.step: int | None = None
        self.written_step: int | None = None
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="stalwart-events", daemon=True).start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            self.wake.wait(FLUSH_EVERY)
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        with self.lock:  # the background thread and the exit hook may both flush: each line once
            pending, self.pending = self.pending, []
            step = self.step
            if step is not None and step != self.written_step:
                pending.append((time.time(), "progress", {"step": step}))
                self.written_step = step
        if not pending:
            return
        lines = "".join(
            json.dumps([at, self.rank, self.restart, kind, fields], separators=(",", ":")) + "\n"
            for at, kind, fields in pending
        )
        try:
            with open(self.path, "a") as fh:
                fh.write(lines)
        except OSError:  # the attempt's directory is gone (the run was removed): nothing to keep
            pass


_recorder: _Recorder | None = None
_lock = threading.Lock()


def _get() -> _Recorder | None:
    global _recorder
    current = _recorder
    if current is not None and current.pid == os.getpid():
        return current
    directory = config.attempt_dir()
    if directory is None:
        return None
    with _lock:
        if _recorder is None or _recorder.pid != os.getpid():  # a forked child records on its own
            try:
                _recorder = _Recorder(directory)
            except OSError:
                return None
        return _recorder


def record(kind: str, **fields: Any) -> None:
    """Note an event of this process now (written in the background; nothing outside a task)."""
    tally.add(kind, fields)
    recorder = _get()
    if recorder is not None:
        entry = (time.time(), kind, fields)
        with recorder.lock:
            recorder.pending.append(entry)
        recorder.wake.set()  # written within moments, by the thread: a kill right after loses little


def progress(step: int) -> None:
    """The newest step this rank reached: written (as a "progress" event) when it changed."""
    tally.reached(step)
    recorder = _get()
    if recorder is not None:
        recorder.step = step


def read(attempt_dir: str | os.PathLike) -> list[Event]:
    """Every event the processes of an attempt wrote, oldest first (torn lines skipped)."""
    found: list[Event] = []
    for path in sorted(Path(attempt_dir, _DIR).glob("*.jsonl")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                at, rank, restart, kind, fields = json.loads(line)
            except (ValueError, TypeError):
                continue  # the last line of a killed process
            if isinstance(kind, str) and isinstance(fields, dict):
                found.append(Event(float(at), int(rank), int(restart), kind, fields))
    return sorted(found, key=lambda e: e.time)


_REACHING = frozenset({"progress", "flash_save", "preempted"})  # events that say a step was reached


def reached_before() -> int | None:
    """The newest step rank 0 reached in the earlier rounds of this task's run (earlier attempts, and
    the worker groups torch elastic restarted in this one), from their event files: a restore of an
    older step recomputes the difference. None outside a task or before any step."""
    directory = config.attempt_dir()
    if directory is None:
        return None
    own = f"-pid{os.getpid()}.jsonl"
    newest: int | None = None
    for path in directory.parent.glob(f"attempt-*/{_DIR}/rank0-pid*.jsonl"):
        if path.name.endswith(own) and path.parent.parent == directory:
            continue
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                _at, _rank, _restart, kind, fields = json.loads(line)
                step = fields.get("step") if kind in _REACHING else None
            except (ValueError, TypeError, AttributeError):
                continue
            if isinstance(step, int) and (newest is None or step > newest):
                newest = step
    return newest
