"""Restore: the newest step that every rank can obtain from some tier, verified on every rank.

Collective (every rank of the job calls it at the same point). The candidates are the steps that are
whole somewhere: every rank committed them on some node's tmpfs (its own, or a replica on a peer), or in
the durable store. From the newest down, each rank obtains its object from the cheapest tier that has it
(its own tmpfs, then a peer, then the durable shelf), verifies every checksum, and the ranks compare
notes: all verified, and the step is restored; any rank found it corrupt everywhere, and they try the
next older step (DESIGN decisions 3 and 10). With ``reshard="replicated"``, steps saved by another
number of ranks are candidates too, and every rank restores saved rank 0's object of them (``reshard``).

What is never done: returning "no checkpoint" while one exists. A step that could not be *read* (the
flash root has no room for the durable copy, a peer or the store does not answer) raises
FlashRestoreError on every rank instead of quietly taking an older step, and so does a job whose every
step is corrupt, or whose checkpoints were saved by another number of ranks (unless resharding).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FlashRestoreError
from .objects import CorruptObjectError
from .recovery import UnfitState
from .reshard import OtherWorlds, other_worlds
from .shelf import RankShelf, VerifiedObject, verify_mapped, verify_object

if TYPE_CHECKING:
    from .cluster import Cluster
    from .copier import Copier
    from .durable import DurableTier
    from .recovery import Head, Landing

__all__ = ["Holdings", "Restored", "holdings", "restore_newest"]

log = logging.getLogger(__name__)

_READ_ERRORS = (OSError, ValueError)  # what reading a tier can raise besides corruption


@dataclass(frozen=True)
class Restored:
    """The outcome of a restore on this rank."""

    step: int | None
    verified: VerifiedObject | None  # to copy into the state (from tmpfs or the durable shelf)
    source: str | None  # "flash", "peer" or "durable"
    durable_steps: frozenset[int] | None  # complete durable steps, None when the store could not be listed
    landing: Landing | None = None  # from peers: already in the state's tensors, verified
    unfit: BaseException | None = None  # the state cannot take the step: raise this on every rank
    world: int | None = None  # saved by this other world size: saved rank 0's object was restored
    dispose: Callable[[], None] | None = None  # gives back ``verified`` once copied (not this rank's own)
    other_worlds: bool = False  # some tier holds steps of another world size


@dataclass(frozen=True)
class _Attempt:
    kind: str  # "ok", "corrupt" (unusable everywhere it exists) or "error" (could not be read)
    message: str = ""
    verified: VerifiedObject | None = None
    source: str | None = None
    landing: Landing | None = None
    unfit: BaseException | None = None
    dispose: Callable[[], None] | None = None


@dataclass(frozen=True)
class Holdings:
    """What the tiers hold whole, the same on every rank (``holdings``)."""

    flash: frozenset[int]  # every rank's object is in some node's tmpfs (its own, or a replica)
    holders: dict[tuple[int, int], list[int]]  # (step, rank) -> ranks whose node holds it (several nodes)
    durable: frozenset[int] | None  # complete in the durable store; None when it could not be listed
    durable_unreadable: list[str]  # durable commit records that exist but cannot be read
    other: OtherWorlds  # steps of another world size whose rank 0 object exists (``reshard``)

    def describe(self) -> str:
        durable = (
            "not listed" if self.durable is None else ", ".join(map(str, sorted(self.durable))) or "none"
        )
        other = f"; saved by another world size: {self.other.describe()}" if self.other.steps else ""
        return f"flash: {', '.join(map(str, sorted(self.flash))) or 'none'}; durable: {durable}{other}"


def holdings(shelf: RankShelf, group: Any, cluster: Cluster | None, durable: DurableTier | None) -> Holdings:
    """Collective: the steps each tier holds whole."""
    if cluster is not None:
        holders = cluster.holders(shelf, group)
        flash_steps = cluster.whole_steps(holders)
    else:
        holders = {}
        held = group.gather(sorted(shelf.own))
        flash_steps = set(held[0]).intersection(*held[1:])
    durable_steps, durable_other, durable_unreadable = _durable_steps(durable, shelf.world_size, group)
    other = other_worlds(shelf, group, durable_other)
    return Holdings(frozenset(flash_steps), holders, durable_steps, durable_unreadable, other)


def restore_newest(
    shelf: RankShelf,
    group: Any,
    copier: Copier,
    cluster: Cluster | None,
    durable: DurableTier | None,
    *,
    land: Callable[[Head], Landing],
    step: int | None = None,
    reshard: str | None = None,
) -> Restored:
    """Collective: obtain and verify the newest whole step on this rank (see the module docstring), or
    ``step``, which some tier must hold whole: it is not traded for an older one. ``land`` lays an
    object pulled from peers over the caller's tensors (``recovery``): it is received straight there.
    ``reshard`` "replicated": steps saved by another world size are restored too (``reshard``)."""
    job = shelf.layout.job_id
    found = holdings(shelf, group, cluster, durable)
    holders, durable_steps, durable_unreadable = found.holders, found.durable, found.durable_unreadable
    own = found.flash | (durable_steps or set())
    other = {s: size for s, size in found.other.steps.items() if s not in own} if reshard else {}
    candidates = sorted(own | set(other), reverse=True)
    if reshard is None and step is None:
        _refuse_a_newer_world(found, own, job)
    if step is not None:
        if step not in candidates:
            if step in found.other.steps:
                raise FlashRestoreError(
                    f"step {step} of flash job {job!r} was saved by {found.other.steps[step]} ranks, not "
                    f"this job's {shelf.world_size}: if every rank holds the same state (DDP), pass "
                    "reshard='replicated'; sharded state reshards through DCP (FlashStorageReader)"
                )
            unlisted = (
                " (the durable shelf, which may hold it, could not be listed)"
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
        if step in other:
            attempt = _obtain_other(shelf, copier, cluster, durable, step, other[step], found.other, land)
        else:
            attempt = _obtain(
                shelf, copier, cluster, durable, step, holders, durable_steps or frozenset(), land
            )
        notes = group.gather((attempt.kind, attempt.message))
        errors = [f"rank {rank}: {message}" for rank, (kind, message) in enumerate(notes) if kind == "error"]
        if errors:
            raise FlashRestoreError(
                f"step {step} of flash job {job!r} exists but could not be read, so nothing was restored "
                f"(an older step would silently lose progress): {'; '.join(errors[:4])}"
            )
        if all(kind == "ok" for kind, _ in notes):
            return Restored(
                step,
                attempt.verified,
                attempt.source,
                durable_steps,
                attempt.landing,
                attempt.unfit,
                world=other.get(step),
                dispose=attempt.dispose,
                other_worlds=bool(found.other.steps),
            )
        if attempt.dispose is not None:
            attempt.dispose()
        bad = "; ".join(
            f"rank {rank}: {message}" for rank, (kind, message) in enumerate(notes) if kind != "ok"
        )
        skipped.append(f"step {step} ({bad})")
        if shelf.rank == 0:
            log.warning("flash: not restoring step %d of job %s: %s; trying an older step", step, job, bad)
    if step is not None:
        raise FlashRestoreError(
            f"step {step} of flash job {job!r} failed verification on some rank, so nothing was restored: "
            f"{'; '.join(skipped[:4])}; the steps each tier holds: {found.describe()}"
        )
    if candidates:
        raise FlashRestoreError(
            f"every step of flash job {job!r} failed verification on some rank, so nothing was restored: "
            f"{'; '.join(skipped[:4])}. To start over, remove {shelf.layout.job_dir}"
            + (f" and {durable.url}" if durable is not None else "")
            + " or use a new job_id"
        )
    if found.other.steps:  # only without reshard: else they were candidates
        step = max(found.other.steps)
        tier = "flash" if step in found.other.flash else "durable"
        raise _another_world(job, step, found.other.steps[step], tier, shelf.world_size)
    _refuse_what_cannot_be_restored(shelf, group, durable, durable_unreadable)
    if durable is not None and durable_steps is None:
        raise FlashRestoreError(
            f"flash job {job!r} has no step in tmpfs and its durable store {durable.url} could not be "
            "listed: whether a checkpoint exists is unknown, so training does not start over"
        )
    return Restored(None, None, None, durable_steps)


def _refuse_a_newer_world(found: Holdings, own: AbstractSet[int], job: str) -> None:
    """Without resharding, a step saved by another world size that is newer than every step of this
    one must not be passed over in silence: training would go back to an older state."""
    newer = {s: size for s, size in found.other.steps.items() if s > max(own, default=-1)}
    if newer and own:
        step = max(newer)
        raise FlashRestoreError(
            f"flash job {job!r} holds step {step} saved by {newer[step]} ranks, newer than step {max(own)}, "
            "the newest of this world size: restoring that would lose progress. If every rank holds the "
            "same state (DDP), pass reshard='replicated'; to go back on purpose, pass step="
            f"{max(own)}"
        )


def _durable_steps(
    durable: DurableTier | None, world_size: int, group: Any
) -> tuple[frozenset[int] | None, dict[int, int], list[str]]:
    """The durable steps every rank sees complete, those of other world sizes ({step: world size}), and
    records that exist but cannot be read; None for the steps (on every rank) if any rank could not
    list them."""
    if durable is None:
        return frozenset(), {}, []
    try:
        records, unreadable = durable.scan()
        listed: list[int] | None = durable.complete_steps(world_size, records)
        others = sorted(  # of other world sizes, rank 0's object suffices (``reshard``)
            (step, ranks[0].world_size)
            for step, ranks in records.items()
            if 0 in ranks and ranks[0].world_size != world_size
        )
        problem = ""
    except Exception as exc:  # an unreachable store: the flash tier may still serve
        listed, others, unreadable, problem = None, [], [], f"{type(exc).__name__}: {exc}"
    seen = group.gather((listed, others, problem))
    failures = [message for steps, _, message in seen if steps is None]
    if failures:
        log.warning(
            "flash: cannot list the durable store %s (%s); restoring from flash only",
            durable.url,
            failures[0],
        )
        return None, {}, []
    steps = set(seen[0][0]).intersection(*(set(steps) for steps, _, _ in seen[1:]))
    other = set(map(tuple, seen[0][1])).intersection(*(set(map(tuple, o)) for _, o, _ in seen[1:]))
    return frozenset(steps), dict(other), unreadable


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
    shelf: RankShelf,
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
    if step in shelf.own:
        try:
            return _Attempt("ok", verified=shelf.verify(step), source="flash")
        except (CorruptObjectError, OSError) as exc:
            # Kept as evidence until a copy replaces it or a restore of an older step cuts the timeline:
            # deleting it here would make the next attempt find "no checkpoint" and start over.
            log.warning("flash: not loading step %d from tmpfs: %s", step, exc)
            corrupt.append(str(exc))
    if cluster is not None and holders.get((step, shelf.rank)):
        try:
            landing, problems = cluster.recover(step, holders[(step, shelf.rank)], land)
        except UnfitState as exc:  # the object is fine; the state cannot take it (told after agreeing)
            return _Attempt("ok", source="peer", unfit=exc.__cause__ or exc)
        if landing is not None:
            if corrupt and shelf.owner:  # the peer's copy replaced what the local one could not give
                log.warning("flash: dropping the corrupt tmpfs copy of step %d (rank %d)", step, shelf.rank)
                shelf.drop(step)
            return _Attempt("ok", source="peer", landing=landing)
        for kind, message in problems:
            (corrupt if kind == "corrupt" else errors).append(message)
    if durable is not None and step in durable_steps:
        kind, message, verified = _download(shelf, copier, durable, step)
        if verified is not None:
            return _Attempt("ok", verified=verified, source="durable")
        (corrupt if kind == "corrupt" else errors).append(message)
    return _failed(corrupt, errors, f"no tier holds rank {shelf.rank}'s object")


def _failed(corrupt: list[str], errors: list[str], otherwise: str) -> _Attempt:
    if errors:
        return _Attempt("error", "; ".join(errors + corrupt))
    return _Attempt("corrupt", "; ".join(corrupt or [otherwise]))


@_as_note
def _obtain_other(
    shelf: RankShelf,
    copier: Copier,
    cluster: Cluster | None,
    durable: DurableTier | None,
    step: int,
    world: int,
    other: OtherWorlds,
    land: Callable[[Head], Landing],
) -> _Attempt:
    """Saved rank 0's object of ``step``, saved by ``world`` ranks, from the cheapest tier that has it
    intact; never made this rank's own (``reshard``)."""
    corrupt: list[str] = []
    errors: list[str] = []
    record = shelf.layout.read_commit(step, 0)
    if record is not None and record.world_size == world:
        try:
            verified = verify_object(shelf.layout, step, 0, copier)
            return _Attempt("ok", verified=verified, source="flash", dispose=verified.buffer.close)
        except (CorruptObjectError, OSError) as exc:
            log.warning("flash: not loading step %d of rank 0 (%d ranks) from tmpfs: %s", step, world, exc)
            corrupt.append(str(exc))
    if cluster is not None and other.holders.get(step):
        try:
            landing, problems = cluster.recover(step, other.holders[step], land, rank=0)
        except UnfitState as exc:
            return _Attempt("ok", source="peer", unfit=exc.__cause__ or exc)
        if landing is not None:
            return _Attempt("ok", source="peer", landing=landing)
        for kind, message in problems:
            (corrupt if kind == "corrupt" else errors).append(message)
    if durable is not None and other.durable.get(step) == world:
        kind, message, downloaded = _download(shelf, copier, durable, step, rank=0, adopt=False)
        if downloaded is not None:
            verified, buffer = downloaded, downloaded.buffer
            return _Attempt("ok", verified=verified, source="durable", dispose=lambda: shelf.release(buffer))
        (corrupt if kind == "corrupt" else errors).append(message)
    return _failed(corrupt, errors, f"no tier holds rank 0's object of the {world} ranks that saved it")


