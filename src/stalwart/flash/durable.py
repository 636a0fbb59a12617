"""The durable copy of flash steps: the same objects and commit records, on any fsspec URL.

Each rank uploads its own object, then its commit record (data first, marker last: object stores
have no rename). A durable step is complete when every rank's record is there. Restore reads a rank's
object straight into a pool buffer and verifies it exactly as a local object.

Committed data is never rewritten (DESIGN decision 10): an upload refuses a step this rank already
committed here, a restore drops the steps newer than the one it chose (they belong to an abandoned
timeline, like the flash tier's), and retention deletes a rank's records before its objects. What a
killed upload leaves behind (an uncommitted object, an open multipart upload) is collected by the next
retention of the same rank, which runs only between that rank's uploads, never beside one.
"""

from __future__ import annotations

import contextlib
import logging
import re

from ..checkpoint.durable_store import CHUNK, DurableStore
from ..checks import int_at_least
from .errors import FlashError
from .layout import CommitRecord, FlashLayout

__all__ = ["DurableConflictError", "DurableTier"]

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^step-(\d{12})/rank-(\d{5})\.commit$")
_OBJECT = re.compile(r"^step-(\d{12})/rank-(\d{5})\.obj$")


class DurableConflictError(FlashError):
    """The durable store already holds a committed step this rank was about to upload."""


