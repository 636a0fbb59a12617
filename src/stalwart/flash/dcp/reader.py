"""``FlashStorageReader``: DCP's ``StorageReader`` over the flash tier, on one node or many.

A load is collective over the process group when torch.distributed is initialised (as DCP's own is):
``read_metadata`` surveys the nodes and the durable store, picks the step (the one asked for, or the
newest whole one), and the rank nearest to the coordinator's object reads the global metadata from it
and shares it. ``read_data`` then fetches, for each rank, the objects its read plan touches.

Loading the newest whole step is a resume: the steps after it (saves that never completed) are
forgotten in every tier, so training can save those numbers again. Loading an older step on purpose
forgets nothing; to save again after it, call ``FlashStorageWriter.continue_from(step)``.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import shared
from ..durable import DurableTier
from ..engine import FlashEngine
from ..errors import FlashRestoreError
from ..layout import FlashLayout
from .steps import FlashItem, is_step_id, metadata_of, step_of
from .survey import Fetched, Survey, fetch, survey

__all__ = ["FlashStorageReader"]

log = logging.getLogger("stalwart.flash")


class FlashStorageReader(StorageReader):
    """A DCP ``StorageReader`` over the flash tier of ``job_id``; verifies every object it reads.

    ``durable`` (an fsspec URL, as given to the writer) is where a step no node holds whole is read
    from. ``process_group``: the group DCP loads with, when not the default one; ``no_dist=True`` for
    a ``dcp.load(..., no_dist=True)`` (DCP does not tell its reader; the load then reads this node only
    and the durable store).
    """

    def __init__(
        self,
        job_id: str,
        root: str | os.PathLike | None = None,
        *,
        durable: str | os.PathLike | None = None,
        storage_options: dict | None = None,
        process_group: Any = None,
        no_dist: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.layout = FlashLayout(root, job_id)
        if not isinstance(no_dist, bool):
            raise ValueError(f"no_dist={no_dist!r} is not accepted; use True or False")
        self.no_dist = no_dist
        if isinstance(durable, Path):
            durable = durable.resolve().as_uri()
        if durable is not None and (not isinstance(durable, str) or not durable):
            raise ValueError(f"durable={durable!r} is not accepted; use an fsspec URL or path, or None")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict; got {type(storage_options).__name__}")
        self.durable = DurableTier(durable, storage_options) if durable is not None else None
        self.process_group = process_group
        self._threads = threads
        self._requested: int | None = None
        self.step: int | None = None  # the step of the load under way
        self.restored_from: dict[int, str] = {}  # rank -> "flash", "peer" or "durable", of the last load
        self.storage_data: dict[Any, FlashItem] = {}
        self.load_id = ""
        self._engine: FlashEngine | None = None
        self._survey: Survey | None = None
        self._world = 1  # the world size that saved the step under way
        self._opened: dict[int, Fetched] = {}

    def step_dir(self, step: int) -> Path:
        return self.layout.step_dir(step_of(step))

    # what exists

    def latest_step(self) -> int | None:
        """The newest step whose every rank's object (and so the global metadata) exists on some node or
        in the durable store, or None. Collective when torch.distributed is initialised: every rank
        answers the same."""
        whole = self._look().whole()
        return max(whole, default=None)

    def steps(self) -> dict[int, int]:
        """Every loadable step, with the world size that saved it. Collective like ``latest_step``."""
        return dict(sorted(self._look().whole().items()))

    # DCP's calls, in order

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Load the step ``checkpoint_id`` names, or the newest whole one. Called outside DCP's
        collectives, so it only checks the id: nothing a rank could disagree on."""
        self._close_opened()
        self._requested = None if checkpoint_id is None else step_of(checkpoint_id, self.layout)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not retry per rank (no collectives then)
        requested, self._requested = self._requested, None  # a later load without an id: the newest
        self._close_opened()
        found = self._look()
        whole = found.whole()
        step = self._choose(found, whole, requested)
        self.step, self._world = step, whole[step]
        engine = self._open_engine()
        if requested is None or step == max(whole):
            self._forget_after(engine, step)
        metadata = self._share_metadata(engine, found, step)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id or uuid.uuid4().hex
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
        if self.step is None or self._engine is None or self._survey is None:
            raise ValueError("FlashStorageReader.read_data was called before read_metadata")
        try:
            for request in plan.items:
                item = self.storage_data[request.storage_index]
                source = self._object(item.rank)
                buffer = source.verified.buffer
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
            self.restored_from = {rank: fetched.source for rank, fetched in self._opened.items()}
        finally:
            self._close_opened()
            self.step = None
            if self._engine.cluster is None:  # one node: no peer pulls from this rank's engine
                shared.release_idle(self.layout, self._engine.rank, self._engine.world_size)
                self._engine = None
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_step_id(checkpoint_id)

    def close(self) -> None:
        """Let go of what the last load held, and of the rank unless a writer of this process holds it.
        On several nodes call it once every rank's load is over (peers pull from this rank's node)."""
        self._close_opened()
        if self._engine is not None:
            shared.release_idle(self.layout, self._engine.rank, self._engine.world_size)
            self._engine = None

    # internals

    def _group(self) -> tuple[int, int]:
        import torch.distributed as dist

        if not self.no_dist and dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def _gather(self, value: Any) -> list[Any]:
        _, world = self._group()
        if world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * world
        dist.all_gather_object(out, value, group=self.process_group)
        return out

    def _look(self) -> Survey:
        rank, _ = self._group()
        self._survey = survey(self.layout, self.durable, rank, self._gather)
        return self._survey

    def _choose(self, found: Survey, whole: dict[int, int], requested: int | None) -> int:
        """The step to load; the same error on every rank when there is none (all saw the same)."""
        job, root = self.layout.job_id, self.layout.root
        durable = f" or in {self.durable.url}" if self.durable is not None else ""
        if not found.exists:
            jobs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(
                f"flash job {job!r} has no checkpoint under {root} on any node{durable}"
                + (f"; jobs there: {', '.join(jobs[:8])}" if jobs else "")
                + ". Check the job id and root the writer was given"
            )
        if requested is not None and requested not in whole:
            partial = " (some of its ranks committed it, not all)" if requested in found.partial() else ""
            listed = ", ".join(map(str, sorted(whole))) or "none"
            raise FileNotFoundError(
                f"flash step {requested} of job {job!r} is not complete on any node{durable}{partial}; "
                f"complete steps: {listed}"
            )
        if not whole:
            partial = ", ".join(map(str, found.partial())) or "none"
            raise FileNotFoundError(
                f"flash job {job!r} has no complete step under {root}{durable} (steps some ranks committed: "
                f"{partial}): its saves did not finish, or were not made through FlashStorageWriter"
            )
        return requested if requested is not None else max(whole)

    def _open_engine(self) -> FlashEngine:
        rank, world = self._group()

        def build() -> FlashEngine:
            return FlashEngine(
                self.layout,
                rank=rank,
                world_size=world,
                threads=self._threads,
                process_group=self.process_group,
                replicas=1,
            )

        self._engine = shared.engine_for(self.layout, rank, world, None, build)
        return self._engine

    def _forget_after(self, engine: FlashEngine, step: int) -> None:
        """A resume from the newest whole step: what came after it never completed. Collective; DCP's
        plan exchange after ``read_metadata`` keeps every rank from saving before all have forgotten."""
        for found in self.layout.steps():  # other world sizes' leftovers on this node (a resharded resume)
            if found <= step:
                continue
            for owner, record in self.layout.commits(found).items():
                if record.world_size != engine.world_size:
                    self.layout.remove_commit(found, owner)
                    self.layout.object_path(found, owner).unlink(missing_ok=True)
            self.layout.remove_step_if_abandoned(found)
        engine.continue_from(step)

    def _share_metadata(self, engine: FlashEngine, found: Survey, step: int) -> Metadata:
        """The rank nearest to the coordinator's object reads the metadata; every rank gets it."""
        holders = found.flash_holders(step, 0, self._world)
        reader = min(holders) if holders else 0
        note: Any = None
        if engine.rank == reader:
            try:
                fetched = self._object(0)
                note = ("ok", metadata_of(fetched.verified, f"rank 0's object of flash step {step}"))
            except Exception as exc:  # told to every rank: none may wait for this one
                note = ("error", f"{type(exc).__name__}: {exc}")
        kind, value = self._gather(note)[reader]
        if kind != "ok":
            raise FlashRestoreError(
                f"cannot read the metadata of flash step {step} of job {self.layout.job_id!r}: {value}"
            )
        return value

    def _object(self, rank: int) -> Fetched:
        opened = self._opened.get(rank)
        if opened is None:
            assert self._engine is not None and self._survey is not None and self.step is not None
            opened = fetch(self._engine, self.durable, self._survey, self.step, rank, self._world)
            self._opened[rank] = opened
        return opened

    def _close_opened(self) -> None:
        opened, self._opened = self._opened, {}
        for fetched in opened.values():
            fetched.close()