def _download(
    shelf: RankShelf,
    copier: Copier,
    durable: DurableTier,
    step: int,
    *,
    rank: int | None = None,
    adopt: bool = True,
) -> tuple[str, str, VerifiedObject | None]:
    """``rank``'s durable object of ``step`` (this rank's by default), read into a pool buffer and
    verified, then made this rank's own when ``adopt``."""
    rank = shelf.rank if rank is None else rank
    where = f"{durable.url} step {step} rank {rank}"
    record = durable.rank_record(step, rank)
    if record is None:
        return "corrupt", f"{where}: the commit record is gone or unreadable", None
    try:
        buffer = shelf.acquire(record.objects[0]["size"])
    except _READ_ERRORS as exc:
        return "error", f"no room in the flash root for {where}: {exc}", None
    try:
        durable.read_into(record, buffer.view[: record.objects[0]["size"]])
        verified = verify_mapped(buffer, record, copier, where=where)
    except (CorruptObjectError, EOFError) as exc:
        shelf.release(buffer)
        return "corrupt", str(exc), None
    except _READ_ERRORS as exc:
        shelf.release(buffer)
        return "error", f"reading {where} failed: {type(exc).__name__}: {exc}", None
    if adopt:
        shelf.adopt_pulled(verified, record)
    return "ok", "", verified


