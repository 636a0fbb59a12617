"""``FlashStorageWriter``: DCP's ``StorageWriter`` on the flash tier.

The checkpoint id is a step: an int, or the step directory (``writer.step_dir(100)``). A save without
one takes the step after the newest this node holds (give one on several nodes: a replaced node holds
none). The ranks of a step are the group that saves it: the whole world, a ``process_group`` (give it
to the writer too), or one process with ``no_dist=True``.

Call order (DCP's): ``set_up_storage_writer`` -> ``prepare_local_plan`` (this rank's step, its node
and the address its engine will serve on) -> ``prepare_global_plan`` on the coordinator (every rank
names the same step; the introduction the ranks' engines are formed from) -> ``write_data`` (copy into
a flash buffer and commit; the coordinator only copies) -> ``finish`` on the coordinator (commit its
object with the global metadata: the step is complete). The writer runs no collective of its own in
between: a rank that fails anywhere is reported by DCP on every rank.

A rank is owned by one process: from its first save the writer's engine holds the rank's lock, its
buffers and its replication server until ``close()`` (DCP never calls it; the process's end does).
Writers of one job in one process share that engine. ``dcp.async_save`` works with the thread executor
and with the process executor: the writer pickles as its settings, and the checkpoint process builds
the engine it keeps for its later saves.

A preemption notice (SIGTERM) is answered at the next step boundary where the training loop asks::

    if writer.preempted(step):                      # every rank of the group: the same step
        raise writer.save_preempted(step, state)    # dcp.save, replicas and durable copy, Preempted
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ...checks import int_at_least
from .. import preemption, shared
from ..cluster import Introduction
from ..engine import EngineSettings, FlashEngine
from ..layout import FlashLayout, RankLockedError
from ..objects import DEFAULT_CHUNK, plan_tensors
from ..placement import node_key
from ..shelf import StagedObject
from ..uploader import ON_ERROR
from .steps import FlashItem, is_step_id, skeleton, step_of

__all__ = ["FlashStorageWriter"]

log = logging.getLogger(__name__)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


@dataclass(frozen=True)
class _LocalInfo:
    """What a rank tells the coordinator in its local plan: the step it is about to save, and what the
    ranks need to know of each other to form the job (its node, the address its engine will serve on,
    and the formations of the engines it already holds, by world size)."""

    step: int
    node: str = ""
    address: tuple[str, int] | None = None
    formations: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _SaveInfo:
    """What the coordinator sends each rank in its final plan: the rank's place in the group that saves
    (DCP passes no group size, and the group may be a subgroup or a single process), and the
    introduction its engine is formed from. Not the step: with DCP's plan caching a rank may get the
    final plan of an earlier save."""

    rank: int
    world_size: int
    introduction: Introduction | None = None


class FlashStorageWriter(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` that saves into the flash tier of ``job_id`` (one object per rank).

    ``replicas`` copies of every rank's object go to the next nodes in a ring (when the ranks span
    several nodes); every ``durable_every_n_steps``-th step is copied to ``durable`` (an fsspec URL)
    in the background. A durable outage is a warning with the lag in steps (``on_durable_error``).

    It is also ``dcp.async_save``'s stager when none is given: the caller waits for one copy of the
    state into memory the writer keeps from save to save (one copy of the rank's state; two while a
    save is still being written when the next is staged), not for a fresh allocation every time.
    """

    _synchronize_after_execute = False  # staging is done when stage() returns

    def __init__(
        self,
        job_id: str,
        root: str | os.PathLike | None = None,
        *,
        keep: int = 2,
        replicas: int = 1,
        durable: str | os.PathLike | None = None,
        durable_every_n_steps: int | None = None,
        durable_keep: int = 2,
        storage_options: dict | None = None,
        on_durable_error: str = "warn",
        process_group: Any = None,
        threads: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        save_on_preemption: bool = True,
        grace_period: float = preemption.DEFAULT_GRACE_PERIOD,
    ) -> None:
        """Set up the writer; the flash tier is opened at the first save.

        Args:
            job_id: names the job in the flash root and the durable store (the same across restarts).
            root: the flash root, ideally tmpfs; None means ``$STALWART_FLASH_ROOT``, else /dev/shm.
            keep: complete steps kept in tmpfs.
            replicas: copies of each rank's object on the next nodes of a ring.
            durable: an fsspec URL or directory for the durable copy; None keeps flash only.
            durable_every_n_steps: copy every this many steps to ``durable``; None: none.
            durable_keep: complete steps kept in the durable store.
            storage_options: fsspec options for ``durable``.
            on_durable_error: "warn" (a failed copy is a warning with the lag) or "raise".
            process_group: the group DCP saves with, when not the default one.
            threads: copy threads per save; None: one per core, up to 4.
            chunk_size: bytes per checksummed chunk (at least 4096).
            save_on_preemption: answer SIGTERM (``preempted``/``save_preempted``).
            grace_period: seconds the preemption save may take; if it cannot fit, the log says how many
                steps will be lost.
        """
        super().__init__()
        self.layout = FlashLayout(root, job_id)
        self.keep = int_at_least("keep", keep, 1)
        self.replicas = int_at_least("replicas", replicas, 0)
        if isinstance(durable, Path):
            durable = durable.resolve().as_uri()
        if durable is not None and (not isinstance(durable, str) or not durable):
            raise ValueError(f"durable={durable!r} is not accepted; use an fsspec URL or path, or None")
        every = int_at_least("durable_every_n_steps", durable_every_n_steps, 1, optional=True)
        self.durable_every_n_steps = every
        if durable is not None and self.durable_every_n_steps is None:
            self.durable_every_n_steps = 1
        if self.durable_every_n_steps is not None and durable is None:
            raise ValueError("durable_every_n_steps needs durable= (an fsspec URL such as 's3://bucket/job')")
        if on_durable_error not in ON_ERROR:
            raise ValueError(f"on_durable_error={on_durable_error!r} is not accepted; use 'warn' or 'raise'")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict; got {type(storage_options).__name__}")
        self.durable_url = durable
        self._durable = (storage_options, int_at_least("durable_keep", durable_keep, 1), on_durable_error)
        self.chunk_size = int_at_least("chunk_size", chunk_size, 4096)
        self._threads = threads
        self.process_group = process_group
        self._engine: FlashEngine | None = None
        self._engine_key: tuple[int, int] | None = None  # (rank, world size) the engine was taken for
        self._requested: int | None = None  # the step the checkpoint_id of the coming save names
        self._planned: int | None = None  # the step of the save under way
        self.step: int | None = None  # the step of the newest save
        self.rank, self.world_size = 0, 1  # in the group of the newest save
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._staging = _Staging()
        if not isinstance(save_on_preemption, bool):
            raise ValueError(f"save_on_preemption={save_on_preemption!r} is not accepted; use True or False")
        self.grace_period = preemption.check_grace_period(grace_period)
        self._stop = preemption.StopStep(f"stalwart/flash-dcp/{job_id}/preempted")
        self._stopping = False  # the preemption save is under way or done: it takes a durable copy too
        self.save_on_preemption = save_on_preemption and preemption.watch(self)

    def settings(self) -> tuple:
        """What the engine of this writer is built with (writers sharing an engine must agree)."""
        options, durable_keep, on_error = self._durable
        return (
            ("keep", self.keep),
            ("replicas", self.replicas),
            ("durable", self.durable_url),
            ("durable_keep", durable_keep),
            ("storage_options", repr(options)),
            ("on_durable_error", on_error),
            ("chunk_size", self.chunk_size),
        )

    def step_dir(self, step: int) -> Path:
        """The checkpoint id DCP should be given for ``step``."""
        return self.layout.step_dir(step_of(step))

    # dcp.async_save's staging (AsyncStager)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state_dict`` in CPU memory, taken now: what ``dcp.async_save`` saves while the
        caller trains on. The memory is reused by the next save once this one has been written."""
        return self._staging.stage(state_dict)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` copies before it returns."""

    # DCP's calls, in order

    def reset(self, checkpoint_id: str | os.PathLike | int | None = None) -> None:
        """Start a save of the step ``checkpoint_id`` names; without one (``dcp.save_state_dict`` calls
        ``reset()``, ``dcp.save`` without checkpoint_id calls nothing) the step after the newest."""
        self._requested = None if checkpoint_id is None else step_of(checkpoint_id, self.layout)
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
                    f"flash step {requested} is not newer than step {own[-1]}, already saved by this rank; "
                    "committed steps are never rewritten: save a newer step, or call "
                    "writer.continue_from(step) on every rank to forget the steps after the one training "
                    "goes on from"
                )
            self._planned = requested
        info = _LocalInfo(self._planned)
        if _distributed():  # the ranks may span nodes: say where this one's engine will serve
            formations = {w: i.token for w, i in shared.introductions(self.layout, self.rank).items()}
            info = _LocalInfo(self._planned, node_key(), shared.listening(self.layout, self.rank), formations)
        return dataclasses.replace(plan, storage_data=info)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator checks that every rank saves the same step and tells each its place in the
        group that saves it, and how the ranks know each other: so opening the engines in ``write_data``
        needs no collective of its own (a rank that fails before it would leave the others waiting in
        it, where DCP expects them to report)."""
        infos = [p.storage_data for p in plans]
        steps = sorted({i.step for i in infos if isinstance(i, _LocalInfo)})
        if len(steps) > 1:
            raise ValueError(
                f"the ranks name different flash steps ({', '.join(map(str, steps))}); give every rank the "
                "same checkpoint_id (on several nodes always give one: a replaced node holds no step)"
            )
        introduction = self._introduce(infos) if len(plans) > 1 else None
        return [
            dataclasses.replace(plan, storage_data=_SaveInfo(rank, len(plans), introduction))
            for rank, plan in enumerate(plans)
        ]

    def _introduce(self, infos: list[Any]) -> Introduction:
        """The formation the ranks' engines keep (every rank holds it, or can still join it on the
        address it was introduced at), else a new one from the addresses the ranks gave."""
        world = len(infos)
        if not all(isinstance(i, _LocalInfo) and i.address is not None for i in infos):
            raise ValueError(
                "a rank's save plan lost FlashStorageWriter's SavePlan.storage_data, or was made without "
                "torch.distributed; a SavePlanner must keep it from prepare_local_plan to prepare_global_plan"
            )
        current = shared.introductions(self.layout, self.rank).get(world)
        if current is not None and all(
            info.formations.get(world) == current.token
            or (world not in info.formations and (info.node, info.address) == current.members[rank])
            for rank, info in enumerate(infos)
        ):
            return current
        return Introduction.draw([(info.node, info.address) for info in infos])

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
        engine = self._take_engine(info.rank, info.world_size, info.introduction)
        saves = _saves_of(engine)
        if not saves.busy.acquire(blocking=False):
            raise RankLockedError(
                f"another save of rank {info.rank} of flash job {self.layout.job_id!r} is under way in this "
                f"process (pid {os.getpid()}); saves of one rank take turns"
            )
        try:
            saves.drop_staged(engine)  # a coordinator's save that failed on another rank: never finished
            tensors, is_bytes = _resolve(plan, planner)
            staged = engine.stage(step, skeleton(None), tensors, hash_now=True)
            if staged is None:
                raise ValueError(
                    f"flash step {step} is already committed by rank {info.rank}; it is not rewritten"
                )
            self._staging.written(tensors)  # in the flash buffer now: the staged copy may be reused
            if self.is_coordinator:
                saves.staged = (self.save_id, step, staged)  # committed in finish, with the metadata
            else:
                engine.commit(step, staged, durable=self._durable_step(step))
                self.save_id = uuid.uuid4().hex
        finally:
            saves.busy.release()
        entries, _, _ = plan_tensors(tensors)
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=entry.nbytes,
                storage_data=FlashItem(
                    info.rank,
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
        """The coordinator commits its object last, carrying the global metadata: the step is complete."""
        engine = self._engine
        saves = _saves_of(engine) if engine is not None else None
        if engine is None or saves is None or saves.staged is None or saves.staged[0] != self.save_id:
            raise ValueError(
                "FlashStorageWriter.finish has no staged object of this save: write_data did not run on the "
                "coordinator, or a later save of the rank replaced it"
            )
        _, step, staged = saves.staged
        saves.staged = None
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = StorageMeta(str(self.layout.step_dir(step)), save_id=self.save_id)
        body = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            staged = engine.shelf.with_skeleton(staged, skeleton(body))
        except BaseException:
            engine.discard(staged)
            raise
        engine.commit(step, staged, durable=self._durable_step(step))
        self.save_id = uuid.uuid4().hex

    def storage_meta(self) -> StorageMeta | None:
        step = self._requested
        return StorageMeta(
            checkpoint_id=str(self.layout.step_dir(step)) if step is not None else None, save_id=self.save_id
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_step_id(checkpoint_id)

    # beyond DCP

    def continue_from(self, step: int) -> list[int]:
        """Training goes on from ``step`` (loaded from an older step, or from elsewhere): the steps this
        rank saved after it are forgotten in every tier so that their numbers can be saved again.
        Collective: call it on every rank of the group that saves. Returns the flash steps forgotten."""
        int_at_least("step", step, 0)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        else:
            rank, world = 0, 1
        return self._take_engine(rank, world).continue_from(step)

    def preempted_at(self, at: float) -> None:
        """SIGTERM arrived (called by the signal handler): watch the grace period."""
        if self.save_on_preemption:
            preemption.start_watchdog(at + self.grace_period, self._late)

    def _late(self) -> str | None:
        if self._stopping:
            return None
        return (
            f"no preemption save (FlashStorageWriter.save_preempted) within the {self.grace_period:.0f} s "
            f"grace period after SIGTERM: what was trained after step {self.step} will be lost when the "
            "process is killed"
        )

    def preempted(self, step: int) -> bool:
        """Whether training stops at this step boundary after a preemption notice (SIGTERM): ask at every
        boundary, and when True, ``raise writer.save_preempted(step, state)``. Every rank of the group
        that saves is told True at the same step (``preemption.StopStep``: one store round trip per
        call with several ranks)."""
        int_at_least("step", step, 0)
        if not self.save_on_preemption:
            return False
        if _distributed():
            import torch.distributed as dist

            world = dist.get_world_size(self.process_group)
        else:
            world = 1
        return self._stop.reached(step, world)

    def save_preempted(self, step: int, state_dict: dict[str, Any], **save_kwargs: Any) -> BaseException:
        """The preemption save: ``dcp.save`` of ``step`` through this writer (``save_kwargs`` such as
        ``planner`` go to it), with a durable copy when there is a store, then wait for its replicas and
        uploads (the next attempt may run elsewhere) and close. Returns the ``Preempted`` (a
        ``SystemExit``, code 143) to raise: the attempt is recorded as preempted and resumes here."""
        import torch.distributed.checkpoint as dcp

        int_at_least("step", step, 0)
        self._stopping = True
        if not self._saved_everywhere(step):
            dcp.save(
                state_dict,
                checkpoint_id=step,
                storage_writer=self,
                process_group=self.process_group,
                **save_kwargs,
            )
        elif self._engine is not None:  # a regular save of this step: its durable copy may be missing
            self._engine.make_durable(step)
        self.wait()
        at = preemption.notice()
        where = (
            "flash"
            + (", its replicas" if self.replicas else "")
            + (" and durable" if self.durable_url else "")
        )
        when = f"{time.monotonic() - at:.1f} s after SIGTERM" if at else "(SIGTERM reached another rank)"
        log.warning("flash: preempted: DCP step %d saved to %s %s", step, where, when)
        self.close()
        return preemption.Preempted(f"preempted by SIGTERM: DCP step {step} saved to {where}", step)

    def _saved_everywhere(self, step: int) -> bool:
        """Whether every rank of the group committed ``step`` already (a regular save of the step the
        loop stops at). Collective with several ranks: they must all call ``dcp.save``, or none."""
        saved = self._engine is not None and step in self._engine.shelf.own
        if not _distributed():
            return saved
        import torch.distributed as dist

        flag = torch.tensor(int(saved))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
        return bool(flag)

    def wait(self) -> None:
        """Block until this rank's replicas and durable copies are made; raise what failed."""
        if self._engine is not None:
            self._engine.wait()

    def close(self) -> None:
        """Finish background work and let go of the rank (the last writer of a job in this process
        closes its engine: buffers are freed, committed steps stay); the writer stays usable."""
        self._let_go()
        shared.stop_listening(self.layout, self.rank)

    # internals

    def _let_go(self) -> None:
        if self._engine is not None and self._engine_key is not None:
            _saves_of(self._engine).drop_staged(self._engine)
            self._engine = None
            shared.let_go(self.layout, *self._engine_key)
            self._engine_key = None

    def _durable_step(self, step: int) -> bool:
        every = self.durable_every_n_steps
        return every is not None and (step % every == 0 or self._stopping)

    def _take_engine(
        self, rank: int, world_size: int, introduction: Introduction | None = None
    ) -> FlashEngine:
        """The engine of this rank in the group that saves; without an introduction (``continue_from``,
        or one process) opening it is collective."""
        current = self._engine
        if current is not None and self._engine_key == (rank, world_size):
            if introduction is None or current.introduction == introduction:
                return current
        else:
            self._let_go()  # the group changed (another subgroup, no_dist): hold the engine of the new one
        group = None if world_size == 1 else self.process_group
        if world_size > 1:
            import torch.distributed as dist

            size = dist.get_world_size(group) if dist.is_initialized() else 1
            if size != world_size:
                raise ValueError(
                    f"this save's group has {world_size} ranks but the writer's process group has {size}; "
                    "give the group DCP saves with to the writer too: FlashStorageWriter(..., "
                    "process_group=group)"
                )

        def build() -> FlashEngine:
            options, durable_keep, on_error = self._durable
            settings = EngineSettings(
                self.keep, self.replicas, self.durable_url, options, durable_keep, on_error, self.chunk_size
            )
            settings = dataclasses.replace(settings, threads=self._threads)
            listener = shared.take_listener(self.layout, rank) if introduction is not None else None
            try:
                return settings.build(
                    self.layout,
                    rank,
                    world_size,
                    process_group=group,
                    introduction=introduction,
                    listener=listener,
                )
            except BaseException:
                if listener is not None:
                    listener.close()
                raise

        hold = self._engine_key != (rank, world_size)  # this writer holds the engine once per group
        self._engine = shared.engine_for(
            self.layout, rank, world_size, self.settings(), build, introduction=introduction, hold=hold
        )
        self._engine_key = (rank, world_size)
        return self._engine

    def __getstate__(self) -> dict:
        """Settings only: the process executor builds the engine in its own process. The rank must be
        free for it, so engines a load opened in this process close now (the load has ended)."""
        if self._engine is not None:
            raise TypeError(
                "this FlashStorageWriter already saved in this process and holds its rank; use a new writer "
                "for dcp.async_save with the process executor"
            )
        if self.process_group is not None:
            raise TypeError(
                "dcp.async_save's process executor saves over its own default group; a FlashStorageWriter "
                "with a process_group cannot be sent to it (use the thread executor)"
            )
        shared.close_idle(self.layout)
        state = dict(self.__dict__)
        state["save_id"] = uuid.uuid4().hex
        return state


