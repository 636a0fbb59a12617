"""Names on disk of the flash tier, commit records, and which steps are complete.

::

    <root>/<job_id>/
        steps/step-000000000120/rank-00000.obj      one object per rank (header, data, meta)
        steps/step-000000000120/rank-00000.commit   written last, by rename: names the objects
        pool/rank-00000/buf-1a2b3c...               free pre-faulted buffers of rank 0
        locks/rank-00000.lock                       held (flock) by the live writer of rank 0

A step is complete when every rank of its world size has a commit record (DESIGN decision 3).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import config
from ..atomic import write_atomic
from .errors import FlashSpaceError

__all__ = ["CommitRecord", "FlashLayout", "RankLock", "RankLockedError"]

_STEP = re.compile(r"^step-(\d{12})$")
_COMMIT = re.compile(r"^rank-(\d{5})\.commit$")
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB.match(job_id) or job_id in (".", ".."):
        raise ValueError(
            f"job_id={job_id!r} is not accepted; use 1-128 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit, unique per job and the same across its restarts (e.g. the run id)"
        )
    return job_id


class RankLockedError(RuntimeError):
    """Another live process writes this rank of this job."""


@dataclass(frozen=True)
class CommitRecord:
    step: int
    rank: int
    world_size: int
    objects: list[dict]  # {"name", "size", "header_hash"}
    created: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    format: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CommitRecord:
        return cls(**json.loads(raw))


_LOCKS: weakref.WeakSet[RankLock] = weakref.WeakSet()


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close, never unlock, the parent's lock files, so the lock
    dies with the writer and not with its last child."""
    for lock in list(_LOCKS):
        if lock._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = -1


os.register_at_fork(after_in_child=_close_inherited_locks)


class RankLock:
    """An exclusive flock on ``locks/rank-N.lock``; the kernel drops it when its process dies."""

    def __init__(self, path: Path, rank: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise RankLockedError(
                f"rank {rank} of flash job {path.parent.parent.name!r} is already written by a live process "
                f"({holder}); give each process its own rank, or another job_id"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        _LOCKS.add(self)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class FlashLayout:
    """Paths and commit bookkeeping of one job under one flash root."""

    def __init__(self, root: str | os.PathLike | None, job_id: str) -> None:
        self.root = Path(root).expanduser() if root is not None else config.flash_root()
        self.job_id = check_job_id(job_id)
        self.job_dir = self.root / job_id
        self.steps_dir = self.job_dir / "steps"

    def step_dir(self, step: int) -> Path:
        return self.steps_dir / f"step-{step:012d}"

    @staticmethod
    def object_name(rank: int) -> str:
        return f"rank-{rank:05d}.obj"

    def object_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / self.object_name(rank)

    def commit_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / f"rank-{rank:05d}.commit"

    def pool_dir(self, rank: int) -> Path:
        return self.job_dir / "pool" / f"rank-{rank:05d}"

    def lock(self, rank: int) -> RankLock:
        return RankLock(self.job_dir / "locks" / f"rank-{rank:05d}.lock", rank)

    # steps and commits

    def steps(self) -> list[int]:
        try:
            names = os.listdir(self.steps_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP.match(n)))

    def commits(self, step: int) -> dict[int, CommitRecord]:
        """The readable commit records of a step, by rank."""
        records: dict[int, CommitRecord] = {}
        try:
            names = os.listdir(self.step_dir(step))
        except FileNotFoundError:
            return records
        for name in names:
            if m := _COMMIT.match(name):
                record = self.read_commit(step, int(m.group(1)))
                if record is not None:
                    records[record.rank] = record
        return records

    def commit_index(self) -> list[tuple[int, int, int]]:
        """(step, rank, world size) of every readable commit record under this root."""
        return sorted(
            (step, rank, record.world_size)
            for step in self.steps()
            for rank, record in self.commits(step).items()
        )

    def unreadable_commits(self) -> list[Path]:
        """Commit records that exist but cannot be read: evidence of a committed object, never a leftover."""
        found = []
        for step in self.steps():
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.step_dir(step)):
                    m = _COMMIT.match(name)
                    if (
                        m
                        and self.read_commit(step, int(m.group(1))) is None
                        and self.commit_path(step, int(m.group(1))).exists()
                    ):
                        found.append(self.commit_path(step, int(m.group(1))))
        return sorted(found)

    def read_commit(self, step: int, rank: int) -> CommitRecord | None:
        try:
            record = CommitRecord.from_json(self.commit_path(step, rank).read_bytes())
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return record if record.step == step and record.rank == rank else None

    def write_commit(self, record: CommitRecord) -> None:
        """Atomic: the record is whole or absent, so a step is never half-committed by a rank."""
        path = self.commit_path(record.step, record.rank)
        try:
            # the scratch name ``_clean_stale`` knows: a kill -9 mid-write leaves nothing it misses
            write_atomic(path, record.to_json(), scratch=path.with_name(f"{path.name}.{os.getpid()}.tmp"))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FlashSpaceError(
                    exc.errno,
                    f"no space in {path.parent} for the commit record of step {record.step}; "
                    "committed checkpoints are intact",
                ) from None
            raise

    def remove_commit(self, step: int, rank: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.commit_path(step, rank))

    def is_complete(self, step: int, world_size: int, commits: dict[int, CommitRecord] | None = None) -> bool:
        commits = self.commits(step) if commits is None else commits
        return all(
            (r := commits.get(rank)) is not None and r.world_size == world_size for rank in range(world_size)
        )

    def complete_steps(self, world_size: int) -> list[int]:
        return [step for step in self.steps() if self.is_complete(step, world_size)]

    def remove_step_if_abandoned(self, step: int) -> None:
        """Remove a step directory once no rank's object or commit record is left in it (with what
        belonged to the step as a whole, such as DCP metadata)."""
        directory = self.step_dir(step)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        if any(name.startswith("rank-") and name.endswith((".obj", ".commit")) for name in names):
            return
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(directory / name)
        with contextlib.suppress(OSError):
            os.rmdir(directory)
