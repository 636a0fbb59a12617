"""Ranks of a data-parallel loop for the preemption tests (importable by ``spawn`` children)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from processes import init_gloo


def one_rank_gets_sigterm(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Every step all-reduces (as data-parallel training does); only rank 1 gets SIGTERM, mid-step 5.
    Writes the step each rank stopped at and how."""
    import torch
    import torch.distributed as dist

    import stalwart as sw

    init_gloo(rank, world_size, port)
    flash = sw.FlashCheckpointer("job", root=root, every_n_steps=100)
    weights = torch.zeros(64)
    report: dict = {"rank": rank}
    try:
        for step in range(1, 200):
            grad = torch.full((64,), float(rank + 1))
            if rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # this node's preemption notice, not the other's
            dist.all_reduce(grad)
            weights += grad
            flash.maybe_save(step, {"w": weights})
        report["stopped"] = "never"
    except sw.Preempted as exc:
        report.update(stopped=exc.step, message=str(exc))
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()  # as a job does before it exits: gloo's threads end cleanly
        raise
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