class DurableTier:
    """Flash steps under one fsspec URL (``file://``, ``s3://``...), reusing the task checkpoint's store."""

    def __init__(self, url: str, storage_options: dict | None = None, *, keep: int = 2) -> None:
        int_at_least("durable keep", keep, 1)
        self.store = DurableStore(url, storage_options)
        self.url = url
        self.keep = keep

    @staticmethod
    def _step(step: int) -> str:
        return f"step-{step:012d}"

    def _commit_name(self, step: int, rank: int) -> str:
        return f"{self._step(step)}/rank-{rank:05d}.commit"

    def _object_name(self, step: int, rank: int) -> str:
        return f"{self._step(step)}/{FlashLayout.object_name(rank)}"

    # writing

    def upload(self, record: CommitRecord, view: memoryview) -> None:
        """Upload one rank's object (the first ``size`` bytes of its buffer), then its commit record.

        Refuses (DurableConflictError) a step this rank already committed here: rewriting it in place
        would destroy a committed step if the upload died half-way.
        """
        if self.rank_record(record.step, record.rank) is not None:
            raise DurableConflictError(
                f"{self.url} already holds a committed step {record.step} of rank {record.rank}, saved "
                "by an earlier run of this job that this process did not restore; it is not overwritten. "
                "Call restore() before saving (it drops the steps of an abandoned timeline), or use a new "
                "job_id"
            )
        (entry,) = record.objects
        with self.store.open_write(self._object_name(record.step, record.rank)) as writer:
            for start in range(0, entry["size"], CHUNK):
                writer.write(view[start : min(start + CHUNK, entry["size"])])
        self.store.commit(self._commit_name(record.step, record.rank), record.to_json())

    # reading

    def records(self) -> dict[int, dict[int, CommitRecord]]:
        """Commit records by step and rank (fresh listing)."""
        return self.scan()[0]

    def scan(self) -> tuple[dict[int, dict[int, CommitRecord]], list[str]]:
        """Commit records by step and rank, and the names of those that exist but cannot be read (a
        record from a newer stalwart, a damaged one): evidence of a committed object, never a leftover."""
        found: dict[int, dict[int, CommitRecord]] = {}
        unreadable: list[str] = []
        for name in self.store.glob("step-*/rank-*.commit"):
            if not (m := _COMMIT.match(name)):
                continue
            try:
                record = CommitRecord.from_json(self.store.read_bytes(name))
            except FileNotFoundError:
                continue  # removed since the listing
            except (ValueError, TypeError) as exc:
                log.warning("unreadable durable commit record %s/%s: %s", self.url, name, exc)
                unreadable.append(name)
                continue
            if (record.step, record.rank) != (int(m.group(1)), int(m.group(2))):
                log.warning(
                    "durable commit record %s/%s names step %d rank %d",
                    self.url,
                    name,
                    record.step,
                    record.rank,
                )
                unreadable.append(name)
                continue
            found.setdefault(record.step, {})[record.rank] = record
        return found, unreadable

    def complete_steps(
        self, world_size: int, records: dict[int, dict[int, CommitRecord]] | None = None
    ) -> list[int]:
        records = self.records() if records is None else records
        return sorted(step for step, ranks in records.items() if _complete(ranks) == world_size)

    def complete_worlds(self, records: dict[int, dict[int, CommitRecord]] | None = None) -> dict[int, int]:
        """Complete steps of any world size: {step: the world size that saved it}."""
        records = self.records() if records is None else records
        found = {step: _complete(ranks) for step, ranks in records.items()}
        return {step: size for step, size in found.items() if size is not None}

    def other_world_sizes(self, world_size: int) -> dict[int, int]:
        """Complete steps saved by another number of ranks: {step: world size}."""
        found = {step: _complete(ranks) for step, ranks in self.records().items()}
        return {step: size for step, size in found.items() if size is not None and size != world_size}

    def rank_record(self, step: int, rank: int) -> CommitRecord | None:
        try:
            record = CommitRecord.from_json(self.store.read_bytes(self._commit_name(step, rank)))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return record if (record.step, record.rank) == (step, rank) else None

    def read_into(self, record: CommitRecord, view: memoryview) -> None:
        """Read one rank's object into ``view`` (a pool buffer: verified by the caller before use)."""
        (entry,) = record.objects
        size = entry["size"]
        with self.store.open_read(self._object_name(record.step, record.rank)) as src:
            done = 0
            while done < size:
                got = src.readinto(view[done : min(done + CHUNK, size)])  # type: ignore[attr-defined]
                if not got:
                    raise EOFError(
                        f"{self.url}/{self._object_name(record.step, record.rank)} ends after {done} bytes; "
                        f"its commit record says {size}"
                    )
                done += got

    # dropping and retention

    def _remove_rank(self, step: int, rank: int, record: CommitRecord | None) -> None:
        """Record first, so the step stops being complete before its data goes."""
        base = self._step(step)
        with contextlib.suppress(FileNotFoundError):
            self.store.remove(self._commit_name(step, rank))
        names = [e["name"] for e in record.objects] if record else [FlashLayout.object_name(rank)]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.store.remove(f"{base}/{name}")

    def drop_newer_than(self, rank: int, world_size: int, step: int | None) -> list[int]:
        """Delete this rank's steps after ``step`` (all when None): a restore chose an earlier state, so
        they belong to an abandoned timeline, and a new save of the same step number must find its place
        free. Steps of other world sizes go too, this rank taking the ranks ``_mine`` gives it. Returns
        the steps dropped."""
        dropped = set()
        for found, ranks in sorted(self.records().items()):
            for record in ranks.values():
                if _mine(record, rank, world_size) and (step is None or found > step):
                    self._remove_rank(found, record.rank, record)
                    dropped.add(found)
        return sorted(dropped)

    def prune(self, rank: int, world_size: int) -> None:
        """Delete this rank's objects of steps older than the newest ``keep`` complete steps (of other
        world sizes too, as ``_mine`` shares them out), and what its killed uploads left behind. Call it
        only between this rank's uploads."""
        records = self.records()
        complete = self.complete_steps(world_size, records)
        if len(complete) > self.keep:
            cutoff = complete[-self.keep]
            for step, ranks in records.items():
                for record in ranks.values():
                    if step < cutoff and _mine(record, rank, world_size):
                        self._remove_rank(step, record.rank, record)
        self.collect_leftovers(rank)

    def collect_leftovers(self, rank: int) -> int:
        """Delete this rank's objects that no commit record covers and abort its open multipart uploads:
        what an upload killed half-way leaves. An object whose record exists, readable or not, stays.
        Returns how many were collected."""
        committed = set(self.store.glob("step-*/rank-*.commit"))
        collected = 0
        for name in self.store.glob("step-*/rank-*.obj"):
            m = _OBJECT.match(name)
            if m and int(m.group(2)) == rank and name.removesuffix(".obj") + ".commit" not in committed:
                with contextlib.suppress(FileNotFoundError):
                    self.store.remove(name)
                    collected += 1
        collected += self.store.abort_uploads(
            lambda name: (m := _OBJECT.match(name)) is not None and int(m.group(2)) == rank
        )
        if collected:
            log.info(
                "flash: collected %d leftover(s) of killed uploads of rank %d in %s",
                collected,
                rank,
                self.url,
            )
        return collected


def _mine(record: CommitRecord, rank: int, world_size: int) -> bool:
    """Whether ``rank`` of a job of ``world_size`` ranks removes ``record``'s object when it is due: its
    own, and of a step saved by another world size, the ranks equal to it modulo ``world_size``."""
    if record.world_size == world_size:
        return record.rank == rank
    return record.rank % world_size == rank


def _complete(ranks: dict[int, CommitRecord]) -> int | None:
    """The world size a step is complete for (every rank of it committed), or None."""
    sizes = {record.world_size for record in ranks.values()}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size if all(r in ranks for r in range(size)) else None