class _Staging:
    """The copies ``stage`` hands DCP, kept for the next saves: a copy is *lent* until ``write_data``
    has copied it into the flash buffer (in this process; a copy the process executor writes elsewhere
    never comes back and is left to the garbage collector), then *free* for a state of the same shape.
    A lent copy is never staged into again, so a save that is still being written is never changed."""

    LENT_TRACKED = 2  # lent copies remembered; an older one (its save failed, or went elsewhere) is let go

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: tuple[tuple, dict[str, Any]] | None = None
        self._lent: list[tuple[tuple, frozenset[int], dict[str, Any]]] = []

    def __reduce__(self) -> tuple:
        return (_Staging, ())  # sent to another process (with its writer): the copies stay here

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        signature = _signature(state_dict)
        with self._lock:
            free, self._free = self._free, None
        if free is None or free[0] != signature:
            copy = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        else:
            copy = free[1]
        staged = _copy_state_dict(state_dict, copy, type_check=False)
        with self._lock:
            self._lent.append((signature, _storages(staged), staged))
            del self._lent[: -self.LENT_TRACKED]
        return staged

    def written(self, tensors: list[torch.Tensor]) -> None:
        """``tensors`` (a save's items) are in the flash buffer: the lent copy they came from is free."""
        if not self._lent:
            return
        used = {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}
        with self._lock:
            for entry in self._lent:
                signature, storages, staged = entry
                if storages & used:  # items of this copy (DCP may have left the rest to other ranks)
                    self._lent.remove(entry)
                    self._free = (signature, staged)
                    return


