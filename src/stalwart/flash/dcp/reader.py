"""``FlashStorageReader``: DCP's ``StorageReader`` over the flash tier, on one node or many.

Nothing the reader does inside DCP's steps waits for another rank: a rank that fails before its
``read_metadata`` goes straight on to DCP's own collective, and DCP must find the others there, to
report the failure on every rank. So the ranks get to know each other before the load: constructing
the reader is collective when torch.distributed is initialised (every rank opens its engine, which
serves its node's objects to the others). Inside the load:

- ``read_metadata``: this rank surveys its node, the other nodes (their engines' servers list what
  they hold) and the durable store, picks the step (the one asked for, or the newest whole one) and
  reads the global metadata from the coordinator's object, from the nearest tier that holds it.
- ``prepare_global_plan``: the coordinator checks that every rank picked the same step.
- ``read_data``: each rank fetches the objects its read plan touches; a resume from the newest whole
  step then forgets the steps after it (saves that never completed) in every tier, so training can
  save those numbers again. DCP's closing collective keeps every rank from saving before all have.

Loading an older step on purpose forgets nothing; to save again after it, call
``FlashStorageWriter.continue_from(step)``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
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
from ..objects import CorruptObjectError, read_head
from ..recovery import pull_head
from .steps import FlashItem, is_step_id, metadata_of, step_of
from .survey import Fetched, Survey, fetch, survey, survey_alone

__all__ = ["FlashStorageReader"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Choice:
    """What a rank tells the coordinator in its local load plan: the step it picked and how."""

    step: int
    world: int  # the world size that saved it
    resume: bool  # the newest whole step (or none asked for): a resume forgets what came after
    visitor: bool  # another live process owns this rank: it keeps its steps


@dataclass(frozen=True)
class _Order:
    """What the coordinator sends each rank in its final load plan: forget the steps after the loaded
    one (``generation`` names the new timeline), or not (None)."""

    generation: str | None


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
        """Set up the reader; nothing is read before ``read_metadata``.

        Args:
            job_id: the job the writer saved, as it named it.
            root: the flash root; None means ``$STALWART_FLASH_ROOT``, else /dev/shm.
            durable: where a step no node holds whole is read from (the writer's ``durable``).
            storage_options: fsspec options for ``durable``.
            process_group: the group DCP loads with, when not the default one.
            no_dist: the load is ``dcp.load(..., no_dist=True)``: this node and the durable store only.
            threads: verification threads; None: one per core, up to 4.
        """
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
        self._resume = False  # the load under way is of the newest whole step
        self._meet()

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

    def reset(self, checkpoint_id: str | os.PathLike | int | None = None) -> None:
        """Load the step ``checkpoint_id`` names, or the newest whole one. Called outside DCP's
        collectives, so it only checks the id: nothing a rank could disagree on."""
        self._close_opened()
        self._requested = None if checkpoint_id is None else step_of(checkpoint_id, self.layout)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not retry per rank (no collectives then)
        requested, self._requested = self._requested, None  # a later load without an id: the newest
        self._close_opened()
        engine = self._met()
        found = self._survey = survey_alone(self.layout, self.durable, engine.cluster if engine else None)
        whole = found.whole()
        step = self._choose(found, whole, requested)  # before opening anything for a job that is not there
        engine = self._open_engine()
        self.step, self._world = step, whole[step]
        self._resume = requested is None or step == max(whole)
        metadata = self._metadata(engine, found, step)
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
        if self.step is None or self._engine is None:
            raise ValueError("FlashStorageReader.prepare_local_plan was called before read_metadata")
        choice = _Choice(self.step, self._world, self._resume, self._engine.visitor)
        return dataclasses.replace(plan, storage_data=choice)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The coordinator checks that every rank picked the same step (each surveyed alone; a replica
        landing in between can make them differ), and says whether the load forgets what came after."""
        choices = [p.storage_data for p in plans]
        if not all(isinstance(c, _Choice) for c in choices):
            raise ValueError(
                "a rank's load plan lost FlashStorageReader's LoadPlan.storage_data; a LoadPlanner must keep "
                "it from prepare_local_plan to prepare_global_plan"
            )
        picked = sorted({(c.step, c.world) for c in choices})
        if len(picked) > 1:
            said = ", ".join(f"rank {rank}: step {c.step}" for rank, c in enumerate(choices))
            raise FlashRestoreError(
                f"the ranks picked different flash steps of job {self.layout.job_id!r} ({said}): the nodes "
                "changed while they looked (a save or a replica landing); load again, or give checkpoint_id"
            )
        forget = all(c.resume for c in choices) and not any(c.visitor for c in choices)
        order = _Order(secrets.token_hex(8) if forget else None)
        return [dataclasses.replace(plan, storage_data=order) for plan in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.step is None or self._engine is None or self._survey is None:
            raise ValueError("FlashStorageReader.read_data was called before read_metadata")
        order = plan.storage_data
        if not isinstance(order, _Order):
            raise ValueError(
                "the final load plan lost FlashStorageReader's LoadPlan.storage_data; a LoadPlanner must "
                "keep it from prepare_global_plan to read_data"
            )
        step, engine = self.step, self._engine
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
                assert item.dtype is not None and item.shape is not None  # a tensor item (bytes went above)
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
        if order.generation is not None:
            self._forget_after(engine, step, order.generation)
        if engine.cluster is None:  # one node: no peer pulls from this rank's engine
            self.close()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_step_id(checkpoint_id)

    def close(self) -> None:
        """Let go of what the last load held, and of the rank unless a writer of this process holds it.
        On several nodes call it once every rank's load is over (peers pull from this rank's node). A
        later load through this reader opens this node alone (construct a new reader to meet again)."""
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

    def _meet(self) -> None:
        """Collective when the ranks are many: if any node holds the job, every rank opens its engine now,
        outside DCP's steps (a rank's engine serves its node's objects to the others during loads)."""
        rank, world = self._group()
        if world == 1:
            return
        held = shared.held(self.layout, rank, world)
        found = self._gather((self.layout.job_dir.is_dir(), held is not None))
        if not any(exists for exists, _ in found):
            return  # nothing to serve: a load reads the durable store, or says what is missing
        if all(has for _, has in found):
            self._engine = held
        elif any(has for _, has in found):
            raise FlashRestoreError(
                f"ranks {[r for r, (_, has) in enumerate(found) if not has]} of flash job "
                f"{self.layout.job_id!r} hold no engine in this process while the others do (a save failed "
                "on some ranks): save once more, or close the writers on every rank, before loading"
            )
        else:
            self._engine = self._open_engine(join=True)

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

    def _open_engine(self, *, join: bool = False) -> FlashEngine:
        """This rank's engine: the one met at construction or a writer's of this process, else one
        opened on this node alone (not collective: this load then reads this node and the durable
        store; objects only another node holds are not reached)."""
        rank, world = self._group()
        if (met := self._met()) is not None:
            return met

        def build() -> FlashEngine:
            return FlashEngine(
                self.layout,
                rank=rank,
                world_size=world,
                threads=self._threads,
                process_group=self.process_group,
                replicas=1,
                visit_if_owned=True,  # a load while dcp.async_save's checkpoint process owns the rank
                alone=not join,
            )

        self._engine = shared.engine_for(self.layout, rank, world, None, build)
        return self._engine

    def _met(self) -> FlashEngine | None:
        """The engine met at construction, or a writer's of this process for this rank, if open."""
        if self._engine is not None and not self._engine.closed:
            return self._engine
        self._engine = shared.held(self.layout, *self._group())
        return self._engine

    def _forget_after(self, engine: FlashEngine, step: int, generation: str) -> None:
        """A resume from the newest whole step: what came after it never completed."""
        for found in self.layout.steps():  # other world sizes' leftovers on this node (a resharded resume)
            if found <= step:
                continue
            for owner, record in self.layout.commits(found).items():
                if record.world_size != engine.world_size:
                    self.layout.remove_commit(found, owner)
                    self.layout.object_path(found, owner).unlink(missing_ok=True)
            self.layout.remove_step_if_abandoned(found)
        engine.forget_after(step, generation)

    def _metadata(self, engine: FlashEngine, found: Survey, step: int) -> Metadata:
        """DCP's global metadata from the coordinator's object of ``step``: its head only (header and
        meta region, verified) from this node or a peer, else the whole object (the durable store)."""
        where = f"rank 0's object of flash step {step}"
        said: list[str] = []
        record = self.layout.read_commit(step, 0)
        if record is not None and record.world_size == self._world:
            try:
                return metadata_of(read_head(self.layout.object_path(step, 0), record), where)
            except (CorruptObjectError, OSError) as exc:
                said.append(str(exc))
        cluster = engine.cluster
        holders = found.flash_holders(step, 0, self._world) if cluster is not None else []
        for holder in holders:
            assert cluster is not None
            peer = cluster.peers[holder]
            if peer.node == cluster.node:
                continue
            try:
                return metadata_of(pull_head(peer, step, 0, cluster.secret), where)
            except (CorruptObjectError, OSError, ValueError) as exc:
                said.append(f"the copy on rank {holder} ({peer.node}): {exc}")
        if said:
            log.warning("flash: reading the metadata of step %d: %s", step, "; ".join(said[:4]))
        return metadata_of(self._object(0).verified.meta, where)  # verified whole, from any tier that has it

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
