"""One rank's shelf of objects in a flash job (its tmpfs): write, commit, verify, drop, and retention.

Both the engine (state dicts) and the DCP adapter (write items) store through it, so there is one
place that knows the commit order:

1. the object's bytes go into a free pool buffer (nothing committed is touched);
2. the header is written last into the buffer, and the buffer is renamed into the step directory;
3. the rank's commit record is written to a temporary name and renamed: from here the rank's share of
   the step exists. Dropping a step goes the other way: commit record first, then the object.

A kill -9 at any point leaves either no commit record (the object is adopted back into the pool at the
next start) or a whole committed object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .board import Board, LocalBoard
from .buffers import GRANULE, Buffer, BufferPool, Mappings
from .copier import Copier
from .errors import FlashError
from .layout import CommitRecord, FlashLayout
from .objects import (
    HEADER_SIZE,
    CorruptObjectError,
    Header,
    dump_meta,
    load_meta,
    object_size,
    plan_tensors,
    seal,
    verify_view,
)

__all__ = ["RankShelf", "StagedObject", "VerifiedObject", "verify_mapped", "verify_object"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedObject:
    """Tensor bytes copied into a buffer, not yet committed (``hashes`` None: not hashed yet)."""

    buffer: Buffer
    meta: bytes
    data_size: int
    chunk_size: int
    hashes: list[int] | None


@dataclass(frozen=True)
class VerifiedObject:
    """A committed object whose header, metadata and every data chunk matched their checksums."""

    step: int
    rank: int
    buffer: Buffer
    header: Header
    meta: bytes  # the pickled part of the meta region (chunk hashes stripped)


class RankShelf:
    """The objects of ``rank`` under a layout: this process is their only writer (it holds the lock).

    A *visitor* (``owner=False``) is a process that reads while another live process owns the rank (a
    training process loading while ``dcp.async_save``'s checkpoint process saves): it takes no lock,
    owns no step, never changes the rank's files, and keeps its buffers in a pool of its own."""

    def __init__(
        self,
        layout: FlashLayout,
        rank: int,
        world_size: int,
        *,
        keep: int,
        copier: Copier,
        board: Board | None = None,
        mapped: Sequence[Buffer] = (),
        owner: bool = True,
    ) -> None:
        """``mapped``: what ``close(keep_mapped=True)`` of an earlier store of this rank handed back."""
        self.layout, self.rank, self.world_size, self.keep = layout, rank, world_size, keep
        self.copier = copier
        self.board: Board = board or LocalBoard(layout, world_size)
        self.owner = owner
        self._lock = layout.lock(rank) if owner else None
        self.mutex = threading.RLock()
        self._held: dict[int, Buffer] = {}  # committed steps of this rank mapped in this process
        self._pins: dict[int, int] = {}  # steps being read (uploads): not dropped until unpinned
        self.own: set[int] = set()
        self._meta_cache: tuple[Any, list, bytes] | None = None
        # told by ``retain`` the newest safe step of this rank until it returns True (done with them)
        self.on_safe: Callable[[int], bool] | None = None
        reuse = Mappings(mapped)
        try:
            if owner:
                self.pool = BufferPool(layout.pool_dir(rank), reuse)
                self._clean_stale(reuse)
                _remove_dead_visitors(layout, rank)
            else:
                self.pool = BufferPool(_visitor_dir(layout, rank, os.getpid()))
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        finally:
            reuse.close()

    # writing

    def object_size(self, skeleton: Any, tensors: Sequence[Any], *, chunk_size: int) -> int:
        """Bytes of the object a save of these tensors makes (header, data, metadata, chunk hashes)."""
        entries, _, data_end = plan_tensors(tensors)
        return object_size(data_end - HEADER_SIZE, len(self._meta(skeleton, entries)), chunk_size)

    def stage(
        self, skeleton: Any, tensors: Sequence[Any], *, chunk_size: int, hash_now: bool
    ) -> StagedObject:
        """The part of a save the caller waits for: plan, then copy the tensors into a free buffer
        (hashing each chunk as it lands when ``hash_now``). Nothing committed is touched."""
        entries, direct, data_end = plan_tensors(tensors)
        meta = self._meta(skeleton, entries)
        data_size = data_end - HEADER_SIZE
        with self.mutex:
            buffer = self.pool.acquire(object_size(data_size, len(meta), chunk_size))
        try:
            hashes = self.copier.copy_in(
                tensors, entries, direct, buffer, data_size, chunk_size, hash_chunks=hash_now
            )
        except BaseException:
            self.release(buffer)
            raise
        return StagedObject(buffer, meta, data_size, chunk_size, hashes)

    def with_skeleton(self, staged: StagedObject, skeleton: Any) -> StagedObject:
        """The staged object with another skeleton in its metadata (the tensor bytes stay where they
        are): for what is known only after the copy, such as DCP's global metadata on the coordinator."""
        _, entries = load_meta(staged.meta)
        meta = dump_meta(skeleton, entries)
        needed = object_size(staged.data_size, len(meta), staged.chunk_size)
        with self.mutex:
            staged.buffer.grow(needed + -needed % GRANULE)
        return dataclasses.replace(staged, meta=meta)

    def _meta(self, skeleton: Any, entries: list) -> bytes:
        """Pickled skeleton and tensor table; reused while neither changes (the usual case)."""
        cached = self._meta_cache
        if cached is not None and cached[0] == skeleton and cached[1] == entries:
            return cached[2]
        meta = dump_meta(skeleton, entries)
        self._meta_cache = (skeleton, entries, meta)
        return meta

    def commit_staged(self, step: int, staged: StagedObject) -> CommitRecord:
        """Hash (if not done yet) and commit a staged object; give its buffer back if that fails."""
        try:
            hashes = staged.hashes
            if hashes is None:
                hashes = self.copier.hash_data(
                    staged.buffer.view, staged.data_size, staged.chunk_size, parallel=False
                )
            return self.commit(step, staged.buffer, staged.meta, staged.data_size, staged.chunk_size, hashes)
        except BaseException:
            self.release(staged.buffer)
            self.layout.remove_step_if_abandoned(step)  # the buffer left it; nothing of this rank remains
            raise

    def acquire(self, size: int) -> Buffer:
        """A free pool buffer of at least ``size`` bytes, for an object read from a peer or the durable
        store (verified there, then made this rank's own with ``adopt_pulled``)."""
        with self.mutex:
            return self.pool.acquire(size)

    def release(self, buffer: Buffer) -> None:
        """Give back a buffer that never committed (a failed save, a refused download)."""
        with self.mutex:
            self.pool.release(buffer)

    def commit(
        self, step: int, buffer: Buffer, meta: bytes, data_size: int, chunk_size: int, hashes: list[int]
    ) -> CommitRecord:
        """Finish an object whose data is in ``buffer``: metadata, header, rename, commit record."""
        end, header_hash = seal(
            buffer.view,
            step,
            self.rank,
            self.world_size,
            data_size=data_size,
            meta=meta,
            chunk_size=chunk_size,
            hashes=hashes,
        )
        record = CommitRecord(
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            objects=[{"name": self.layout.object_name(self.rank), "size": end, "header_hash": header_hash}],
        )
        with self.mutex:
            if step not in self.own and self.layout.read_commit(step, self.rank) is not None:
                raise FlashError(
                    f"step {step} of rank {self.rank} of flash job {self.layout.job_id!r} is committed by "
                    "another run of the job (another world size?); committed steps are never rewritten: "
                    "restore() first, or use a new job_id"
                )
            buffer.move(self.layout.object_path(step, self.rank))
            self.layout.write_commit(record)
            self._held[step] = buffer
            self.own.add(step)
        self.board.committed(step, self.rank)
        return record

    # reading

    def verify(self, step: int) -> VerifiedObject:
        """Map (once) and check this rank's committed object of ``step``."""
        with self.mutex:
            buffer = self._held.get(step)
        verified = verify_object(self.layout, step, self.rank, self.copier, buffer)
        with self.mutex:
            self._held.setdefault(step, verified.buffer)
        return verified

    def adopt_pulled(self, verified: VerifiedObject, record: CommitRecord) -> None:
        """Make an object pulled from a peer or the durable store (verified, in a pool buffer) this rank's
        own, in place of a local copy of the same step that failed verification."""
        with self.mutex:
            if record.step in self.own:
                self.drop(record.step)
            verified.buffer.move(self.layout.object_path(record.step, self.rank))
            self.layout.write_commit(record)
            self._held[record.step] = verified.buffer
            self.own.add(record.step)

    def holdings(self) -> list[tuple[int, int]]:
        """(step, rank) of every committed object in this node's flash root: own, other local ranks',
        and replicas kept for other nodes."""
        found = []
        for step in self.layout.steps():
            for rank, record in self.layout.commits(step).items():
                if record.world_size == self.world_size and self.layout.object_path(step, rank).exists():
                    found.append((step, rank))
        return found

    def other_world_holdings(self) -> list[tuple[int, int, int]]:
        """(step, rank, world size) of every committed object in this node's flash root saved by another
        number of ranks than this job's (a run before the world size changed)."""
        return [
            (step, rank, world)
            for step, rank, world in self.layout.commit_index()
            if world != self.world_size and self.layout.object_path(step, rank).exists()
        ]

    # pins (a reader such as an upload keeps its step alive)

    def pin(self, step: int) -> Buffer:
        with self.mutex:
            self._pins[step] = self._pins.get(step, 0) + 1
            return self._held[step]

    def unpin(self, step: int) -> None:
        with self.mutex:
            self._pins[step] -= 1
            if not self._pins[step]:
                del self._pins[step]

    # dropping and retention

    def drop(self, step: int) -> None:
        """Forget this rank's share of a step: commit record first, then the object goes to the pool."""
        with self.mutex:
            self.layout.remove_commit(step, self.rank)
            self.own.discard(step)
            buffer = self._held.pop(step, None)
            if buffer is not None:
                self.pool.release(buffer)
            else:
                path = self.layout.object_path(step, self.rank)
                if path.exists():
                    self.pool.adopt(path)
            self.layout.remove_step_if_abandoned(step)

    def retain(self) -> None:
        """Keep the newest ``keep`` safe steps and every step newer than the newest safe one; drop the
        rest of this rank's objects.

        A step is safe once the board says so (every rank committed it, and its replicas or metadata
        exist where that is asked for), so the newest safe step is never dropped for a step whose other
        ranks are still writing. A step older than the newest safe one that never became safe (its
        replication was skipped for a newer step) can never be needed again: it goes at once instead of
        holding a buffer until ``keep`` newer steps are safe. Pinned steps wait.
        """
        with self.mutex:
            safe = [s for s in sorted(self.own) if self.board.safe(s)]
            if not safe:
                return
            if self.on_safe is not None and self.on_safe(safe[-1]):
                self.on_safe = None
            kept = set(safe[-self.keep :])
            for step in sorted(self.own):
                if step < safe[-1] and step not in kept and step not in self._pins:
                    self.drop(step)

    def drop_newer_than(self, step: int | None) -> None:
        """Forget own steps after ``step`` (all when None): a restore chose an earlier state, so they
        belong to an abandoned timeline and must never be mixed with what training saves next."""
        with self.mutex:
            for own in sorted(self.own):
                if step is None or own > step:
                    self.drop(own)
            for path in self.layout.unreadable_commits():  # damaged records of this rank after it go too
                found = int(path.parent.name.removeprefix("step-"))
                if path.name == self.layout.commit_path(found, self.rank).name and (
                    step is None or found > step
                ):
                    self.drop(found)

    def _clean_stale(self, mapped: Mappings) -> None:
        """Adopt objects of saves that died before committing; forget commits whose object is gone.

        Steps committed by another number of ranks are left alone: restore refuses to start over while
        they exist, and ``commit`` refuses to write over them."""
        own_name = self.layout.object_name(self.rank)
        commit_prefix = f"rank-{self.rank:05d}.commit"
        for step in self.layout.steps():
            directory = self.layout.step_dir(step)
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(directory):
                    if name.startswith((commit_prefix + ".", own_name + ".")) and name.endswith(
                        (".tmp", ".download")
                    ):
                        Path(directory, name).unlink(missing_ok=True)
            has_object = self.layout.object_path(step, self.rank).exists()
            record = self.layout.read_commit(step, self.rank)
            committed = record is not None
            if record is not None and record.world_size != self.world_size:
                continue  # a checkpoint of another world size: not this store's to reuse or drop
            if record is None and self.layout.commit_path(step, self.rank).exists():
                log.warning(
                    "flash: the commit record %s cannot be read; its object is kept, not reused",
                    self.layout.commit_path(step, self.rank),
                )
                continue
            if has_object and not committed:
                log.info(
                    "flash: adopting the object of an unfinished save of step %d (rank %d)", step, self.rank
                )
                self.pool.adopt(self.layout.object_path(step, self.rank))
            elif committed and not has_object:
                self.layout.remove_commit(step, self.rank)
            elif committed:
                self.own.add(step)
                if (buffer := mapped.take(self.layout.object_path(step, self.rank))) is not None:
                    self._held[step] = buffer
            self.layout.remove_step_if_abandoned(step)
        complete = self.layout.complete_steps(self.world_size)
        if complete:
            for step in sorted(self.own):
                if step < complete[-1] and not self.layout.is_complete(step, self.world_size):
                    self.drop(step)  # its other ranks never committed: it can never be loaded

    # life cycle

    def close(self, *, keep_mapped: bool = False) -> list[Buffer]:
        """Unmap, free the pool and release the lock. With ``keep_mapped`` the mappings (free and
        committed) are handed back instead, for the next store of this rank in this process, and the
        pool's files stay: a writer that holds its rank only while saving keeps its buffers warm."""
        with self.mutex:
            kept: list[Buffer] = []
            if keep_mapped:
                kept = [*self._held.values(), *self.pool.detach()]
            else:
                for buffer in self._held.values():
                    buffer.close()
                self.pool.close()
            self._held.clear()
            if self._lock is not None:
                self._lock.release()
            else:
                with contextlib.suppress(OSError):
                    self.pool.directory.rmdir()
            return kept


def _visitor_dir(layout: FlashLayout, rank: int, pid: int) -> Path:
    return layout.pool_dir(rank).with_name(f"visitor-{rank:05d}-{pid}")


def _remove_dead_visitors(layout: FlashLayout, rank: int) -> None:
    """Buffers a visitor of this rank left when it was killed: tmpfs memory nobody would free."""
    for directory in _visitor_dir(layout, rank, 0).parent.glob(f"visitor-{rank:05d}-*"):
        pid = int(directory.name.rsplit("-", 1)[1]) if directory.name.rsplit("-", 1)[1].isdigit() else 0
        if pid and _alive(pid):
            continue
        for path in directory.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_object(
    layout: FlashLayout, step: int, rank: int, copier: Copier, buffer: Buffer | None = None
) -> VerifiedObject:
    """Map a committed object (unless ``buffer`` already maps it) and check it against its commit
    record; raise CorruptObjectError naming the object and what failed."""
    path = layout.object_path(step, rank)
    record = layout.read_commit(step, rank)
    if record is None:
        raise CorruptObjectError(f"{path}: no commit record")
    opened = buffer is None
    if buffer is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptObjectError(f"{path}: object missing although committed") from None
        if size < record.objects[0]["size"]:
            raise CorruptObjectError(
                f"{path}: truncated to {size} bytes, committed with {record.objects[0]['size']}"
            )
        buffer = Buffer(path, size, populate=False)
    try:
        return verify_mapped(buffer, record, copier, where=str(path))
    except BaseException:
        if opened:
            buffer.close()
        raise


def verify_mapped(buffer: Buffer, record: CommitRecord, copier: Copier, *, where: str) -> VerifiedObject:
    """Check the object in ``buffer`` against ``record``: header, metadata and every data chunk."""
    (entry,) = record.objects
    size = min(buffer.capacity, buffer.file_size())  # the file may have been cut short under the mapping
    if entry["size"] > size:
        raise CorruptObjectError(f"{where}: truncated to {size} bytes, committed with {entry['size']}")
    header, meta = verify_view(buffer.view, size, record, copier.hash_data, where=where)
    return VerifiedObject(record.step, record.rank, buffer, header, meta)
