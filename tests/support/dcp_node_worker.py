"""A worker of a multi-node job saving through DCP (started by torch elastic agents of LocalCluster).

    dcp_node_worker.py OUT_DIR DURABLE_URL STEPS EXECUTOR [--hold]

EXECUTOR is how steps are saved: "sync" (dcp.save), "thread" or "process" (dcp.async_save with that
executor). Loads the newest complete step if there is one, reports what it loaded (bit-exact or not,
from which tier), saves the steps after it up to STEPS (after a load: 2 more steps), with a durable copy
every 2nd step, reports the latest complete step as this rank sees it, and with --hold then sleeps until
killed.
"""

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import stalwart as sw


def state_for(rank: int, step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {
        "shared": torch.randn(40_000, generator=gen),  # the same on every rank: DCP writes it once
        f"rank{rank}": torch.arange(5_000, dtype=torch.int64) * (rank + 1) + step,
        "step": step,
    }


def empty(rank: int) -> dict:
    return {"shared": torch.zeros(40_000), f"rank{rank}": torch.zeros(5_000, dtype=torch.int64), "step": -1}


def exact(got: dict, want: dict) -> bool:
    return all(
        torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in want.items()
    )


def main() -> None:
    warnings.simplefilter("ignore")
    out, durable, steps, executor = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    hold = "--hold" in sys.argv
    dist.init_process_group("gloo")
    rank, node = dist.get_rank(), os.environ["STALWART_NODE"]
    reader = sw.FlashStorageReader("job", durable=durable)
    latest = reader.latest_step()
    report = {"rank": rank, "node": node, "restored": latest, "exact": None, "source": None}
    if latest is not None:
        state = empty(rank)
        dcp.load(state, checkpoint_id=latest, storage_reader=reader)
        report["exact"] = exact(state, state_for(rank, latest))
        report["sources"] = sorted(set(reader.restored_from.values()))
    with open(os.path.join(out, f"restore-{node}-rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    writer = sw.FlashStorageWriter("job", durable=durable, durable_every_n_steps=2, replicas=1, keep=2)
    pending = None
    last = steps if latest is None else latest + 2
    for step in range((latest or 0) + 1, last + 1):
        if pending is not None:
            pending.result(timeout=120)
        if executor == "sync":
            dcp.save(state_for(rank, step), checkpoint_id=step, storage_writer=writer)
            continue
        kind = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
        writer = sw.FlashStorageWriter("job", durable=durable, durable_every_n_steps=2, replicas=1, keep=2)
        pending = dcp.async_save(
            state_for(rank, step), checkpoint_id=step, storage_writer=writer, async_checkpointer_type=kind
        )
    if pending is not None:
        pending.result(timeout=120)
    writer.wait()
    dist.barrier()
    seen = sw.FlashStorageReader("job", durable=durable).latest_step()
    with open(os.path.join(out, f"saved-{node}-rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "node": node, "latest": seen}, fh)
    if hold:  # alive, replicated, waiting to lose a node
        open(os.path.join(out, f"holding-rank{rank}"), "w").close()
        time.sleep(600)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
