"""FlashEngine: save and load one rank's state dict through the flash tier.

``save`` blocks only for the copy out of the training tensors when ``blocking=False``: checksums,
metadata, the commit record, retention and the durable upload run on background threads, and an error
there is raised by the next call, never dropped. ``load`` agrees with the other ranks on the newest
step that every rank holds and that every rank verified (gather, intersect, then all-or-nothing),
copies it into the caller's tensors in place, and falls back to the durable tier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .cluster import Cluster
from .copier import Copier
from .durable import DurableTier
from .layout import CommitRecord, FlashLayout
from .objects import (
    DEFAULT_CHUNK,
    CorruptObjectError,
    TensorRef,
    dtype_name,
    flatten,
    load_meta,
)
from .rankstore import RankStore, VerifiedObject
from .replication import RingPlacement

__all__ = ["FlashEngine", "FlashError"]

log = logging.getLogger("stalwart.flash")


class FlashError(RuntimeError):
    """A background part of a save (commit, upload) failed; raised by the next call."""


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; use an int >= {minimum}")
    return value


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


class FlashEngine:
    """One rank of one flash job: the state-dict API over a RankStore, plus the durable tier."""

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
    ) -> None:
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(
                f"rank={rank} is not accepted with world_size={world_size}; use 0..{world_size - 1}"
            )
        _check_int("keep", keep, 1)
        _check_int("chunk_size", chunk_size, 4096)
        self.layout, self.rank, self.world_size = layout, rank, world_size
        self.durable = durable
        self.chunk_size = chunk_size
        self._group = _Group(world_size, process_group)
        self.copier = Copier(threads)
        self.cluster = Cluster.join(
            layout, rank, world_size, self._group, self.copier, RingPlacement(replicas)
        )
        board = self.cluster.board if self.cluster else None
        self.store = RankStore(layout, rank, world_size, keep=keep, copier=self.copier, board=board)
        if self.cluster:
            self.cluster.start(self.store, keep)
        self._commits = ThreadPoolExecutor(1, thread_name_prefix="stalwart-commit")
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="stalwart-durable") if durable else None
        self._pending: tuple[int, Future] | None = None
        self._upload_futures: list[tuple[int, Future]] = []
        self._closed = False
        self.last_save_blocked: float = 0.0  # seconds the caller waited in the newest save
        self.restored_from: str | None = None  # "flash" or "durable" after a load that found a step

    # saving

    def save(
        self, step: int, state: MutableMapping[str, Any], *, blocking: bool = True, durable: bool = False
    ) -> bool:
        """Save ``state`` as ``step``; returns False when this rank already committed that step."""
        started = time.perf_counter()
        self._check_open()
        _check_int("step", step, 0)
        if not isinstance(state, MutableMapping):
            raise TypeError(f"state must be a dict (a state dict); got {type(state).__name__}")
        if durable and self.durable is None:
            raise ValueError("durable=True needs a durable store; pass durable='s3://...' or a local path")
        self._settle(wait=True)
        newest = max(self.store.own, default=None)
        if newest is not None and step <= newest:
            if step == newest:
                log.info("flash: step %d is already committed for rank %d; not saved again", step, self.rank)
                return False
            raise ValueError(
                f"step {step} is older than step {newest}, the newest this rank committed; steps must grow. "
                "Call restore() first (it forgets steps of an abandoned timeline) or use a new job_id"
            )
        skeleton, tensors = flatten(state)
        staged = self.store.stage(skeleton, tensors, chunk_size=self.chunk_size, hash_now=blocking)

        def finish() -> None:
            record = self.store.commit_staged(step, staged)
            if self.cluster:
                self.cluster.replicate(record)
            if durable:
                self._start_upload(record)
            self.store.retain()

        if blocking:
            finish()
        else:
            self._pending = (step, self._commits.submit(finish))
        self.last_save_blocked = time.perf_counter() - started
        return True

    def _start_upload(self, record: CommitRecord) -> None:
        assert self._uploads is not None and self.durable is not None
        buffer = self.store.pin(record.step)
        durable = self.durable

        def upload() -> None:
            try:
                durable.upload(record, buffer.view)
                durable.prune(self.rank, self.world_size)
                log.info("flash: step %d of rank %d uploaded to %s", record.step, self.rank, durable.url)
            finally:
                self.store.unpin(record.step)
                self.store.retain()

        self._upload_futures.append((record.step, self._uploads.submit(upload)))

    def _settle(self, *, wait: bool) -> None:
        """Raise what failed in the background; with ``wait``, first let the pending commit finish."""
        if self._pending is not None and (wait or self._pending[1].done()):
            step, future = self._pending
            self._pending = None
            try:
                future.result()
            except BaseException as exc:
                raise FlashError(f"flash save of step {step} failed in the background: {exc}") from exc
        for item in list(self._upload_futures):
            step, future = item
            if future.done():
                self._upload_futures.remove(item)
                if (exc := future.exception()) is not None:
                    url = self.durable.url if self.durable else "?"
                    raise FlashError(f"uploading flash step {step} to {url} failed: {exc}") from exc

    def wait(self) -> None:
        """Block until every pending commit, upload and replication is done; raise the first failure."""
        self._settle(wait=True)
        if self.cluster:
            self.cluster.wait()
        for _, future in list(self._upload_futures):
            future.exception()
        self._settle(wait=True)

    # loading

    def load(self, state: MutableMapping[str, Any]) -> int | None:
        """Restore the newest step every rank holds and verifies into ``state`` (in place).

        Flash first; then the durable tier; None when neither has a complete step. Steps newer than the
        one restored are forgotten (they belong to an abandoned timeline).
        """
        self._check_open()
        if not isinstance(state, MutableMapping):
            raise TypeError(f"state must be a dict (a state dict); got {type(state).__name__}")
        self._settle(wait=True)
        self.restored_from = None
        if self.cluster:
            found = self.cluster.restore(self.store, self._group)
            step = None
            if found is not None:
                step, verified, self.restored_from = found
                self._apply(verified, state)
        else:
            step = self._load_from(sorted(self.store.own), state, source="flash")
            self.restored_from = "flash" if step is not None else None
        if step is None and self.durable is not None:
            step = self._load_durable(state)
            self.restored_from = "durable" if step is not None else None
            if step is not None and self.rank == 0:
                log.warning("flash: restored step %d from the durable store %s", step, self.durable.url)
        self.store.drop_newer_than(step)
        if self.cluster:
            self.cluster.after_restore(step, self._group)
        return step

    def _load_from(self, own_steps: list[int], state: MutableMapping[str, Any], *, source: str) -> int | None:
        held = self._group.gather(own_steps)
        common = set(held[0]).intersection(*held[1:])
        for step in sorted(common, reverse=True):
            verified = self._verify(step)
            if all(self._group.gather(verified is not None)):
                assert verified is not None
                started = time.perf_counter()
                self._apply(verified, state)
                log.info(
                    "flash: rank %d restored step %d from %s in %.3f s",
                    self.rank,
                    step,
                    source,
                    time.perf_counter() - started,
                )
                return step
            if verified is None:
                self.store.drop(step)
        return None

    def _verify(self, step: int) -> VerifiedObject | None:
        try:
            return self.store.verify(step)
        except CorruptObjectError as exc:
            log.warning("flash: not loading step %d: %s; falling back to an older step", step, exc)
            return None
        except OSError as exc:
            log.warning("flash: cannot read step %d (%s); falling back to an older step", step, exc)
            return None

    def _load_durable(self, state: MutableMapping[str, Any]) -> int | None:
        assert self.durable is not None
        complete = self.durable.complete_steps(self.world_size)
        held = self._group.gather(complete)
        common = sorted(set(held[0]).intersection(*held[1:]), reverse=True)
        for step in common:
            record = self.durable.rank_record(step, self.rank)
            ok = record is not None
            if ok:
                if step in self.store.own:
                    self.store.drop(step)  # the local copy failed verification: replace it
                try:
                    self.durable.download(record, self.layout.object_path(step, self.rank))
                    self.layout.write_commit(record)
                    self.store.own.add(step)
                except (OSError, ValueError) as exc:
                    log.warning("flash: downloading step %d from %s failed: %s", step, self.durable.url, exc)
                    ok = False
            if not all(self._group.gather(ok)):
                continue
            restored = self._load_from([step], state, source=f"the durable store {self.durable.url}")
            if restored is not None:
                return restored
        return None

    def _apply(self, verified: VerifiedObject, state: MutableMapping[str, Any]) -> None:
        skeleton, entries = load_meta(verified.meta)
        _check_shapes(skeleton, state, entries, "state")  # refuse before anything in the state changes
        pairs: list[tuple[Any, Any]] = []
        created: dict[int, Any] = {}
        _merge_into(skeleton, state, entries, pairs, created, "state")
        self.copier.copy_out(verified.buffer, [e for e, _ in pairs], [t for _, t in pairs])

    # life cycle

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this flash checkpointer is closed")

    def close(self) -> None:
        """Finish background work, unmap buffers and free the pool (committed steps stay on tmpfs)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self.cluster:
                self.cluster.close()
            self._commits.shutdown(wait=True)
            if self._uploads is not None:
                self._uploads.shutdown(wait=True)
            self.store.close()
            self.copier.close()

    def __enter__(self) -> FlashEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_shapes(skeleton: Any, current: Any, entries: list, path: str) -> None:
    """Raise if a tensor of the caller's state has another shape or dtype than the saved one."""
    import torch

    if isinstance(skeleton, TensorRef):
        entry = entries[skeleton.index]
        if isinstance(current, torch.Tensor) and (
            tuple(current.shape) != entry.shape or dtype_name(current) != entry.dtype
        ):
            raise ValueError(
                f"{path}: the checkpoint holds a {entry.dtype} tensor of shape {list(entry.shape)}, "
                f"the state a {dtype_name(current)} tensor of shape {list(current.shape)}"
            )
    elif isinstance(skeleton, dict) and isinstance(current, MutableMapping):
        for key, value in skeleton.items():
            _check_shapes(value, current.get(key), entries, f"{path}[{key!r}]")
    elif (
        isinstance(skeleton, (list, tuple))
        and isinstance(current, (list, tuple))
        and len(current) == len(skeleton)
    ):
        for i, (value, old) in enumerate(zip(skeleton, current, strict=True)):
            _check_shapes(value, old, entries, f"{path}[{i}]")


