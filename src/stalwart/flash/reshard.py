"""Steps saved by another number of ranks: resuming replicated state from them, and clearing them.

DDP-style training keeps the same model and optimizer on every rank, so a step saved by N ranks can go
on with M: every rank of the new world loads saved rank 0's object (from its node's tmpfs, a peer, or
the durable shelf, verified as any restore is) and none makes it its own, since it belongs to the old
world. What differs per rank rides along as rank 0's, the random generators included, as a Lightning
checkpoint written by rank 0 restores them. The caller asks for this (``reshard="replicated"``): the
bytes do not say whether state is replicated, and rank 0's object in state that differs per rank would
be wrong. Sharded state (DTensor, FSDP2) reshards through DCP's planner (``FlashStorageReader``).

Such a step counts when saved rank 0's object of it exists somewhere, whether or not the other ranks'
objects survived: with replicated state every rank reaches a step only together with the others (DDP
averages gradients at every step), so rank 0's object is the whole state of the step even when the node
that held another rank's copy left for good.

Once training goes on at the new world size, the old world's objects go: those newer than the restored
step at once (an abandoned timeline), the rest when a step of the new world is safe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .layout import FlashLayout
    from .shelf import RankShelf

__all__ = ["RESHARD", "OtherWorlds", "check_reshard", "drop_other_worlds", "other_worlds"]

RESHARD = ("replicated",)


def check_reshard(value: object) -> str | None:
    """``value`` if it names a way to reshard (or None: no resharding); else a ValueError saying so."""
    if value is not None and value not in RESHARD:
        raise ValueError(
            f"reshard={value!r} is not accepted; use None (restore only steps saved by this world size) or "
            "'replicated' (every rank holds the same state, as with DDP: a step saved by another number of "
            "ranks is restored from saved rank 0's object on every rank). Sharded state reshards through "
            "DCP (FlashStorageReader)"
        )
    return value


@dataclass(frozen=True)
class OtherWorlds:
    """Steps saved by another world size than the job's whose rank 0 object exists, the same on every
    rank."""

    flash: dict[int, int]  # step -> the world size that saved it: rank 0's object is on some node
    holders: dict[int, list[int]]  # step -> ranks (of this world) whose node holds saved rank 0's object
    durable: dict[int, int]  # step -> world size: rank 0's object is in the durable store

    @property
    def steps(self) -> dict[int, int]:
        return {**self.durable, **self.flash}

    def describe(self) -> str:
        tiers = {
            step: [t for t, held in (("flash", self.flash), ("durable", self.durable)) if step in held]
            for step in self.steps
        }
        return ", ".join(
            f"{step} by {size} ranks ({' and '.join(tiers[step])})"
            for step, size in sorted(self.steps.items())
        )


def other_worlds(shelf: RankShelf, group: Any, durable: dict[int, int]) -> OtherWorlds:
    """Collective: the steps of other world sizes whose rank 0 object some node holds (``durable``:
    those the durable store holds, listed by the caller)."""
    holders: dict[tuple[int, int], list[int]] = {}
    for holder, items in enumerate(group.gather(shelf.other_world_holdings())):
        for step, rank, world in items:
            if rank == 0:
                holders.setdefault((step, world), []).append(holder)
    flash = dict(sorted(holders))  # one step saved by two world sizes cannot be: the larger is kept
    return OtherWorlds(flash, {step: holders[(step, world)] for step, world in flash.items()}, durable)


def drop_other_worlds(layout: FlashLayout, world_size: int, keep: Callable[[int], bool]) -> list[int]:
    """Remove from this node's flash root every object saved by another world size than ``world_size``
    whose step ``keep`` refuses (record first, as every drop does). Several ranks of a node may run it
    at once. Returns the steps dropped."""
    dropped: set[int] = set()
    for step, rank, world in layout.commit_index():
        if world != world_size and not keep(step):
            layout.remove_commit(step, rank)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.object_path(step, rank))
            dropped.add(step)
    for step in dropped:
        layout.remove_step_if_abandoned(step)
    return sorted(dropped)
