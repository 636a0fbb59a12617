"""Restore: the newest step that every rank can obtain from some tier, verified on every rank.

Collective (every rank of the job calls it at the same point). The candidates are the steps that are
whole somewhere: every rank committed them on some node's tmpfs (its own, or a replica on a peer), or in
the durable store. From the newest down, each rank obtains its object from the cheapest tier that has it
(its own tmpfs, then a peer, then the durable store), verifies every checksum, and the ranks compare
notes: all verified, and the step is restored; any rank found it corrupt everywhere, and they try the
next older step (DESIGN decisions 3 and 10).

What is never done: returning "no checkpoint" while one exists. A step that could not be *read* (the
flash root has no room for the durable copy, a peer or the store does not answer) raises
FlashRestoreError on every rank instead of quietly taking an older step, and so does a job whose every
step is corrupt, or whose checkpoints were saved by another number of ranks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FlashRestoreError
from .objects import CorruptObjectError
from .rankstore import RankStore, VerifiedObject, verify_mapped
from .recovery import UnfitState

if TYPE_CHECKING:
    from .cluster import Cluster
    from .copier import Copier
    from .durable import DurableTier
    from .recovery import Head, Landing

__all__ = ["Holdings", "Restored", "holdings", "restore_newest"]

log = logging.getLogger("stalwart.flash")

_READ_ERRORS = (OSError, ValueError)  # what reading a tier can raise besides corruption


@dataclass(frozen=True)
class Restored:
    """The outcome of a restore on this rank."""

    step: int | None
    verified: VerifiedObject | None  # to copy into the state (from tmpfs or the durable store)
    source: str | None  # "flash", "peer" or "durable"
    durable_steps: frozenset[int] | None  # complete durable steps, None when the store could not be listed
    landing: Landing | None = None  # from peers: already in the state's tensors, verified
    unfit: BaseException | None = None  # the state cannot take the step: raise this on every rank


@dataclass(frozen=True)
class _Attempt:
    kind: str  # "ok", "corrupt" (unusable everywhere it exists) or "error" (could not be read)
    message: str = ""
    verified: VerifiedObject | None = None
    source: str | None = None
    landing: Landing | None = None
    unfit: BaseException | None = None


@dataclass(frozen=True)
class Holdings:
    """What the tiers hold whole, the same on every rank (``holdings``)."""

    flash: frozenset[int]  # every rank's object is in some node's tmpfs (its own, or a replica)
    holders: dict[tuple[int, int], list[int]]  # (step, rank) -> ranks whose node holds it (several nodes)
    durable: frozenset[int] | None  # complete in the durable store; None when it could not be listed
    durable_unreadable: list[str]  # durable commit records that exist but cannot be read

    def describe(self) -> str:
        durable = (
            "not listed" if self.durable is None else ", ".join(map(str, sorted(self.durable))) or "none"
        )
        return f"flash: {', '.join(map(str, sorted(self.flash))) or 'none'}; durable: {durable}"


def holdings(store: RankStore, group: Any, cluster: Cluster | None, durable: DurableTier | None) -> Holdings:
    """Collective: the steps each tier holds whole."""
    if cluster is not None:
        holders = cluster.holders(store, group)
        flash_steps = cluster.whole_steps(holders)
    else:
        holders = {}
        held = group.gather(sorted(store.own))
        flash_steps = set(held[0]).intersection(*held[1:])
    durable_steps, durable_unreadable = _durable_steps(durable, store.world_size, group)
    return Holdings(frozenset(flash_steps), holders, durable_steps, durable_unreadable)


def restore_newest(
    store: RankStore,
    group: Any,
    copier: Copier,
    cluster: Cluster | None,
    durable: DurableTier | None,
    *,
    land: Callable[[Head], Landing],
    step: int | None = None,
) -> Restored:
    """Collective: obtain and verify the newest whole step on this rank (see the module docstring), or
    ``step``, which some tier must hold whole: it is not traded for an older one. ``land`` lays an
    object pulled from peers over the caller's tensors (``recovery``): it is received straight there."""
    job = store.layout.job_id
    found = holdings(store, group, cluster, durable)
    holders, durable_steps, durable_unreadable = found.holders, found.durable, found.durable_unreadable
    candidates = sorted(found.flash | (durable_steps or set()), reverse=True)
    if step is not None:
        if step not in candidates:
            unlisted = (
                " (the durable store, which may hold it, could not be listed)"
                if durable_steps is None
                else ""
            )
            raise FlashRestoreError(
                f"step {step} of flash job {job!r} is held whole by no tier{unlisted}, so nothing was "
                f"restored; the steps each tier holds: {found.describe()}"
            )
        candidates = [step]
    skipped: list[str] = []
    for step in candidates:
        if skipped and durable is not None and durable_steps is None:
            raise FlashRestoreError(
                f"{skipped[-1]} of flash job {job!r} could not be restored from tmpfs, and the durable "
                f"store {durable.url}, which may hold it intact, could not be listed: an older step would "
                "silently lose progress, so nothing was restored"
            )
        attempt = _obtain(store, copier, cluster, durable, step, holders, durable_steps or frozenset(), land)
        notes = group.gather((attempt.kind, attempt.message))
        errors = [f"rank {rank}: {message}" for rank, (kind, message) in enumerate(notes) if kind == "error"]
        if errors:
            raise FlashRestoreError(
                f"step {step} of flash job {job!r} exists but could not be read, so nothing was restored "
                f"(an older step would silently lose progress): {'; '.join(errors[:4])}"
            )
        if all(kind == "ok" for kind, _ in notes):
            return Restored(
                step, attempt.verified, attempt.source, durable_steps, attempt.landing, attempt.unfit
            )
        bad = "; ".join(
            f"rank {rank}: {message}" for rank, (kind, message) in enumerate(notes) if kind != "ok"
        )
        skipped.append(f"step {step} ({bad})")
        if store.rank == 0:
            log.warning("flash: not restoring step %d of job %s: %s; trying an older step", step, job, bad)
    if step is not None:
        raise FlashRestoreError(
            f"step {step} of flash job {job!r} failed verification on some rank, so nothing was restored: "
            f"{'; '.join(skipped[:4])}; the steps each tier holds: {found.describe()}"
        )
    if candidates:
        raise FlashRestoreError(
            f"every step of flash job {job!r} failed verification on some rank, so nothing was restored: "
            f"{'; '.join(skipped[:4])}. To start over, remove {store.layout.job_dir}"
            + (f" and {durable.url}" if durable is not None else "")
            + " or use a new job_id"
        )
    _refuse_what_cannot_be_restored(store, group, durable, durable_unreadable)
    if durable is not None and durable_steps is None:
        raise FlashRestoreError(
            f"flash job {job!r} has no step in tmpfs and its durable store {durable.url} could not be "
            "listed: whether a checkpoint exists is unknown, so training does not start over"
        )
    return Restored(None, None, None, durable_steps)