def _merge_into(skeleton: Any, current: Any, entries: list, pairs: list, created: dict, path: str) -> Any:
    """Lay the saved skeleton over the caller's state: tensors are filled in place where the caller has
    one of the same shape and dtype, made where it has none; plain values are replaced."""
    import torch

    if isinstance(skeleton, TensorRef):
        entry = entries[skeleton.index]
        if isinstance(current, torch.Tensor):
            if tuple(current.shape) != entry.shape or dtype_name(current) != entry.dtype:
                raise ValueError(
                    f"{path}: the checkpoint holds a {entry.dtype} tensor of shape {list(entry.shape)}, "
                    f"the state a {dtype_name(current)} tensor of shape {list(current.shape)}"
                )
            pairs.append((entry, current))
            return current
        if skeleton.index not in created:
            created[skeleton.index] = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
            pairs.append((entry, created[skeleton.index]))
        return created[skeleton.index]
    if isinstance(skeleton, dict):
        target = current if isinstance(current, MutableMapping) else type(skeleton)()
        for key, value in skeleton.items():
            target[key] = _merge_into(value, target.get(key), entries, pairs, created, f"{path}[{key!r}]")
        return target
    if isinstance(skeleton, list):
        target = (
            current if isinstance(current, list) and len(current) == len(skeleton) else [None] * len(skeleton)
        )
        for i, value in enumerate(skeleton):
            target[i] = _merge_into(value, target[i], entries, pairs, created, f"{path}[{i}]")
        return target
    if isinstance(skeleton, tuple):
        old = (
            current
            if isinstance(current, tuple) and len(current) == len(skeleton)
            else (None,) * len(skeleton)
        )
        return tuple(
            _merge_into(v, c, entries, pairs, created, f"{path}[{i}]")
            for i, (v, c) in enumerate(zip(skeleton, old, strict=True))
        )
    return skeleton
