"""Run records in SQLite: runs, their attempts, and events, under the stalwart home directory.

Short-lived connections in WAL mode, so the runner, the CLI and other runners can read and write the
same file at once. A damaged file is reported as ``RunRecordsError`` naming it and what to do; it is never
repaired, replaced or deleted here, since it holds the records of every other run.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AttemptRecord", "EventRecord", "RunRecord", "RunRecords", "RunRecordsError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    max_attempts INTEGER NOT NULL,
    checkpoint_uri TEXT,
    inputs TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL REFERENCES runs(id),
    number INTEGER NOT NULL,
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    error TEXT,
    log_dir TEXT,
    PRIMARY KEY (run_id, number)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    attempt INTEGER,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, time);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs(created);
"""

# SQLite's primary result codes for a file that is not (or no longer) a well-formed database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


class RunRecordsError(RuntimeError):
    """The run-record database cannot be used; the message names the file and what to do."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _is_damaged(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _damaged(path: Path, detail: str) -> RunRecordsError:
    return RunRecordsError(
        f"the run records file {path} is damaged ({detail}); stalwart leaves it as it is. "
        f"Move it aside to start a new one: mv {path} {path}.damaged (the records of the other runs may "
        f"be recovered from the moved file with `sqlite3 {path}.damaged .recover`; checkpoints and "
        "attempt logs are kept elsewhere and are not affected)",
        path,
    )


def _store_error(path: Path, exc: sqlite3.Error) -> RunRecordsError:
    if _is_damaged(exc):
        return _damaged(path, str(exc))
    return RunRecordsError(f"cannot use the run records file {path}: {exc}", path)


@dataclass(frozen=True)
class RunRecord:
    id: str
    task: str
    status: str
    created: float
    ended: float | None
    max_attempts: int
    checkpoint_uri: str | None
    inputs: dict
    error: str | None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.created


@dataclass(frozen=True)
class AttemptRecord:
    run_id: str
    number: int
    pid: int | None
    started: float
    ended: float | None
    status: str
    exit_code: int | None
    error: str | None
    log_dir: str | None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass(frozen=True)
class EventRecord:
    run_id: str
    attempt: int | None
    time: float
    kind: str
    message: str | None


class RunRecords:
    """The SQLite file of run records (``<home>/runs.db``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            with db:
                yield db
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from exc
        finally:
            db.close()

    def check(self) -> None:
        """Raise RunRecordsError if any page of the file is damaged (SQLite's quick_check).

        The runner checks before a run, so damage is reported before an attempt starts rather than
        by whichever write first touches a bad page.
        """
        with self._connect() as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            detail = " ".join(str(row[0]) for row in rows[:3])
            raise _damaged(self.path, " ".join(detail.split())[:300])

    # writes

    def create_run(
        self, run_id: str, task: str, max_attempts: int, checkpoint_uri: str | None, inputs: dict
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (id, task, status, created, max_attempts, checkpoint_uri, inputs) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (run_id, task, time.time(), max_attempts, checkpoint_uri, json.dumps(inputs)),
            )
        self.add_event(run_id, None, "run_started", f"task {task}, at most {max_attempts} attempts")

    def reopen_run(self, run_id: str, max_attempts: int, inputs: dict | None = None) -> None:
        """Mark a run running again for more attempts (with new inputs when it is run again anew)."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status='running', ended=NULL, error=NULL, max_attempts=? WHERE id=?",
                (max_attempts, run_id),
            )
            if inputs is not None:
                db.execute("UPDATE runs SET inputs=? WHERE id=?", (json.dumps(inputs), run_id))
        self.add_event(run_id, None, "run_resumed", f"at most {max_attempts} more attempts")

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, ended=?, error=? WHERE id=?", (status, time.time(), error, run_id)
            )
        self.add_event(run_id, None, f"run_{status}", error)

    def start_attempt(self, run_id: str, number: int, pid: int, log_dir: str) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO attempts (run_id, number, pid, started, status, log_dir) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                (run_id, number, pid, time.time(), log_dir),
            )
        self.add_event(run_id, number, "attempt_started", f"pid {pid}")

    def finish_attempt(
        self, run_id: str, number: int, status: str, exit_code: int | None, error: str | None
    ) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE attempts SET status=?, ended=?, exit_code=?, error=? WHERE run_id=? AND number=?",
                (status, time.time(), exit_code, error, run_id, number),
            )
        self.add_event(run_id, number, f"attempt_{status}", error)

    def add_event(self, run_id: str, attempt: int | None, kind: str, message: str | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO events (run_id, attempt, time, kind, message) VALUES (?, ?, ?, ?, ?)",
                (run_id, attempt, time.time(), kind, message),
            )

    def add_events(self, run_id: str, attempt: int | None, rows: list[tuple[float, str, str]]) -> None:
        """Many events of an attempt at once: (time, kind, message) each."""
        if not rows:
            return
        with self._connect() as db:
            db.executemany(
                "INSERT INTO events (run_id, attempt, time, kind, message) VALUES (?, ?, ?, ?, ?)",
                [(run_id, attempt, at, kind, message) for at, kind, message in rows],
            )

    # reads

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, task, status, created, ended, max_attempts, checkpoint_uri, inputs, error "
                "FROM runs WHERE id=?",
                (run_id,),
            ).fetchone()
        return _run(row) if row else None

    def find_runs(self, prefix: str) -> list[RunRecord]:
        """Runs whose id starts with ``prefix`` (so the CLI accepts a unique prefix)."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, task, status, created, ended, max_attempts, checkpoint_uri, inputs, error "
                "FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY created DESC",
                (escaped + "%",),
            ).fetchall()
        return [_run(r) for r in rows]

    def list_runs(self, limit: int = 20) -> list[RunRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, task, status, created, ended, max_attempts, checkpoint_uri, inputs, error "
                "FROM runs ORDER BY created DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_run(r) for r in rows]

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_id, number, pid, started, ended, status, exit_code, error, log_dir "
                "FROM attempts WHERE run_id=? ORDER BY number",
                (run_id,),
            ).fetchall()
        return [AttemptRecord(*r) for r in rows]

    def events(self, run_id: str) -> list[EventRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_id, attempt, time, kind, message FROM events WHERE run_id=? ORDER BY time, rowid",
                (run_id,),
            ).fetchall()
        return [EventRecord(*r) for r in rows]


def _run(row: tuple) -> RunRecord:
    run_id, task, status, created, ended, max_attempts, checkpoint_uri, inputs, error = row
    decoded = json.loads(inputs) if inputs else {}
    return RunRecord(run_id, task, status, created, ended, max_attempts, checkpoint_uri, decoded, error)
