"""Which DCP steps exist across the nodes and the durable shelf, and fetching any rank's object of one.

``survey`` is collective: every rank reports the committed objects its node's flash root holds (own,
other local ranks', replicas kept for peers) and rank 0 lists the durable store; every rank then
computes the same answer. ``survey_alone`` is not (for DCP's ``read_metadata``, where a collective of
the reader's own would wait for a rank that failed before it): it asks the other nodes' servers. A
step is whole when every rank of the world size that saved it has a committed object somewhere: the
coordinator's carries the global metadata, so whole means loadable.

``fetch`` obtains one object of a step for this rank from the cheapest tier that holds it intact
(this node's tmpfs, a peer node, the durable shelf), verified before anyone reads it. Any rank may
fetch any rank's object: that is how DCP's planner reshards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FlashRestoreError
from ..objects import CorruptObjectError
from ..placement import node_key
from ..replication import held_by, pull
from ..shelf import VerifiedObject, verify_mapped, verify_object

if TYPE_CHECKING:
    from ..cluster import Cluster
    from ..durable import DurableTier
    from ..engine import FlashEngine
    from ..layout import FlashLayout

__all__ = ["Fetched", "Survey", "fetch", "survey", "survey_alone"]

log = logging.getLogger(__name__)


@dataclass
class Survey:
    """What every rank knows after ``survey``; the same on every rank."""

    holders: dict[tuple[int, int, int], list[int]]  # (step, rank, world size) -> ranks whose node holds it
    durable: dict[int, int]  # complete durable steps -> world size
    exists: bool  # the job has a flash directory on some node or a step in the durable store

    def whole(self) -> dict[int, int]:
        """Loadable steps: {step: world size}, from flash or durable (flash wins when both)."""
        found = dict(self.durable)
        by_step: dict[tuple[int, int], set[int]] = {}
        for step, rank, world in self.holders:
            by_step.setdefault((step, world), set()).add(rank)
        for (step, world), ranks in by_step.items():
            if ranks >= set(range(world)):
                found[step] = world
        return found

    def partial(self) -> list[int]:
        """Steps some rank committed in flash that are not whole."""
        whole = self.whole()
        return sorted({step for step, _, _ in self.holders if step not in whole})

    def flash_holders(self, step: int, rank: int, world: int) -> list[int]:
        return self.holders.get((step, rank, world), [])


def survey(layout: FlashLayout, durable: DurableTier | None, rank: int, gather: Any) -> Survey:
    """Collective (``gather`` is all_gather_object over the group, or a list of one)."""
    held = [
        (step, owner, world)
        for step, owner, world in layout.commit_index()
        if layout.object_path(step, owner).exists()
    ]
    listed: dict[int, int] | None = None
    problem = ""
    if durable is not None and rank == 0:  # one listing, shared: every rank must decide the same
        try:
            listed = durable.complete_worlds()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
    holders: dict[tuple[int, int, int], list[int]] = {}
    exists = False
    durable_steps: dict[int, int] = {}
    for holder, (_node, items, job_dir, steps, why) in enumerate(
        gather((node_key(), held, layout.job_dir.is_dir(), listed, problem))
    ):
        exists = exists or job_dir
        for item in items:
            holders.setdefault(tuple(item), []).append(holder)
        if holder == 0:
            durable_steps, problem = steps or {}, why
    if problem and durable is not None:
        log.warning(
            "flash: cannot list the durable store %s (%s); loading from flash only", durable.url, problem
        )
    return Survey(holders, durable_steps, exists or bool(durable_steps))


def survey_alone(layout: FlashLayout, durable: DurableTier | None, cluster: Cluster | None) -> Survey:
    """Not collective: this node's flash root, every other node's as its ranks' servers list it, and
    the durable store as this rank lists it. Ranks may see different things (a replica landing in
    between): the caller checks through DCP's plans that they chose the same step."""
    own = [
        (step, owner, world)
        for step, owner, world in layout.commit_index()
        if layout.object_path(step, owner).exists()
    ]
    holders: dict[tuple[int, int, int], list[int]] = {}
    exists = layout.job_dir.is_dir()
    me = cluster.rank if cluster is not None else 0
    for item in own:
        holders.setdefault(item, []).append(me)
    if cluster is not None:
        others: dict[str, list[int]] = {}
        for peer in cluster.peers:
            if peer.node != cluster.node:
                others.setdefault(peer.node, []).append(peer.rank)
        for node, ranks in others.items():
            said = ""
            for rank in ranks:  # any rank of a node lists the same root
                try:
                    job, items = held_by(cluster.peers[rank], cluster.secret)
                except (OSError, ValueError) as exc:
                    said = f"{type(exc).__name__}: {exc}"
                    continue
                exists = exists or job
                for item in items:
                    holders.setdefault(item, []).append(rank)
                break
            else:
                log.warning(
                    "flash: node %s did not list its flash objects (%s); loading without them", node, said
                )
    durable_steps: dict[int, int] = {}
    if durable is not None:
        try:
            durable_steps = durable.complete_worlds()
        except Exception as exc:
            log.warning(
                "flash: cannot list the durable store %s (%s); loading from flash only", durable.url, exc
            )
    return Survey(holders, durable_steps, exists or bool(durable_steps))


