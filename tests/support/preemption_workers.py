"""Ranks of a data-parallel loop for the preemption tests (importable by ``spawn`` children)."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from typing import Any

from processes import init_gloo


def _data_parallel_step(rank: int, step: int, weights: Any) -> None:
    """A gradient all-reduced into ``weights``, as every data-parallel step does; rank 1 alone gets
    SIGTERM in the middle of step 5 (its node's preemption notice, not the other's)."""
    import torch
    import torch.distributed as dist

    grad = torch.full((64,), float(rank + 1))
    if rank == 1 and step == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    dist.all_reduce(grad)
    weights += grad


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
            _data_parallel_step(rank, step, weights)
            flash.maybe_save(step, {"w": weights})
        report["stopped"] = "never"
    except sw.Preempted as exc:
        report.update(stopped=exc.step, message=str(exc))
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()  # as a job does before it exits: gloo's threads end cleanly
        raise
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def dcp_rank_gets_sigterm(
    rank: int, world_size: int, port: int, root: str, out: str, every: int = 100
) -> None:
    """As ``one_rank_gets_sigterm``, saving through ``dcp.save`` and the flash writer every ``every``
    steps (durable every 100), and asking the writer at every boundary; then a fresh reader loads the
    newest step back."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import stalwart as sw

    init_gloo(rank, world_size, port)
    durable = Path(root).parent.joinpath("durable").as_uri()
    writer = sw.FlashStorageWriter("job", root=root, durable=durable, durable_every_n_steps=100)
    state = {"w": torch.zeros(64)}
    report: dict = {"rank": rank}
    try:
        for step in range(1, 200):
            _data_parallel_step(rank, step, state["w"])
            if step % every == 0:
                dcp.save(state, checkpoint_id=step, storage_writer=writer)
            if writer.preempted(step):
                raise writer.save_preempted(step, state)
        report["stopped"] = "never"
    except sw.Preempted as exc:
        report.update(stopped=exc.step, message=str(exc), saved=state["w"].tolist())
        reader = sw.FlashStorageReader("job", root=root, durable=durable)
        loaded = {"w": torch.zeros(64)}
        dcp.load(loaded, storage_reader=reader)
        report["loaded"] = loaded["w"].tolist()
        reader.close()
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        raise
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


# the stop step is one the loop saves anyway, without a durable copy
dcp_rank_gets_sigterm_at_a_regular_save = functools.partial(dcp_rank_gets_sigterm, every=6)
