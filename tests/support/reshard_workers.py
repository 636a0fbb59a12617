"""Ranks of a flash job whose world size changes between runs (spawned gloo processes, one per node).

Each rank is alone on its node (``STALWART_NODE``, its own flash root under ``base/node-N``), so with
``replicas=1`` every object has a copy on the next node of the ring. ``save`` writes replicated state
(the same model on every rank, plus the rank that saved it) as steps 1..3; ``load`` restores with
``reshard``, reports what it got, saves steps 4 and 5 at its own world size and restores again.
Each writes ``result-RANK.json`` into OUT.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from processes import init_gloo

SHAPE = (256, 64)


def model(step: int) -> dict[str, Any]:
    """The replicated state after ``step`` steps: the same on every rank."""
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "model": {"w": torch.randn(*SHAPE, generator=gen), "b": torch.randn(SHAPE[1], generator=gen)},
        "optim": {"exp_avg": torch.randn(*SHAPE, generator=gen), "step": step},
    }


def _report(out: str, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))


def _other_worlds(root: Path, world: int) -> list[list[int]]:
    from stalwart.flash.layout import FlashLayout

    return [[s, r, w] for s, r, w in FlashLayout(root, "job").commit_index() if w != world]


def run(
    rank: int, world: int, port: int, base: str, out: str, mode: str, nodes: list[int], options: dict
) -> None:
    node = nodes[rank]
    os.environ["STALWART_NODE"] = f"node-{node}"
    root = Path(base, f"node-{node}", "flash")
    try:
        import torch
        import torch.distributed as dist

        import stalwart as sw

        init_gloo(rank, world, port, timeout=120)
        durable = options.get("durable")
        flash = sw.FlashCheckpointer("job", root=root, durable=durable, async_save=False, replicas=1)
        if mode == "save":
            torch.manual_seed(50 + rank)  # every rank's generators differ
            for step in (1, 2, 3):
                flash.save(step, {**model(step), "saver": torch.tensor(rank)}, durable=durable is not None)
            flash.wait()
            dist.barrier()  # every replica is in place before any node stops serving
            flash.close()
            _report(out, rank, {"saved": 3})
            dist.barrier()
            dist.destroy_process_group()
            return
        shape = tuple(options.get("shape", SHAPE))
        state = {
            "model": {"w": torch.zeros(*shape), "b": torch.zeros(SHAPE[1])},
            "optim": {"exp_avg": torch.zeros(*SHAPE), "step": -1},
            "saver": torch.tensor(-1),
        }
        try:
            step = flash.restore(state, reshard=options.get("reshard"))
        except Exception as exc:
            _report(out, rank, {"raised": type(exc).__name__, "message": str(exc)})
            os._exit(0)  # a failed restore: no collective teardown
        want = model(step) if step is not None else None
        result: dict[str, Any] = {
            "step": step,
            "source": flash.restored_from,
            "exact": want is not None
            and all(torch.equal(state["model"][k], want["model"][k]) for k in ("w", "b"))
            and torch.equal(state["optim"]["exp_avg"], want["optim"]["exp_avg"])
            and state["optim"]["step"] == step,
            "saver": int(state["saver"]),
            "draw": torch.rand(4).tolist(),  # the generators restored: rank 0's on every rank
            "other_after_restore": _other_worlds(root, world),
        }
        for new in (4, 5):
            flash.save(new, {**model(new), "saver": torch.tensor(rank)})
        flash.wait()
        state["model"]["w"].zero_()
        result["again"] = flash.restore(state, reshard=options.get("reshard"))
        result["again_exact"] = torch.equal(state["model"]["w"], model(5)["model"]["w"])
        flash.save(6, {**model(6), "saver": torch.tensor(rank)})
        flash.wait()
        dist.barrier()  # step 6 is safe (committed and replicated by every rank): the next save sees it
        flash.save(7, {**model(7), "saver": torch.tensor(rank)})
        result["other_after_save"] = _other_worlds(root, world)
        flash.wait()
        dist.barrier()
        flash.close()
        _report(out, rank, result)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        _report(out, rank, {"raised": "worker", "message": traceback.format_exc()})
        raise
