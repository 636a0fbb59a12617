"""The durable copy of flash steps: the same objects and commit records, on any fsspec URL.

Each rank uploads its own object, then its commit record (data first, marker last: object stores
have no rename). A durable step is complete when every rank's record is there. Restore downloads a
rank's object into a local file and verifies it exactly as a local object.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from ..checkpoint.store import CHUNK, DurableStore
from .layout import CommitRecord

__all__ = ["DurableTier"]

log = logging.getLogger("stalwart.flash")

_COMMIT = re.compile(r"^step-(\d{12})/rank-(\d{5})\.commit$")


class DurableTier:
    """Flash steps under one fsspec URL (``file://``, ``s3://``...), reusing the task checkpoint's store."""

    def __init__(self, url: str, storage_options: dict | None = None, *, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"durable keep={keep!r} is not accepted; use an int >= 1")
        self.store = DurableStore(url, storage_options)
        self.url = url
        self.keep = keep

    @staticmethod
    def _step(step: int) -> str:
        return f"step-{step:012d}"

    def upload(self, record: CommitRecord, view: memoryview) -> None:
        """Upload one rank's object (the first ``size`` bytes of its buffer), then its commit record."""
        (entry,) = record.objects
        name = f"{self._step(record.step)}/{entry['name']}"
        with self.store.open_write(name) as writer:
            for start in range(0, entry["size"], CHUNK):
                writer.write(view[start : min(start + CHUNK, entry["size"])])
        self.store.commit(f"{self._step(record.step)}/rank-{record.rank:05d}.commit", record.to_json())

    def records(self) -> dict[int, dict[int, CommitRecord]]:
        """Commit records by step and rank (fresh listing)."""
        found: dict[int, dict[int, CommitRecord]] = {}
        for name in self.store.glob("step-*/rank-*.commit"):
            if not (m := _COMMIT.match(name)):
                continue
            try:
                record = CommitRecord.from_json(self.store.read_bytes(name))
            except (ValueError, TypeError, FileNotFoundError) as exc:
                log.warning("ignoring unreadable durable commit record %s/%s: %s", self.url, name, exc)
                continue
            if record.step == int(m.group(1)) and record.rank == int(m.group(2)):
                found.setdefault(record.step, {})[record.rank] = record
        return found

    def complete_steps(self, world_size: int) -> list[int]:
        return sorted(
            step
            for step, ranks in self.records().items()
            if all(
                (r := ranks.get(rank)) is not None and r.world_size == world_size
                for rank in range(world_size)
            )
        )

    def rank_record(self, step: int, rank: int) -> CommitRecord | None:
        try:
            return CommitRecord.from_json(self.store.read_bytes(f"{self._step(step)}/rank-{rank:05d}.commit"))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def download(self, record: CommitRecord, dest: Path) -> None:
        """Copy one rank's object to ``dest`` (a local file, verified afterwards by the engine)."""
        (entry,) = record.objects
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".download")
        with (
            self.store.open_read(f"{self._step(record.step)}/{entry['name']}") as src,
            open(tmp, "wb") as out,
        ):
            while chunk := src.read(CHUNK):
                out.write(chunk)
        tmp.rename(dest)

    def prune(self, rank: int, world_size: int) -> None:
        """Delete this rank's durable objects of steps older than the newest ``keep`` complete steps."""
        complete = self.complete_steps(world_size)
        if len(complete) <= self.keep:
            return
        cutoff = complete[-self.keep]
        for step, ranks in self.records().items():
            if step < cutoff and rank in ranks:
                base = self._step(step)
                # marker first: the step stops being complete before its data goes
                with contextlib.suppress(FileNotFoundError):
                    self.store.remove(f"{base}/rank-{rank:05d}.commit")
                for entry in ranks[rank].objects:
                    with contextlib.suppress(FileNotFoundError):
                        self.store.remove(f"{base}/{entry['name']}")
