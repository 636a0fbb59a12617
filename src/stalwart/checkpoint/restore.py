"""The local directory a task checkpoint is restored into, shared by every process that restores there.

All torch elastic workers of a node restore the same attempt's checkpoint into one ``path``, and nodes
may share that filesystem. So nothing is ever written where a reader looks:

- One restore at a time: an exclusive ``flock`` on ``path/.stalwart-restore/lock`` (flock also works
  across NFS clients on Linux). The first process downloads and extracts; the others wait, then reuse
  the verified result.
- Downloads and extractions go to private scratch names under ``path/.stalwart-restore/`` and are
  published by ``rename`` (atomic on one filesystem): a payload as ``path/payload``, a directory as
  ``path/<version>``. A reader sees a whole checkpoint or none.
- A published directory is never deleted while any process uses it: each process that was handed
  ``path/<version>`` holds a shared ``flock`` on ``<version>.hold`` until it exits. A directory nobody
  holds is stale (left by processes that have exited, possibly modified by them): the next restore of
  that version extracts it afresh, and restores of other versions delete it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic import write_atomic

__all__ = ["BOOKKEEPING", "RestoreArea"]

log = logging.getLogger(__name__)

BOOKKEEPING = ".stalwart-restore"
_VERSION = re.compile(r"^a\d{5}\.s\d{6}$")
_SCRATCH = "scratch-"

# Shared locks on the ``.hold`` files of the directories this process was handed, kept open until exit.
_HOLDS: dict[str, int] = {}
_HOLDS_LOCK = threading.Lock()


class RestoreArea:
    """``path`` as a place several processes restore checkpoints into (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = self.root / BOOKKEEPING

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the restore lock of ``root``; scratch left by a process that died holding it is removed."""
        self.meta.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process restoring a checkpoint into %s", self.root)
                fcntl.flock(fd, fcntl.LOCK_EX)
            for leftover in self.meta.glob(f"{_SCRATCH}*"):  # scratch is only made under this lock
                _remove(leftover)
            yield
        finally:
            os.close(fd)  # releases the lock

    def scratch(self, suffix: str = "") -> Path:
        """A fresh private name on the same filesystem as ``root`` (call under :meth:`exclusive`)."""
        return self.meta / f"{_SCRATCH}{secrets.token_hex(8)}{suffix}"

    # payloads: bytes, files, objects

    def file(self, version: str, sha256: str, fetch: Callable[[Path], None]) -> Path:
        """``root/payload`` holding ``version``'s payload; ``fetch(dest)`` downloads and verifies it.

        A payload already published for the same bytes (recorded with its inode, size and mtime, so a
        modified copy does not count) is reused; otherwise the new one replaces it by rename, so a
        process that already opened the old payload keeps reading whole bytes.
        """
        target = self.root / "payload"
        record = self.meta / "payload.json"
        with self.exclusive():
            if _record_matches(record, target, sha256):
                return target
            tmp = self.scratch(".payload")
            try:
                fetch(tmp)
                _fsync(tmp)  # the record below vouches for these bytes after a crash too
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            st = target.stat()
            _write_atomic(
                record,
                json.dumps(
                    {
                        "version": version,
                        "sha256": sha256,
                        "ino": st.st_ino,
                        "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns,
                    }
                ).encode(),
            )
            return target

    # directories

    def directory(self, version: str, build: Callable[[Path], None]) -> Path:
        """``root/<version>``, restored by ``build(dest)`` into a fresh directory unless a process
        using it already published it; held by this process until it exits."""
        if not _VERSION.match(version):
            raise ValueError(f"{version!r} is not a checkpoint version name (aNNNNN.sNNNNNN)")
        target = self.root / version
        hold = self.meta / f"{version}.hold"
        with self.exclusive():
            if target.is_dir() and not target.is_symlink() and _held(hold):
                _acquire_hold(hold)
                return target
            staging = self.scratch()
            try:
                staging.mkdir()
                build(staging)
                if os.path.lexists(target):  # stale: nobody holds it
                    self._discard(target)
                os.rename(staging, target)
            finally:
                if staging.exists():
                    _remove(staging)
            _acquire_hold(hold)
            self._sweep(keep=version)
            return target

    def _discard(self, path: Path) -> None:
        """Remove ``path`` at once (rename into scratch, then delete), never leaving half of it visible."""
        doomed = self.scratch()
        os.rename(path, doomed)
        _remove(doomed)

    def _sweep(self, keep: str) -> None:
        """Delete restored directories of other versions that no process holds (call under the lock)."""
        for child in self.root.iterdir():
            name = child.name
            if name == keep or not _VERSION.match(name) or not child.is_dir() or child.is_symlink():
                continue
            hold = self.meta / f"{name}.hold"
            fd = _try_exclusive(hold)
            if fd is None:
                continue  # still in use
            try:
                self._discard(child)
                hold.unlink(missing_ok=True)  # holds are only taken under the restore lock we hold
            finally:
                os.close(fd)


def _try_exclusive(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path`` if no process holds it, else None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _held(hold: Path) -> bool:
    """Whether some live process (this one included) holds ``hold``."""
    with _HOLDS_LOCK:
        if str(hold) in _HOLDS:
            return True
    fd = _try_exclusive(hold)
    if fd is None:
        return True
    os.close(fd)
    return False


def _acquire_hold(hold: Path) -> None:
    with _HOLDS_LOCK:
        if str(hold) in _HOLDS:
            return
        fd = os.open(hold, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _HOLDS[str(hold)] = fd


def _record_matches(record: Path, target: Path, sha256: str) -> bool:
    try:
        saved = json.loads(record.read_bytes())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(saved, dict)
        and saved.get("sha256") == sha256
        and (
            saved.get("ino"),
            saved.get("size"),
            saved.get("mtime_ns"),
        )
        == (st.st_ino, st.st_size, st.st_mtime_ns)
    )


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data, scratch=path.with_name(f"{_SCRATCH}{secrets.token_hex(8)}.json"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=False)
    else:
        path.unlink(missing_ok=True)
