"""Ranks of small gloo jobs for the flash tier's multi-rank fault tests (spawned processes).

Each writes ``result-RANK.json`` into OUT: what it restored or raised, and how long that took.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from processes import init_gloo


def _report(out: str, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))


def restore_with_one_rank_failing(rank: int, world: int, port: int, base: str, out: str) -> None:
    """Phase 1 saves step 10 with a durable copy; phase 2 restores on empty flash roots while rank 1's
    tmpfs fills up just as it takes in the downloaded object."""
    try:
        import torch

        import stalwart as sw
        from stalwart.flash.errors import FlashSpaceError
        from stalwart.flash.shelf import RankShelf

        init_gloo(rank, world, port, timeout=120)
        durable = Path(base, "durable").as_uri()
        flash = sw.FlashCheckpointer("job", root=Path(base, "flash"), durable=durable, async_save=False)
        flash.save(10, {"w": torch.full((1000,), float(rank))}, durable=True)
        flash.close()
        if rank == 1:

            def no_room(self: RankShelf, *args: object) -> None:
                raise FlashSpaceError(28, "no space in the flash root for the commit record")

            RankShelf.adopt_pulled = no_room  # type: ignore[method-assign]
        flash = sw.FlashCheckpointer("job", root=Path(base, f"empty-{rank}"), durable=durable)
        started = time.monotonic()
        try:
            flash.restore({"w": torch.zeros(1000)})
            result: dict[str, Any] = {"raised": None}
        except Exception as exc:
            result = {"raised": type(exc).__name__, "message": str(exc)}
        result["seconds"] = time.monotonic() - started
        _report(out, rank, result)
        os._exit(0)  # the engine of a failed restore: no collective teardown
    except BaseException:
        _report(out, rank, {"raised": "worker", "message": traceback.format_exc()})
        raise


def save_with_replication_down(rank: int, world: int, port: int, base: str, out: str) -> None:
    """Two nodes, one replica each, and the replication port unreachable: saves go on, memory bounded."""
    try:
        import torch

        import stalwart as sw
        from stalwart.flash import replication

        os.environ["STALWART_NODE"] = f"node-{rank}"
        os.environ["STALWART_REPLICATION_HOST"] = "127.0.0.1"
        init_gloo(rank, world, port, timeout=120)

        def blocked(*args: object, **kwargs: object) -> None:  # a firewall between the nodes
            raise ConnectionRefusedError("the replication port is blocked")

        replication.Connection.connect = blocked  # type: ignore[method-assign,assignment]
        import torch.distributed as dist

        flash = sw.FlashCheckpointer("job", root=Path(base, f"node-{rank}"), keep=2, async_save=False)
        for step in range(1, 21):
            flash.save(step, {"w": torch.full((1 << 16,), float(step))})
        flash.wait()
        dist.barrier()  # both ranks' facts about steps 1-20 are posted
        flash.save(21, {"w": torch.full((1 << 16,), 21.0)})
        _report(out, rank, {"own": sorted(flash.engine.shelf.own)})
        flash.close()
    except BaseException:
        _report(out, rank, {"raised": "worker", "message": traceback.format_exc()})
        raise