def _signature(state_dict: dict[str, Any]) -> tuple:
    """What a staged copy must match to be reused: the tree and every tensor's kind, dtype and shape."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(state_dict)
    kinds: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            local = getattr(leaf, "_local_tensor", leaf)  # a DTensor's shard
            kinds.append((type(leaf), leaf.dtype, tuple(leaf.shape), tuple(local.shape)))
        elif hasattr(leaf, "local_shards"):  # a ShardedTensor
            kinds.append(
                (
                    type(leaf),
                    tuple(
                        (tuple(s.tensor.shape), tuple(s.metadata.shard_offsets)) for s in leaf.local_shards()
                    ),
                )
            )
        else:
            kinds.append(type(leaf))
    return (spec, tuple(kinds))


def _storages(state_dict: dict[str, Any]) -> frozenset[int]:
    """The storages of the tensors in a staged copy (how ``written`` recognises it)."""
    from torch.utils._pytree import tree_flatten

    found = set()
    for leaf in tree_flatten(state_dict)[0]:
        if isinstance(leaf, torch.Tensor):
            found.add(getattr(leaf, "_local_tensor", leaf).untyped_storage().data_ptr())
        elif hasattr(leaf, "local_shards"):
            found.update(s.tensor.untyped_storage().data_ptr() for s in leaf.local_shards())
    found.discard(0)  # empty tensors have no storage
    return frozenset(found)


class _RankSaves:
    """The saves of one engine's rank in this process, whichever writer makes them: ``busy`` while one
    writes (two at once are refused), and the coordinator's object staged until ``finish``."""

    def __init__(self) -> None:
        self.busy = threading.Lock()
        self.staged: tuple[str, int, StagedObject] | None = None  # (save id, step, object)

    def drop_staged(self, engine: FlashEngine) -> None:
        if self.staged is not None:
            engine.discard(self.staged[2])
            self.staged = None


_saves: weakref.WeakKeyDictionary[FlashEngine, _RankSaves] = weakref.WeakKeyDictionary()
_saves_guard = threading.Lock()


def _saves_of(engine: FlashEngine) -> _RankSaves:
    with _saves_guard:
        return _saves.setdefault(engine, _RankSaves())


def _resolve(plan: SavePlan, planner: SavePlanner) -> tuple[list[torch.Tensor], list[bool]]:
    """The tensors of a rank's write items, bytes items as uint8 tensors."""
    tensors: list[torch.Tensor] = []
    is_bytes: list[bool] = []
    for item in plan.items:
        data = planner.resolve_data(item)
        is_bytes.append(isinstance(data, io.BytesIO))
        if isinstance(data, io.BytesIO):
            raw = bytearray(data.getbuffer())
            empty = torch.empty(0, dtype=torch.uint8)
            tensors.append(torch.frombuffer(raw, dtype=torch.uint8) if raw else empty)
        else:
            tensors.append(data.detach())
    return tensors, is_bytes