def _durable_steps(
    durable: DurableTier | None, world_size: int, group: Any
) -> tuple[frozenset[int] | None, list[str]]:
    """The durable steps every rank sees complete, and records that exist but cannot be read; None for
    the steps (on every rank) if any rank could not list them."""
    if durable is None:
        return frozenset(), []
    try:
        records, unreadable = durable.scan()
        listed: list[int] | None = durable.complete_steps(world_size, records)
        problem = ""
    except Exception as exc:  # an unreachable store: the flash tier may still serve
        listed, unreadable, problem = None, [], f"{type(exc).__name__}: {exc}"
    seen = group.gather((listed, problem))
    failures = [message for steps, message in seen if steps is None]
    if failures:
        log.warning(
            "flash: cannot list the durable store %s (%s); restoring from flash only",
            durable.url,
            failures[0],
        )
        return None, []
    return frozenset(set(seen[0][0]).intersection(*(set(steps) for steps, _ in seen[1:]))), unreadable


def _as_note(obtain: Callable[..., _Attempt]) -> Callable[..., _Attempt]:
    """Anything ``obtain`` raises becomes an error note: a rank that raised would leave the others
    waiting in the gather that follows."""

    @functools.wraps(obtain)
    def noted(*args: Any, **kwargs: Any) -> _Attempt:
        try:
            return obtain(*args, **kwargs)
        except Exception as exc:
            log.warning("flash: obtaining a step failed: %s", exc, exc_info=True)
            return _Attempt("error", f"{type(exc).__name__}: {exc}")

    return noted


