"""FlashEngine: save and load one rank's state dict through the flash tier.

``save`` blocks only for the copy out of the training tensors when ``async_save=True``: checksums,
metadata, the commit record, retention and replication run on a background thread, and an error there
is raised by the next call, never dropped. The durable copy goes through a ``DurableUploader``: in the
background for non-blocking saves, before returning for blocking ones; a durable outage is a warning
with the lag, never a lost flash save. ``load`` restores the newest step every rank can obtain from
any tier (``restore``), copies it into the caller's tensors in place (from peers it is received there
directly, ``recovery``), and forgets what came after it.

Memory per rank, in buffers the size of one saved object: ``keep + 1`` (the kept steps and the one
being written), plus up to 2 while non-blocking saves wait for the durable store and 2 while replication
lags (one in flight, the newest waiting); replicas kept for other nodes add ``keep + 1`` per source
(``capacity``). The first save checks that this fits in the flash root.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..checks import int_at_least
from ..runtime import events
from .capacity import check_room
from .cluster import Cluster, Introduction
from .copier import Copier
from .durable import DurableTier
from .errors import FlashError, FlashRestoreError, FlashSpaceError
from .layout import FlashLayout, RankLockedError
from .objects import DEFAULT_CHUNK, load_meta
from .placement import RingPlacement
from .recovery import Head, Landing, UnfitState, plan_landing
from .reshard import check_reshard, drop_other_worlds
from .restore import holdings, restore_newest
from .shelf import RankShelf, StagedObject, VerifiedObject
from .tree import check_shapes, flatten, merge_into
from .uploader import DurableUploader

__all__ = ["FlashEngine", "FlashError", "FlashSpaceError"]

log = logging.getLogger(__name__)


class _Group:
    """The collectives restore needs, over torch.distributed when it is initialised."""

    def __init__(self, world_size: int, process_group: Any = None) -> None:
        self.world_size = world_size
        self.process_group = process_group
        if world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"world_size={world_size} needs torch.distributed initialised (init_process_group) "
                    "before a flash restore: the ranks must agree on the step they load"
                )

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.process_group)
        return out


@dataclass(frozen=True)
class EngineSettings:
    """How a rank's engine is built: what ``FlashCheckpointer`` and ``FlashStorageWriter`` are given."""

    keep: int = 2
    replicas: int = 1
    durable: str | None = None  # an fsspec URL; None: flash only
    storage_options: dict | None = None
    durable_keep: int = 2
    on_durable_error: str = "warn"
    chunk_size: int = DEFAULT_CHUNK
    threads: int | None = None

    def build(self, layout: FlashLayout, rank: int, world_size: int, **more: Any) -> FlashEngine:
        """The engine of ``rank`` of ``world_size`` (``more``: process_group, introduction, listener)."""
        durable = None
        if self.durable is not None:
            durable = DurableTier(self.durable, self.storage_options, keep=self.durable_keep)
        return FlashEngine(
            layout,
            rank=rank,
            world_size=world_size,
            keep=self.keep,
            durable=durable,
            chunk_size=self.chunk_size,
            threads=self.threads,
            replicas=self.replicas,
            on_durable_error=self.on_durable_error,
            **more,
        )