def _another_world(job: str, step: int, size: int, tier: str, world_size: int) -> FlashRestoreError:
    return FlashRestoreError(
        f"flash job {job!r} holds step {step} ({tier}) saved by {size} ranks, and none saved by this job's "
        f"{world_size}. If every rank holds the same state (DDP: model and optimizer replicated), pass "
        "reshard='replicated' and every rank restores saved rank 0's; sharded state reshards through "
        f"DCP (FlashStorageReader). Else run with {size} ranks, or use a new job_id to start over"
    )


def _refuse_what_cannot_be_restored(
    shelf: RankShelf, group: Any, durable: DurableTier | None, durable_unreadable: list[str]
) -> None:
    """No step to restore, yet commit records exist: of another number of ranks, or unreadable (damaged,
    or written by a newer stalwart). Loading nothing would start over silently."""
    committed: set[tuple[int, int, int]] = set()
    unreadable = [str(path) for path in shelf.layout.unreadable_commits()]
    unreadable += [f"{durable.url}/{name}" for name in durable_unreadable] if durable is not None else []
    for items, bad in group.gather((shelf.layout.commit_index(), unreadable)):  # steps span nodes
        committed.update(items)
        unreadable += [name for name in bad if name not in unreadable]
    by_step: dict[int, dict[int, set[int]]] = {}
    for step, rank, size in committed:
        by_step.setdefault(step, {}).setdefault(size, set()).add(rank)
    found = {
        step: (size, "flash")
        for step, sizes in by_step.items()
        for size, ranks in sizes.items()
        if size != shelf.world_size and ranks >= set(range(size))
    }
    if durable is not None:
        try:
            for step, size in durable.other_world_sizes(shelf.world_size).items():
                found.setdefault(step, (size, "durable"))
        except Exception as exc:  # the listing failed just before: that is reported by the caller
            log.debug("flash: could not list %s for other world sizes: %s", durable.url, exc)
    seen = [item for items in group.gather(sorted(found.items())) for item in items]
    if seen:
        step, (size, tier) = max(seen)
        raise _another_world(shelf.layout.job_id, step, size, tier, shelf.world_size)
    if unreadable:
        raise FlashRestoreError(
            f"flash job {shelf.layout.job_id!r} has no step that can be restored, but commit records that "
            f"cannot be read exist ({', '.join(unreadable[:4])}): damaged, or written by a newer stalwart. "
            "Nothing was restored; to start over, remove them or use a new job_id"
        )
