"""``torch.distributed.checkpoint`` storage on the flash tier: ``FlashStorageWriter`` and
``FlashStorageReader``, for ``dcp.save``, ``dcp.async_save`` and ``dcp.load``.

DCP plans what each rank writes; the writer puts all of a rank's items into one flash object (one
copy, chunk checksums, commit record last) and records each item's place in the DCP metadata, which
the coordinator writes into the step directory when every rank has committed. Reading maps the objects
of whichever ranks hold the requested items (resharding works: a rank may read another rank's object)
and verifies each object once before copying from it.

The checkpoint id is a step: an int, or the step directory (``writer.step_dir(100)``). A save without
one takes the step after the newest step directory of the job (0 for the first). The ranks of a step are
the group that saves it: the whole world, a ``process_group``, or one process with ``no_dist=True``.

A save holds its rank's writer lock from ``write_data`` to the end of its part of the save (DCP never
calls ``close``): writers of one job may take turns, two at once on one rank are refused.

``dcp.async_save`` with the default thread executor works; the process executor is not supported (the
writer holds memory maps). The adapter is for ranks that share one flash root (one node): it does not
replicate, and its retention counts a step complete from the commit records it can see, so on several
nodes old steps would never be dropped. Across nodes use ``FlashCheckpointer``, which replicates and
keeps its board in the job's store.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import re
import uuid
import weakref
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
from .buffers import Buffer
from .copier import Copier
from .layout import FlashLayout, RankLockedError
from .objects import DEFAULT_CHUNK, CorruptObjectError, hash_bytes, plan_tensors
from .rankstore import RankStore, VerifiedObject, verify_object

__all__ = ["FlashItem", "FlashStorageReader", "FlashStorageWriter"]

METADATA = "dcp.metadata"
log = logging.getLogger("stalwart.flash")
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


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass(frozen=True)
class _LocalInfo:
    """What a rank tells the coordinator in its local plan: the step it is about to save."""

    step: int


@dataclass(frozen=True)
class _SaveInfo:
    """What the coordinator sends each rank in its final plan: the rank's place in the group that saves
    (DCP passes no group size, and the group may be a subgroup or a single process). Not the step: with
    DCP's plan caching a rank may get the final plan of an earlier save."""

    rank: int
    world_size: int


class _DcpBoard(LocalBoard):
    """A DCP step is safe to keep instead of older ones only once the coordinator wrote its metadata."""

    def safe(self, step: int) -> bool:
        return super().safe(step) and (self.layout.step_dir(step) / METADATA).exists()


def _unmap(buffers: list[Buffer]) -> None:
    for buffer in buffers:
        buffer.close()
    buffers.clear()


class FlashStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that saves into the flash tier of ``job_id`` (one object per rank).

    A save holds its rank's writer lock only while it writes (DCP never calls ``close``), so writers of
    one job may take turns; two saves of the same rank at once are refused with ``RankLockedError``.
    Between saves the writer keeps its tmpfs buffers mapped for the next save; ``close()`` frees them.
    """

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
        self._copier = Copier(threads)
        self._threads = threads
        self._store: RankStore | None = None  # only while a save holds the rank
        self._mapped: list[Buffer] = []  # buffers kept mapped between saves
        self._finalizer = weakref.finalize(self, _unmap, self._mapped)
        self._requested: int | None = None  # the step the checkpoint_id of the coming save names
        self._planned: int | None = None  # the step of the save under way
        self.step: int | None = None  # the step of the newest save (chosen by the coordinator)
        self.rank, self.world_size = 0, 1  # in the group of the newest save
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex

    def step_dir(self, step: int) -> Path:
        """The checkpoint id DCP should be given for ``step``."""
        return self.layout.step_dir(_step_of(step))

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Start a save of the step ``checkpoint_id`` names; without one (``dcp.save_state_dict`` calls
        ``reset()``, ``dcp.save`` without checkpoint_id calls nothing) the step after the newest."""
        self._requested = None if checkpoint_id is None else _step_of(checkpoint_id, self.layout)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = _default_rank() if rank is None else rank
        if kwargs.get("use_collectives", True) is False:
            raise ValueError(
                "FlashStorageWriter does not save with use_collectives=False: the ranks of a flash step must "
                "agree on it and the coordinator records which rank holds what; leave use_collectives at "
                "True, or save from one process alone with no_dist=True"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        requested, self._requested = self._requested, None  # a later save without checkpoint_id: next step
        steps = self.layout.steps()  # no rank writes before the plan is agreed: all see the same steps
        if requested is None:
            self._planned = steps[-1] + 1 if steps else 0
        else:
            own = [s for s in steps if self.layout.read_commit(s, self.rank) is not None]
            if own and requested <= own[-1]:
                raise ValueError(
                    f"flash step {requested} is not newer than step {own[-1]}, already saved by this rank"
                )
            self._planned = requested
        return dataclasses.replace(plan, storage_data=_LocalInfo(self._planned))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator checks that every rank saves the same step and tells each its place in the
        group that saves it."""
        steps = sorted({p.storage_data.step for p in plans if isinstance(p.storage_data, _LocalInfo)})
        if len(steps) > 1:
            raise ValueError(
                f"the ranks name different flash steps ({', '.join(map(str, steps))}); give every rank the "
                "same checkpoint_id"
            )
        return [
            dataclasses.replace(plan, storage_data=_SaveInfo(rank, len(plans)))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, _SaveInfo):
            raise ValueError(
                "the final save plan lost FlashStorageWriter's SavePlan.storage_data; a SavePlanner must "
                "keep it from prepare_global_plan to write_data (FileSystemWriter needs that too)"
            )
        if self._planned is None:
            raise ValueError("FlashStorageWriter.write_data was called before prepare_local_plan")
        step, self._planned = self._planned, None
        self.step, self.rank, self.world_size = step, info.rank, info.world_size
        store = self._take_rank()
        try:
            newest = max(store.own, default=None)
            if newest is not None and step <= newest:
                raise ValueError(
                    f"flash step {step} is not newer than step {newest}, already saved by this rank"
                )
            results = self._write(store, step, plan, planner)
        finally:
            self._release_rank()  # a non-coordinator's save ends here; the coordinator's at finish
            if not self.is_coordinator:
                self.save_id = uuid.uuid4().hex
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write(self, store: RankStore, step: int, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
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
        return [
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

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator writes the DCP metadata once every rank has committed its object."""
        step = self.step
        if step is None:
            raise ValueError("FlashStorageWriter.finish was called before write_data")
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = StorageMeta(str(self.layout.step_dir(step)), save_id=self.save_id)
        body = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        path = self.layout.step_dir(step) / METADATA
        tmp = path.with_name(f"{METADATA}.{os.getpid()}.tmp")
        tmp.write_bytes(hash_bytes(body).to_bytes(8, "little") + body)
        os.replace(tmp, path)
        self.save_id = uuid.uuid4().hex
        try:  # the new step is loadable now: older ones beyond keep can go
            store = self._take_rank()
        except RankLockedError:
            log.info("flash: rank %d is being saved by another writer; it retires old steps", self.rank)
            return
        try:
            store.retain()
        finally:
            self._release_rank()

    def _take_rank(self) -> RankStore:
        """Hold this rank of the job (its lock), with the buffers mapped by earlier saves."""
        mapped = list(self._mapped)
        self._mapped.clear()
        try:
            self._store = RankStore(
                self.layout,
                self.rank,
                self.world_size,
                keep=self.keep,
                copier=self._copier,
                board=_DcpBoard(self.layout, self.world_size),
                mapped=mapped,
            )
        except RankLockedError:
            self._mapped.extend(mapped)  # refused before it used any of them
            raise
        return self._store

    def _release_rank(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            self._mapped.extend(store.close(keep_mapped=True))

    def storage_meta(self) -> StorageMeta | None:
        step = self._requested
        return StorageMeta(
            checkpoint_id=str(self.layout.step_dir(step)) if step is not None else None, save_id=self.save_id
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            _step_of(checkpoint_id)
        except ValueError:
            return False
        return True

    def close(self) -> None:
        """Give the memory of the free buffers back (committed steps stay); the writer stays usable.

        The pool's free buffers are deleted unless another writer holds the rank at this moment."""
        self._release_rank()
        self._copier.close()
        self._copier = Copier(self._threads)  # its threads start at the next save, if there is one
        if self.step is not None:  # it saved: its free buffers are in the pool, and go now
            try:
                store = self._take_rank()
            except RankLockedError:
                pass
            else:
                self._store = None
                store.close()
        _unmap(self._mapped)

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
