"""``torch.distributed.checkpoint`` storage on the flash tier: ``FlashStorageWriter`` and
``FlashStorageReader``, for ``dcp.save``, ``dcp.async_save`` and ``dcp.load``.

DCP plans what each rank writes; the writer puts all of a rank's items into one flash object (one
copy, chunk checksums, commit record last) and records each item's place in the DCP metadata, which
the coordinator writes into the step directory when every rank has committed. Reading maps the objects
of whichever ranks hold the requested items (resharding works: a rank may read another rank's object)
and verifies each object once before copying from it.

The checkpoint id is a step: an int, or the step directory (``writer.step_dir(100)``).

``dcp.async_save`` with the default thread executor works; the process executor is not supported (the
writer holds memory maps and the rank's writer lock). The adapter is for ranks that share one flash
root (one node): it does not replicate, and its retention counts a step complete from the commit
records it can see, so on several nodes old steps would never be dropped. Across nodes use
``FlashCheckpointer``, which replicates and keeps its board in the job's store.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .board import LocalBoard
from .copier import Copier
from .layout import FlashLayout
from .objects import DEFAULT_CHUNK, CorruptObjectError, hash_bytes, plan_tensors
from .rankstore import RankStore, VerifiedObject, verify_object

__all__ = ["FlashItem", "FlashStorageReader", "FlashStorageWriter"]

METADATA = "dcp.metadata"
_STEP_DIR = re.compile(r"(^|/)step-(\d{12})/?$")


@dataclass(frozen=True)
class FlashItem:
    """Where one DCP write item lives: in ``rank``'s object, ``length`` bytes from ``offset``."""

    rank: int
    offset: int
    length: int
    dtype: str | None  # None for bytes items
    shape: tuple[int, ...] | None


def _step_of(checkpoint_id: object, layout: FlashLayout | None = None) -> int:
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool) and checkpoint_id >= 0:
        return checkpoint_id
    if isinstance(checkpoint_id, str) and checkpoint_id.isdigit():
        return int(checkpoint_id)
    if isinstance(checkpoint_id, (str, os.PathLike)):
        path = Path(checkpoint_id)
        match = _STEP_DIR.search(path.as_posix())
        if match and (layout is None or path.parent.resolve() == layout.steps_dir.resolve()):
            return int(match.group(2))  # a step directory (of this job, when a layout is given)
    where = f" under {layout.steps_dir}" if layout is not None else ""
    raise ValueError(
        f"checkpoint_id={checkpoint_id!r} is not a flash step; use an int step or a step directory{where} "
        "such as writer.step_dir(100)"
    )


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (
            dist.get_world_size() if world_size is None else world_size
        )
    return rank or 0, world_size or 1


class _DcpBoard(LocalBoard):
    """A DCP step is safe to keep instead of older ones only once the coordinator wrote its metadata."""

    def safe(self, step: int) -> bool:
        return super().safe(step) and (self.layout.step_dir(step) / METADATA).exists()


class FlashStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that saves into the flash tier of ``job_id`` (one object per rank)."""

    def __init__(
        self,
        job_id: str,
        root: str | os.PathLike | None = None,
        *,
        keep: int = 2,
        threads: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        self.layout = FlashLayout(root, job_id)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is not accepted; use an int >= 1")
        self.keep, self.chunk_size = keep, chunk_size
        self._threads = threads
        self._store: RankStore | None = None
        self.step: int | None = None
        self.is_coordinator = False
        self.save_id = ""

    def step_dir(self, step: int) -> Path:
        """The checkpoint id DCP should be given for ``step``."""
        return self.layout.step_dir(_step_of(step))

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is None:
            raise ValueError("FlashStorageWriter needs checkpoint_id: an int step or writer.step_dir(step)")
        self.step = _step_of(checkpoint_id, self.layout)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if self._store is None:
            rank, world = _rank_and_world(kwargs.get("rank"), None)
            self._store = RankStore(
                self.layout,
                rank,
                world,
                keep=self.keep,
                copier=Copier(self._threads),
                board=_DcpBoard(self.layout, world),
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        step = self._require_step()
        assert self._store is not None, "DCP calls set_up_storage_writer before prepare_local_plan"
        newest = max(self._store.own, default=None)
        if newest is not None and step <= newest:
            raise ValueError(f"flash step {step} is not newer than step {newest}, already saved by this rank")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        store, step = self._store, self._require_step()
        assert store is not None
        tensors: list[torch.Tensor] = []
        is_bytes: list[bool] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            is_bytes.append(isinstance(data, io.BytesIO))
            if isinstance(data, io.BytesIO):
                raw = bytearray(data.getbuffer())
                tensors.append(
                    torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                )
            else:
                tensors.append(data.detach())
        entries, _, _ = plan_tensors(tensors)
        staged = store.stage("dcp", tensors, chunk_size=self.chunk_size, hash_now=True)
        store.commit_staged(step, staged)
        store.retain()  # a step counts once its metadata exists; the coordinator retains in finish too
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=entry.nbytes,
                storage_data=FlashItem(
                    store.rank,
                    entry.offset,
                    entry.nbytes,
                    None if raw else entry.dtype,
                    None if raw else entry.shape,
                ),
            )
            for item, entry, raw in zip(plan.items, entries, is_bytes, strict=True)
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator writes the DCP metadata once every rank has committed its object."""
        step = self._require_step()
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = self.storage_meta()
        body = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        path = self.layout.step_dir(step) / METADATA
        tmp = path.with_name(f"{METADATA}.{os.getpid()}.tmp")
        tmp.write_bytes(hash_bytes(body).to_bytes(8, "little") + body)
        os.replace(tmp, path)
        self.step = None  # the next save names its own step
        if self._store is not None:
            self._store.retain()  # the new step is loadable now: older ones beyond keep can go

    def _require_step(self) -> int:
        if self.step is None:
            raise ValueError(
                "FlashStorageWriter needs checkpoint_id for every save: an int step, or writer.step_dir(step)"
            )
        return self.step

    def storage_meta(self) -> StorageMeta | None:
        step_dir = str(self.layout.step_dir(self.step)) if self.step is not None else None
        return StorageMeta(checkpoint_id=step_dir, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            _step_of(checkpoint_id)
        except ValueError:
            return False
        return True

    def close(self) -> None:
        """Release the rank's buffers and writer lock (committed steps stay)."""
        if self._store is not None:
            self._store.close()
            self._store.copier.close()
            self._store = None

    def __getstate__(self) -> dict:
        raise TypeError(
            "FlashStorageWriter holds memory maps and a writer lock and cannot be pickled; use "
            "dcp.async_save with the default thread executor, not the process executor"
        )


class FlashStorageReader(StorageReader):
    """A DCP ``StorageReader`` over the flash tier of ``job_id``; verifies every object it reads from."""

    def __init__(
        self, job_id: str, root: str | os.PathLike | None = None, *, threads: int | None = None
    ) -> None:
        super().__init__()
        self.layout = FlashLayout(root, job_id)
        self._threads = threads
        self.step: int | None = None
        self.storage_data: dict[Any, FlashItem] = {}
        self.load_id = ""

    def step_dir(self, step: int) -> Path:
        return self.layout.step_dir(_step_of(step))

    def latest_step(self) -> int | None:
        """The newest step every rank committed and whose DCP metadata exists, or None."""
        for step in reversed(self.layout.steps()):
            commits = self.layout.commits(step)
            complete = 0 in commits and self.layout.is_complete(step, commits[0].world_size, commits)
            if complete and (self.layout.step_dir(step) / METADATA).exists():
                return step
        return None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.step = self.latest_step() if checkpoint_id is None else _step_of(checkpoint_id, self.layout)
        if self.step is None:
            raise FileNotFoundError(f"no complete flash step with DCP metadata under {self.layout.steps_dir}")
        if not (self.layout.step_dir(self.step) / METADATA).exists():
            raise FileNotFoundError(
                f"flash step {self.step} of job {self.layout.job_id!r} has no DCP metadata: its save did not "
                "finish, or it was not saved through FlashStorageWriter"
            )
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not retry per rank (no collectives then)
        if self.step is None:  # DCP calls reset only when given a checkpoint_id: default to the newest step
            self.reset(None)
        assert self.step is not None
        path = self.layout.step_dir(self.step) / METADATA
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"flash step {self.step} of job {self.layout.job_id!r} has no DCP metadata ({path}): "
                "its save did not finish, or it was not saved through FlashStorageWriter"
            ) from None
        if len(raw) < 8 or int.from_bytes(raw[:8], "little") != hash_bytes(raw[8:]):
            raise CorruptObjectError(f"{path}: DCP metadata checksum mismatch")
        metadata = pickle.loads(raw[8:])
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise ValueError("the DCP metadata holds no storage data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.step is not None
        opened: dict[int, VerifiedObject] = {}
        copier = Copier(self._threads)
        try:
            for request in plan.items:
                item = self.storage_data[request.storage_index]
                if item.rank not in opened:
                    opened[item.rank] = verify_object(self.layout, self.step, item.rank, copier)
                buffer = opened[item.rank].buffer
                if request.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(
                        request, io.BytesIO(bytes(buffer.view[item.offset : item.offset + item.length]))
                    )
                    continue
                stored = torch.frombuffer(buffer.mm, dtype=torch.uint8, count=item.length, offset=item.offset)
                tensor = stored.view(getattr(torch, item.dtype)).view(item.shape)
                for dim, (start, length) in enumerate(
                    zip(request.storage_offsets, request.lengths, strict=True)
                ):
                    tensor = tensor.narrow(dim, start, length)
                target = planner.resolve_tensor(request).detach()
                if target.size() != tensor.size():
                    raise ValueError(
                        f"{request.storage_index}: stored size {tensor.size()} != target {target.size()}"
                    )
                target.copy_(tensor)
                planner.commit_tensor(request, target)
                del stored, tensor  # views of the map: gone before it is closed
        finally:
            for verified in opened.values():
                verified.buffer.close()
            copier.close()
            self.step = None  # a later load without checkpoint_id picks the newest step again
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return FlashStorageWriter.validate_checkpoint_id(checkpoint_id)