class FlashEngine:
    """One rank of one flash job: the state-dict API over a RankShelf, plus the durable tier."""

    def __init__(
        self,
        layout: FlashLayout,
        *,
        rank: int = 0,
        world_size: int = 1,
        keep: int = 2,
        durable: DurableTier | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        threads: int | None = None,
        process_group: Any = None,
        replicas: int = 0,
        on_durable_error: str = "warn",
        introduction: Introduction | None = None,
        listener: socket.socket | None = None,
        visit_if_owned: bool = False,
        alone: bool = False,
    ) -> None:
        """``introduction`` (with this rank's ``listener``): the ranks already know of each other (DCP's
        plans told them), so opening the engine is not collective, and a failure raises on this rank
        only; without one, every rank of the group constructs its engine at the same point.
        ``visit_if_owned``: for a load, when another live process owns the rank, open as a visitor
        (``self.visitor``): read and serve only; no save, no replica kept, nothing of the rank changed.
        ``alone``: open this rank on its node only, without meeting the others (not collective; no
        replication, no peer reachable)."""
        int_at_least("world_size", world_size, 1)
        int_at_least("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(
                f"rank={rank} is not accepted with world_size={world_size}; use 0..{world_size - 1}"
            )
        int_at_least("keep", keep, 1)
        int_at_least("chunk_size", chunk_size, 4096)
        self.layout, self.rank, self.world_size, self.keep = layout, rank, world_size, keep
        self.durable = durable
        self.chunk_size = chunk_size
        self._group = _Group(world_size, process_group)
        self.copier = Copier(threads)
        self.cluster: Cluster | None = None
        self.shelf: RankShelf = None  # type: ignore[assignment]  # None only while construction fails
        self.uploader: DurableUploader | None = None
        self.visitor = False
        failure: BaseException | None = None
        try:
            if introduction is not None:
                if len(introduction.members) != world_size:
                    raise ValueError(
                        f"the introduction names {len(introduction.members)} ranks; world_size={world_size}"
                    )
                self.cluster = Cluster.form(
                    layout, rank, introduction, listener, self.copier, RingPlacement(replicas)
                )
            elif not alone:
                self.cluster = Cluster.join(
                    layout, rank, world_size, self._group, self.copier, RingPlacement(replicas)
                )
            board = self.cluster.board if self.cluster else None
            try:
                self.shelf = RankShelf(layout, rank, world_size, keep=keep, copier=self.copier, board=board)
            except RankLockedError:
                if not visit_if_owned:
                    raise
                self.shelf = RankShelf(
                    layout, rank, world_size, keep=keep, copier=self.copier, board=board, owner=False
                )
            self.visitor = not self.shelf.owner
            if self.cluster and not self.visitor:
                self.cluster.start(self.shelf, keep)
            if durable is not None and not self.visitor:
                self.uploader = DurableUploader(durable, self.shelf, world_size, on_error=on_durable_error)
        except Exception as exc:  # e.g. RankLockedError: close what was built, and tell the other ranks
            failure = exc
            self._close_parts()
        if (introduction is not None or alone) and failure is not None:
            raise failure
        if introduction is None and not alone:
            self._agree("open the flash tier", failure)
        self.introduction = introduction
        self._commits = ThreadPoolExecutor(1, thread_name_prefix="stalwart-commit")
        self._pending: tuple[int, Future] | None = None
        self._room_checked = False
        self._closed = False
        self.last_save_blocked: float = 0.0  # seconds the caller waited in the newest save
        self.restored_from: str | None = None  # "flash", "peer" or "durable" after a load that found a step
        # the step the last load restored: this rank may not hold it (a peer's copy landed in the state),
        # yet saves must not repeat it
        self._restored: int | None = None
        self._reseed: threading.Thread | None = None  # pulls a step restored from peers into tmpfs again

    # saving

    def save(
        self, step: int, state: MutableMapping[str, Any], *, async_save: bool = False, durable: bool = False
    ) -> bool:
        """Save ``state`` as ``step``; returns False when this rank already committed that step.

        With ``durable``, the step is copied to the durable store too: before returning unless ``async_save``,
        else in the background. A failed copy is a warning (the flash save is made either way).
        """
        started = time.perf_counter()
        if not isinstance(state, MutableMapping):
            raise TypeError(f"state must be a dict (a state dict); got {type(state).__name__}")
        skeleton, tensors = flatten(state)
        staged = self.stage(step, skeleton, tensors, hash_now=not async_save, durable=durable)
        if staged is None:
            return False
        self.commit(step, staged, durable=durable, background=async_save, upload_now=not async_save)
        self.last_save_blocked = time.perf_counter() - started
        events.record(
            "flash_save", step=step, blocked=round(self.last_save_blocked, 6), bytes=staged.data_size
        )
        return True

    def stage(
        self, step: int, skeleton: Any, tensors: list[Any], *, hash_now: bool = True, durable: bool = False
    ) -> StagedObject | None:
        """Copy ``tensors`` into a free buffer for ``step`` (the part of a save training waits for); None
        when this rank already committed ``step``. Commit it with ``commit``, or give it back with
        ``discard``. Steps must grow: an older step is refused."""
        self._check_open()
        self._check_owner()
        int_at_least("step", step, 0)
        if durable and self.uploader is None:
            raise ValueError("durable=True needs a durable store; pass durable='s3://...' or a local path")
        self._settle(wait=True)
        restored = [] if self._restored is None else [self._restored]
        newest = max([*self.shelf.own, *restored], default=None)
        if newest is not None and step <= newest:
            if step == newest:
                log.info("flash: step %d is already committed for rank %d; not saved again", step, self.rank)
                return None
            raise ValueError(
                f"step {step} is older than step {newest}, the newest this rank committed; steps must grow. "
                "Call restore() first (it forgets steps of an abandoned timeline) or use a new job_id"
            )
        if not self._room_checked:
            self._check_room(self.shelf.object_size(skeleton, tensors, chunk_size=self.chunk_size))
            self._room_checked = True
        return self.shelf.stage(skeleton, tensors, chunk_size=self.chunk_size, hash_now=hash_now)

    def discard(self, staged: StagedObject) -> None:
        """Give back a staged object that will not be committed (its save failed elsewhere)."""
        self.shelf.release(staged.buffer)

    def commit(
        self,
        step: int,
        staged: StagedObject,
        *,
        durable: bool = False,
        background: bool = False,
        upload_now: bool = False,
    ) -> None:
        """Commit a staged object, replicate it, copy it to the durable store (``upload_now``: before
        returning; else in the background) and apply retention; with ``background`` all of it runs on the
        commit thread and a failure is raised by the next call."""

        def finish() -> None:
            record = self.shelf.commit_staged(step, staged)
            if self.cluster:
                self.cluster.replicate(record)
            if durable and self.uploader is not None:
                if upload_now:
                    self.uploader.upload_now(record)
                else:
                    self.uploader.submit(record)
            self.shelf.retain()

        if background:
            self._pending = (step, self._commits.submit(finish))
        else:
            finish()
        if self.uploader is not None:
            self.uploader.check()  # on_durable_error="raise": after the flash save, never instead of it

    def make_durable(self, step: int) -> None:
        """Copy this rank's committed ``step`` to the durable store before returning, unless it is there
        already: the preemption save of a step a regular save made without a durable copy."""
        self._check_open()
        self._check_owner()
        self._settle(wait=True)
        if self.uploader is None or self.durable is None:
            return
        if self.durable.rank_record(step, self.rank) is not None:
            return
        record = self.layout.read_commit(step, self.rank)
        if record is None or step not in self.shelf.own:
            raise FlashError(f"step {step} of rank {self.rank} is not committed here: nothing to copy")
        self.uploader.drain()
        self.uploader.upload_now(record)

    def _check_room(self, object_size: int) -> None:
        """The first save knows the object size: check the flash root can hold what this config needs."""
        check_room(
            self.layout,
            object_size,
            keep=self.keep,
            durable=self.uploader is not None,
            replicating=bool(self.cluster and self.cluster.replicator),
            replica_sources=len(self.cluster.server.keepers) if self.cluster else 0,
            world_size=self.world_size,
        )

    def _settle(self, *, wait: bool) -> None:
        """Raise what failed in the background; with ``wait``, first let the pending commit finish."""
        if self._pending is not None and (wait or self._pending[1].done()):
            step, future = self._pending
            self._pending = None
            try:
                future.result()
            except FlashError as exc:  # FlashSpaceError above all: callers catch it by name
                exc.add_note(f"(raised by the background commit of flash step {step})")
                raise
            except BaseException as exc:
                raise FlashError(f"flash save of step {step} failed in the background: {exc}") from exc

    def wait(self) -> None:
        """Block until every pending commit, upload, replication and re-seed is done; raise the first
        failure (a durable copy that failed is raised here once, even when saves only warned about it)."""
        self._settle(wait=True)
        self._join_reseed()
        if self.cluster:
            self.cluster.wait()
        if self.uploader is not None:
            self.uploader.wait()

    # loading

    def load(
        self, state: MutableMapping[str, Any], *, step: int | None = None, reshard: str | None = None
    ) -> int | None:
        """Restore the newest step every rank can obtain from any tier into ``state`` (in place), or
        ``step``, which some tier must hold whole (FlashRestoreError naming what each tier holds if not).
        ``reshard`` "replicated": a step saved by another world size counts too; every rank restores
        saved rank 0's object of it (``reshard``).

        Returns the step, or None when no tier holds any checkpoint of this job. Raises
        FlashRestoreError when one exists but cannot be read. Steps newer than the one restored are
        forgotten in every tier (they belong to an abandoned timeline).

        An object pulled from peers is received straight into the state's tensors and verified there;
        if the load then raises, those tensors may hold bytes of a step that was not restored.
        """
        self._check_open()
        self._check_owner()
        if not isinstance(state, MutableMapping):
            raise TypeError(f"state must be a dict (a state dict); got {type(state).__name__}")
        self._quiesce()
        self.restored_from = None
        if step is not None:
            int_at_least("step", step, 0)
        check_reshard(reshard)
        started = time.perf_counter()
        landings: list[Landing] = []  # every landing made, also of steps not restored in the end
        restored = restore_newest(
            self.shelf,
            self._group,
            self.copier,
            self.cluster,
            self.durable,
            land=functools.partial(self._landing, state, landings),
            step=step,
            reshard=reshard,
        )
        step = restored.step
        failure: BaseException | None = restored.unfit
        if failure is None and (restored.verified is not None or restored.landing is not None):
            try:
                if restored.landing is not None:
                    filled = self._land(restored.landing, state)
                else:
                    assert restored.verified is not None
                    filled = self._apply(restored.verified, state)
                _check_covered(landings, filled, step)
            except Exception as exc:  # told to the other ranks first: they must not wait for this one
                failure = exc
            else:
                log.log(
                    logging.WARNING if restored.source == "durable" else logging.INFO,
                    "flash: rank %d restored step %d%s from %s in %.3f s",
                    self.rank,
                    step,
                    "" if restored.world is None else f" (saved by {restored.world} ranks: rank 0's object)",
                    self.durable.url if restored.source == "durable" and self.durable else restored.source,
                    time.perf_counter() - started,
                )
            finally:
                if restored.dispose is not None:
                    restored.dispose()
        if restored.world is not None and isinstance(failure, ValueError):
            failure = ValueError(
                f"step {step} was saved by {restored.world} ranks and is restored as replicated state "
                f"(saved rank 0's object on each of this job's {self.world_size} ranks), which this state "
                f"cannot take: {failure}"
            )
        self._agree("load the restored step", failure)
        if restored.other_worlds:  # steps of another world size: they go once one of this world is safe
            self.shelf.on_safe = self._drop_other_worlds
        self.restored_from = restored.source
        self._restored = step
        took = time.perf_counter() - started
        reached = events.reached_before() if self.rank == 0 else None  # rank 0 speaks for the run
        events.record(
            "flash_restore",
            step=step,
            source=restored.source,
            seconds=round(took, 6),
            saved_by=restored.world,
            lost=max(0, reached - (step or 0)) if reached is not None else None,  # nothing restored: all
        )
        self._cut_timeline(step, restored.durable_steps, durable_listed=restored.durable_steps is not None)
        if restored.landing is not None:
            assert step is not None  # a landing is of a step
            self._start_reseed(step)
        return step

    def _start_reseed(self, step: int) -> None:
        """The step landed in the caller's tensors from peers: pull a copy into tmpfs again in the
        background (memory the next saves would fault in anyway), so losing those peers loses nothing."""
        recovered = self.cluster.recovered if self.cluster else None
        if recovered is None or recovered[0] != step or not self.shelf.owner:
            return
        assert self.cluster is not None
        self._reseed = threading.Thread(
            target=self.cluster.reseed,
            args=(self.shelf, step, recovered[1], lambda: self._restored == step and not self._closed),
            name="stalwart-reseed",
            daemon=True,
        )
        self._reseed.start()

    def _join_reseed(self) -> None:
        if self._reseed is not None:
            self._reseed.join()  # bounded: its pull fails within the sockets' timeouts
            self._reseed = None

    def steps(self) -> dict[str, list[int]]:
        """Collective: the steps each tier holds whole, {"flash": [...], "durable": [...]} (flash counts
        every node's tmpfs, replicas included; "durable" is absent without a durable store)."""
        self._check_open()
        found = holdings(self.shelf, self._group, self.cluster, self.durable)
        listed = {"flash": sorted(found.flash)}
        if self.durable is not None:
            if found.durable is None:
                raise FlashRestoreError(f"the durable store {self.durable.url} could not be listed")
            listed["durable"] = sorted(found.durable)
        return listed

    def continue_from(self, step: int) -> list[int]:
        """Training goes on from ``step``, restored from elsewhere (a regular checkpoint file): this
        rank's steps after it belong to an abandoned timeline and are forgotten in every tier, as after
        ``load``. Returns the flash steps forgotten. Collective with several nodes."""
        self._check_open()
        self._check_owner()
        int_at_least("step", step, 0)
        self._quiesce()
        abandoned = sorted(s for s in self.shelf.own if s > step)
        if abandoned:
            log.warning(
                "flash: training continues from step %d restored from elsewhere; the newer flash steps %s of "
                "job %r belong to an abandoned timeline and are forgotten",
                step,
                ", ".join(map(str, abandoned)),
                self.layout.job_id,
            )
        self._cut_timeline(step, None, durable_listed=True)
        if self._restored is not None and self._restored > step:
            self._restored = step
        return abandoned

    def forget_after(self, step: int, generation: str) -> None:
        """``continue_from`` for a load that already agreed on ``step`` through other means (DCP's
        plans): not collective, and a failure raises on this rank only. ``generation`` (the same on
        every rank) names the new timeline on the board. The caller must keep every rank from saving
        until all have forgotten (DCP's load ends with a collective that does)."""
        self._check_open()
        self._check_owner()
        int_at_least("step", step, 0)
        self._quiesce()
        self._cut_timeline(step, None, durable_listed=True, generation=generation)

    def _drop_other_worlds(self, safe: int) -> bool:
        """Once a step of this world size newer than the one restored is safe, what other world sizes
        left in this node's tmpfs goes. True when done."""
        if self._restored is not None and safe <= self._restored:
            return False
        dropped = drop_other_worlds(self.layout, self.world_size, keep=lambda s: False)
        if dropped:
            log.info(
                "flash: dropped step(s) %s saved by another world size from %s: a step of this job's %d "
                "ranks is safe",
                dropped,
                self.layout.job_dir,
                self.world_size,
            )
        return True

    def _quiesce(self) -> None:
        """Let what this rank has in flight (a commit, replication, an upload) finish before the timeline
        is cut: a replica or a durable copy of a step about to be abandoned must not land after the cut."""
        self._settle(wait=True)
        self._join_reseed()
        if self.cluster:
            self.cluster.wait(None)
        if self.uploader is not None:
            self.uploader.drain()

    def _agree(self, what: str, failure: BaseException | None) -> None:
        """Collective: raise on every rank if ``what`` failed on any (the failing rank raises its own)."""
        notes = self._group.gather("" if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        failed = [f"rank {rank}: {note}" for rank, note in enumerate(notes) if note]
        if failed:
            raise FlashRestoreError(f"could not {what} on every rank: {'; '.join(failed[:4])}")

    def _cut_timeline(
        self,
        step: int | None,
        durable_steps: frozenset[int] | None,
        *,
        durable_listed: bool,
        generation: str | None = None,
    ) -> None:
        """Forget this rank's steps after ``step`` in every tier: they must never be restored, nor stand in
        the way of the new timeline's steps of the same numbers.

        Collective: no rank goes on before every rank has cut, and if one could not forget its durable
        copies, every rank raises (a step of the durable store would otherwise hold one rank of the new
        timeline and another of the old). ``durable_listed`` False: the restore could not list the store,
        so its steps were not considered and are left alone; ``durable_steps`` None: list them now.
        ``generation`` given: the ranks agreed elsewhere; nothing here is collective.
        """
        self.shelf.drop_newer_than(step)
        drop_other_worlds(self.layout, self.world_size, keep=lambda s: step is not None and s <= step)
        failure: BaseException | None = None
        if self.uploader is not None and self.durable is not None and durable_listed:
            for attempt in range(3):
                try:
                    if durable_steps is None:
                        durable_steps = frozenset(self.durable.complete_steps(self.world_size))
                    dropped = self.durable.drop_newer_than(self.rank, self.world_size, step)
                except Exception as exc:
                    failure = FlashRestoreError(
                        f"cannot forget the durable copies after step {step} in {self.durable.url} ({exc}); "
                        "training must not go on from an older step while they remain"
                    )
                    time.sleep(0.5 * 2**attempt)
                    continue
                failure = None
                if dropped:
                    log.warning(
                        "flash: dropped durable step(s) %s of rank %d: newer than step %s, where training "
                        "goes on",
                        dropped,
                        self.rank,
                        step,
                    )
                break
        elif self.uploader is not None and self.durable is not None:
            log.warning(
                "flash: the durable store %s could not be listed: its steps after %s were not forgotten; "
                "an upload of the same step number will be refused and said so",
                self.durable.url,
                step,
            )
        if generation is not None and failure is not None:
            raise failure
        if generation is None:
            self._agree("forget the steps after the one training goes on from", failure)
        if self.uploader is not None:
            self.uploader.restart_at(step, durable_steps or frozenset())
            if durable_listed:
                self.uploader.collect_leftovers()  # nothing of this rank uploads now: kills' leftovers go
        if self.cluster:
            self.cluster.after_restore(step, self._group, generation)

    def _apply(self, verified: VerifiedObject, state: MutableMapping[str, Any]) -> list[Any]:
        """Copy a verified object into ``state``; the tensors filled."""
        skeleton, entries = load_meta(verified.meta)
        check_shapes(skeleton, state, entries, "state")  # refuse before anything in the state changes
        pairs: list[tuple[Any, Any]] = []
        created: dict[int, Any] = {}
        merge_into(skeleton, state, entries, pairs, created, "state")
        self.copier.copy_out(verified.buffer, [e for e, _ in pairs], [t for _, t in pairs])
        return [t for _, t in pairs]

    def _landing(self, state: MutableMapping[str, Any], made: list[Landing], head: Head) -> Landing:
        """Where an object pulled from peers lands in ``state``: its tensors, and tensors made for what
        the state lacks; the landing is also appended to ``made``. The state's structure changes only
        once the data is verified (``_land``)."""
        skeleton, entries = load_meta(head.meta)
        pairs: list[tuple[Any, Any]] = []
        created: dict[int, Any] = {}
        try:
            check_shapes(skeleton, state, entries, "state")
            merge_into(skeleton, state, entries, pairs, created, "state", write=False)
        except ValueError as exc:
            raise UnfitState(str(exc)) from exc
        landing = plan_landing(head.header, pairs, context=(skeleton, entries, created, pairs))
        made_here = {id(t) for t in created.values()}  # not the caller's: never seen if not restored
        landing.written = [t for t in landing.written if id(t) not in made_here]
        made.append(landing)
        return landing

    def _land(self, landing: Landing, state: MutableMapping[str, Any]) -> list[Any]:
        """Finish a verified landing: scratch copies in, the saved structure laid over ``state``; the
        tensors filled."""
        landing.finish()
        skeleton, entries, created, pairs = landing.context
        merge_into(skeleton, state, entries, [], created, "state")
        return [t for _, t in pairs]

    # life cycle

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this flash checkpointer is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_owner(self) -> None:
        if self.visitor:
            raise RankLockedError(
                f"rank {self.rank} of flash job {self.layout.job_id!r} is owned by another live process; "
                "this process opened it to read only (a load while the owner saves) and cannot change its "
                "steps"
            )

    def close(self) -> None:
        """Finish background work, unmap buffers and free the pool (committed steps stay on tmpfs)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._commits.shutdown(wait=True)
            self._join_reseed()
            self._close_parts()

    def _close_parts(self) -> None:
        if self.cluster:
            self.cluster.close()
        if self.uploader is not None:
            self.uploader.close()
        if self.shelf is not None:
            self.shelf.close()
        self.copier.close()

    def __enter__(self) -> FlashEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_covered(landings: list[Landing], filled: list[Any], step: int | None) -> None:
    """Raise if a tensor of the state took bytes from peers for a step that was not restored in the end
    (another rank found it corrupt everywhere) and the step restored does not hold that tensor."""
    covered = {id(t) for t in filled}
    stale = {id(t) for landing in landings for t in landing.written} - covered
    if stale:
        raise FlashRestoreError(
            f"{len(stale)} tensor(s) of the state received bytes of a newer step that was not restored, "
            f"and step {step}, which was, does not hold them: they cannot be trusted. Load again into a "
            "fresh state"
        )