@_as_note
def _obtain(
    store: RankStore,
    copier: Copier,
    cluster: Cluster | None,
    durable: DurableTier | None,
    step: int,
    holders: dict[tuple[int, int], list[int]],
    durable_steps: frozenset[int],
    land: Callable[[Head], Landing],
) -> _Attempt:
    """This rank's object of ``step`` from the cheapest tier that has it intact."""
    corrupt: list[str] = []
    errors: list[str] = []
    if step in store.own:
        try:
            return _Attempt("ok", verified=store.verify(step), source="flash")
        except (CorruptObjectError, OSError) as exc:
            # Kept as evidence until a copy replaces it or a restore of an older step cuts the timeline:
            # deleting it here would make the next attempt find "no checkpoint" and start over.
            log.warning("flash: not loading step %d from tmpfs: %s", step, exc)
            corrupt.append(str(exc))
    if cluster is not None and holders.get((step, store.rank)):
        try:
            landing, problems = cluster.recover(step, holders[(step, store.rank)], land)
        except UnfitState as exc:  # the object is fine; the state cannot take it (told after agreeing)
            return _Attempt("ok", source="peer", unfit=exc.__cause__ or exc)
        if landing is not None:
            if corrupt and store.owner:  # the peer's copy replaced what the local one could not give
                log.warning("flash: dropping the corrupt tmpfs copy of step %d (rank %d)", step, store.rank)
                store.drop(step)
            return _Attempt("ok", source="peer", landing=landing)
        for kind, message in problems:
            (corrupt if kind == "corrupt" else errors).append(message)
    if durable is not None and step in durable_steps:
        kind, message, verified = _download(store, copier, durable, step)
        if verified is not None:
            return _Attempt("ok", verified=verified, source="durable")
        (corrupt if kind == "corrupt" else errors).append(message)
    if not corrupt and not errors:
        corrupt.append(f"no tier holds rank {store.rank}'s object")
    if errors:
        return _Attempt("error", "; ".join(errors + corrupt))
    return _Attempt("corrupt", "; ".join(corrupt))


def _download(
    store: RankStore, copier: Copier, durable: DurableTier, step: int
) -> tuple[str, str, VerifiedObject | None]:
    """This rank's durable object of ``step``, read into a pool buffer and verified, then made its own."""
    where = f"{durable.url} step {step} rank {store.rank}"
    record = durable.rank_record(step, store.rank)
    if record is None:
        return "corrupt", f"{where}: the commit record is gone or unreadable", None
    try:
        buffer = store.acquire(record.objects[0]["size"])
    except _READ_ERRORS as exc:
        return "error", f"no room in the flash root for {where}: {exc}", None
    try:
        durable.read_into(record, buffer.view[: record.objects[0]["size"]])
        verified = verify_mapped(buffer, record, copier, where=where)
    except (CorruptObjectError, EOFError) as exc:
        store.release(buffer)
        return "corrupt", str(exc), None
    except _READ_ERRORS as exc:
        store.release(buffer)
        return "error", f"reading {where} failed: {type(exc).__name__}: {exc}", None
    store.adopt_pulled(verified, record)
    return "ok", "", verified


def _refuse_what_cannot_be_restored(
    store: RankStore, group: Any, durable: DurableTier | None, durable_unreadable: list[str]
) -> None:
    """No step to restore, yet commit records exist: of another number of ranks, or unreadable (damaged,
    or written by a newer stalwart). Loading nothing would start over silently."""
    committed: set[tuple[int, int, int]] = set()
    unreadable = [str(path) for path in store.layout.unreadable_commits()]
    unreadable += [f"{durable.url}/{name}" for name in durable_unreadable] if durable is not None else []
    for items, bad in group.gather((store.layout.commit_index(), unreadable)):  # steps span nodes
        committed.update(items)
        unreadable += [name for name in bad if name not in unreadable]
    by_step: dict[int, dict[int, set[int]]] = {}
    for step, rank, size in committed:
        by_step.setdefault(step, {}).setdefault(size, set()).add(rank)
    found = {
        step: (size, "flash")
        for step, sizes in by_step.items()
        for size, ranks in sizes.items()
        if size != store.world_size and ranks >= set(range(size))
    }
    if durable is not None:
        try:
            for step, size in durable.other_world_sizes(store.world_size).items():
                found.setdefault(step, (size, "durable"))
        except Exception as exc:  # the listing failed just before: that is reported by the caller
            log.debug("flash: could not list %s for other world sizes: %s", durable.url, exc)
    seen = [item for items in group.gather(sorted(found.items())) for item in items]
    if seen:
        step, (size, tier) = max(seen)
        raise FlashRestoreError(
            f"flash job {store.layout.job_id!r} holds step {step} ({tier}) saved by {size} ranks, and none "
            f"saved by this job's {store.world_size}: resuming at another world size is not supported yet. "
            "Run with the world size of the checkpoint, or use a new job_id to start over"
        )
    if unreadable:
        raise FlashRestoreError(
            f"flash job {store.layout.job_id!r} has no step that can be restored, but commit records that "
            f"cannot be read exist ({', '.join(unreadable[:4])}): damaged, or written by a newer stalwart. "
            "Nothing was restored; to start over, remove them or use a new job_id"
        )
