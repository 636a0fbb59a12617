"""Framework integrations: ``stalwart.integrations.lightning`` (with ``wrap_trainer``),
``stalwart.integrations.transformers`` and ``stalwart.integrations.megatron``.

Each is imported only when used (``from stalwart.integrations.lightning import ...``), so ``import
stalwart`` never loads a framework. What they share lives here: the path a resume helper returns, which
also says where the state came from, a look at the flash tier that loads nothing, and rank 0's answer
sent to every rank (frameworks that save from rank 0 only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..flash.checkpointer import FlashCheckpointer

__all__ = ["SOURCES", "ResumePoint"]

# Where a resumed state came from, in the order ties are broken (the first is the fastest to read).
SOURCES = ("flash", "peer", "durable", "checkpoint", "task")


class ResumePoint(str):
    """A checkpoint path to resume from, usable wherever a path string is, that says where it came from.

    ``source`` is "flash" (tmpfs on this machine), "peer" (a flash replica on another node), "durable"
    (the flash tier's durable copy), "checkpoint" (a regular checkpoint on disk) or "task" (the task
    checkpoint of an earlier attempt); ``step`` is the global step of the state.
    """

    source: str
    step: int | None

    def __new__(cls, path: str | os.PathLike[str], source: str, step: int | None) -> ResumePoint:
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not accepted; use one of {SOURCES}")
        point = super().__new__(cls, os.fspath(path))
        point.source, point.step = source, step
        return point

    def __reduce__(self) -> tuple:  # pickles (and copies) as itself, not as a plain str
        return (ResumePoint, (str(self), self.source, self.step))

    def __repr__(self) -> str:
        return f"ResumePoint({str(self)!r}, source={self.source!r}, step={self.step})"


def newest_flash_step(flash: FlashCheckpointer) -> int | None:
    """The newest step complete on tmpfs or in the durable copy, read from commit records only.

    Lets a resume helper skip loading the flash state when a regular checkpoint is newer.
    """
    engine = flash.engine
    steps = flash.layout.complete_steps(engine.world_size)
    if engine.durable is not None:
        steps = [*steps, *engine.durable.complete_steps(engine.world_size)]
    return max(steps, default=None)


def default_flash(every_n_steps: int = 1) -> FlashCheckpointer | None:
    """Inside a stalwart task, a FlashCheckpointer for the run (job id = run id, durable copy in the run's
    checkpoint store); outside one, None (a job id must then be chosen by the caller).

    It is one rank of one: the frameworks write a checkpoint from their global rank 0 only.
    """
    from ..context import ctx

    if not ctx().in_task:
        return None
    from ..flash.checkpointer import FlashCheckpointer

    return FlashCheckpointer(every_n_steps=every_n_steps, rank=0, world_size=1)


def from_rank_zero(produce: Callable[[], Any], what: str) -> Any:
    """``produce()`` on global rank 0, sent to every rank (pickled, through the default process group).

    A collective: every rank calls it. An error on rank 0 is raised on every rank (on the others as a
    RuntimeError that quotes it), so no rank waits for an answer that never comes.
    """
    import torch.distributed as dist

    if dist.get_rank() == 0:
        try:
            value = produce()
        except BaseException as exc:
            dist.broadcast_object_list([(False, f"{type(exc).__name__}: {exc}")], src=0)
            raise
        dist.broadcast_object_list([(True, value)], src=0)
        return value
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    ok, value = message[0]
    if not ok:
        raise RuntimeError(f"rank 0 could not obtain {what}: {value}")
    return value