@dataclass
class Fetched:
    """A verified object and what must happen to its buffer once read."""

    verified: VerifiedObject
    source: str  # "flash", "peer" or "durable"
    release: Any = field(default=None)  # called when done with it (None: the rank's shelf keeps it)

    def close(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None


def fetch(
    engine: FlashEngine, durable: DurableTier | None, found: Survey, step: int, rank: int, world: int
) -> Fetched:
    """Rank ``rank``'s object of ``step`` (saved by ``world`` ranks), verified; FlashRestoreError naming
    what every tier said when none holds it intact."""
    shelf, layout, copier = engine.shelf, engine.layout, engine.copier
    # this rank's own object: kept once fetched (unless another process owns the rank: read only)
    mine = shelf.owner and rank == shelf.rank and world == shelf.world_size
    said: list[str] = []
    record = layout.read_commit(step, rank)
    if record is not None and record.world_size == world:
        try:
            if mine and step in shelf.own:
                return Fetched(shelf.verify(step), "flash")
            if not shelf.owner:
                return _copied(engine, record)
            verified = verify_object(layout, step, rank, copier)
            return Fetched(verified, "flash", verified.buffer.close)
        except (CorruptObjectError, OSError) as exc:
            log.warning("flash: not loading %s: %s", layout.object_path(step, rank), exc)
            said.append(str(exc))
    cluster = engine.cluster
    if cluster is not None:
        for holder in found.flash_holders(step, rank, world):
            peer = cluster.peers[holder]
            if peer.node == cluster.node:
                continue
            try:
                record, verified = pull(peer, step, rank, cluster.secret, shelf, copier)
            except (CorruptObjectError, OSError, ValueError) as exc:
                said.append(f"the copy on rank {holder} ({peer.node}): {exc}")
                continue
            return _keep(engine, verified, record, "peer", mine)
    if durable is not None and found.durable.get(step) == world:
        where = f"{durable.url} step {step} rank {rank}"
        record = durable.rank_record(step, rank)
        if record is None:
            said.append(f"{where}: the commit record is gone or unreadable")
        else:
            size = record.objects[0]["size"]
            buffer = shelf.acquire(size)
            try:
                durable.read_into(record, buffer.view[:size])
                verified = verify_mapped(buffer, record, copier, where=where)
            except (CorruptObjectError, EOFError, OSError, ValueError) as exc:
                shelf.release(buffer)
                said.append(f"{where}: {type(exc).__name__}: {exc}")
            else:
                return _keep(engine, verified, record, "durable", mine)
    if not said:
        said.append("no tier holds it")
    raise FlashRestoreError(
        f"rank {rank}'s object of flash step {step} of job {layout.job_id!r} could not be read intact from "
        f"any tier, so nothing was loaded: {'; '.join(said[:4])}"
    )


def _copied(engine: FlashEngine, record: Any) -> Fetched:
    """A visitor's read of this node's object: another process owns the rank and may drop the step
    and reuse its memory for a newer one while this load runs, so the bytes are copied out first and
    the copy verified (a step changed under the copy fails verification: never loaded)."""
    shelf = engine.shelf
    path = engine.layout.object_path(record.step, record.rank)
    size = record.objects[0]["size"]
    buffer = shelf.acquire(size)
    try:
        with open(path, "rb") as source:
            done = 0
            while done < size:
                got = source.readinto(buffer.view[done:size])
                if not got:
                    raise CorruptObjectError(f"{path}: truncated to {done} bytes, committed with {size}")
                done += got
        verified = verify_mapped(buffer, record, engine.copier, where=str(path))
    except BaseException:
        shelf.release(buffer)
        raise
    return Fetched(verified, "flash", lambda: shelf.release(buffer))


def _keep(engine: FlashEngine, verified: VerifiedObject, record: Any, source: str, mine: bool) -> Fetched:
    """A pulled or downloaded object: this rank's own becomes its flash copy again (a replaced node
    regains its state); another rank's goes back to the pool once read."""
    shelf = engine.shelf
    if mine:
        shelf.adopt_pulled(verified, record)
        return Fetched(verified, source)
    return Fetched(verified, source, lambda: shelf.release(verified.buffer))
