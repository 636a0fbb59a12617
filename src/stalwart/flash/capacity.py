"""How much tmpfs a flash configuration needs, checked against the flash root at the first save.

Per rank, in objects the size of one save (DESIGN decisions 1 and 11):

- ``keep + 1``: the kept steps and the one being written (the new step commits, then the oldest goes);
- ``+ 2`` with a durable store: one step uploading and the newest waiting, while non-blocking saves run
  ahead of a slow or absent store (blocking saves upload before they return and need nothing more);
- ``+ 2`` with replicas on other nodes: one step being sent and the newest waiting (a step is dropped
  only once a newer one is safe; while replication is down, steps are kept without replicas);
- ``+ (keep + 1)`` per rank of another node whose replicas this rank keeps.

The ranks of a node share its tmpfs; ``LOCAL_WORLD_SIZE`` (set by torch elastic) says how many there are.
Too little room for ``keep + 1`` (and the replicas kept) fails the first save with FlashSpaceError,
before anything is written; too little for the lag is a warning, since a tier that keeps up never
needs it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from .buffers import human_bytes
from .errors import FlashSpaceError
from .layout import FlashLayout

__all__ = ["check_room", "demand"]

log = logging.getLogger(__name__)

LAG_OBJECTS = 2  # one being uploaded or sent, the newest waiting (flash.uploader, flash.replication)


def demand(
    object_size: int, *, keep: int, durable: bool, replicating: bool = False, replica_sources: int = 0
) -> tuple[int, int]:
    """(bytes one rank needs, bytes it may need while the durable copy or replication lags)."""
    needed = (keep + 1) * (1 + replica_sources) * object_size
    lagging = LAG_OBJECTS * (int(durable) + int(replicating)) * object_size
    return needed, needed + lagging


def local_ranks(world_size: int) -> int:
    """Ranks sharing this node's flash root (torch elastic's LOCAL_WORLD_SIZE; 1 when unknown)."""
    try:
        value = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 1
    return min(max(value, 1), world_size)


def check_room(
    layout: FlashLayout,
    object_size: int,
    *,
    keep: int,
    durable: bool,
    replicating: bool = False,
    replica_sources: int = 0,
    world_size: int = 1,
) -> None:
    """Raise FlashSpaceError if the flash root cannot hold ``keep + 1`` objects per local rank; warn if it
    cannot also hold what a lagging durable copy keeps."""
    ranks = local_ranks(world_size)
    needed, worst = (
        ranks * n
        for n in demand(
            object_size, keep=keep, durable=durable, replicating=replicating, replica_sources=replica_sources
        )
    )
    held = _bytes_held(layout.job_dir)  # already allocated by this job on this node: reusable
    free = shutil.disk_usage(layout.job_dir).free
    available = free + held
    parts = f"keep={keep} + 1 objects of {human_bytes(object_size)}"
    if replica_sources:
        parts += f", and as many for each of {replica_sources} rank(s) whose replicas it keeps"
    where = f"{ranks} rank(s) of flash job {layout.job_id!r} on this node"
    if needed > available:
        raise FlashSpaceError(
            errno.ENOSPC,
            f"no space in {layout.root} for {where}: they need {human_bytes(needed)} ({parts}, per "
            f"rank), and {human_bytes(available)} is available ({human_bytes(free)} free + "
            f"{human_bytes(held)} held by the job); committed checkpoints are intact. Lower keep=, or "
            "point root= / STALWART_FLASH_ROOT at a larger tmpfs",
        )
    if worst > available:
        log.warning(
            "flash: %s need %s, and up to %s while the durable copy or replication lags behind saves; %s is "
            "available in %s: if they slow down, saves will fail with FlashSpaceError",
            where,
            human_bytes(needed),
            human_bytes(worst),
            human_bytes(available),
            layout.root,
        )


def _bytes_held(directory: Path) -> int:
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue  # removed while we looked
    return total
