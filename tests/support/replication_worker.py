"""A worker of a multi-node flash job (started by torch elastic agents of stalwart.testing.LocalCluster).

    replication_worker.py OUT_DIR DURABLE_URL STEPS REPLICAS [--hold]

Restores, reports what it restored (and whether it is bit-exact), saves steps up to STEPS with a
state that is a function of (rank, step), waits for replication, and with --hold then sleeps until
killed (a node that is still alive when another is lost).
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import stalwart as sw


def state_for(rank: int, step: int) -> dict:
    return {
        "w": torch.full((50_000,), float(rank * 1000 + step)),
        "r": torch.arange(10) * (rank + 1) + step,
        "meta": {"step": step, "rank": rank},
    }


def main() -> None:
    out, durable, steps, replicas = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    hold = "--hold" in sys.argv
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flash = sw.FlashCheckpointer("job", durable=durable, replicas=replicas, keep=2, async_save=False)
    state = {"w": torch.zeros(50_000), "r": torch.zeros(10, dtype=torch.int64)}
    before = {key: (state[key], state[key].data_ptr()) for key in ("w", "r")}
    restored = flash.restore(state)
    exact = None
    if restored is not None:
        expected = state_for(rank, restored)
        exact = torch.equal(state["w"], expected["w"]) and torch.equal(state["r"], expected["r"])
        exact = exact and state["meta"] == expected["meta"]
        # restored in place: the caller's own tensors, whatever tier the bytes came from
        exact = exact and all(state[k] is t and t.data_ptr() == p for k, (t, p) in before.items())
    report = {
        "rank": rank,
        "node": os.environ["STALWART_NODE"],
        "restored": restored,
        "source": flash.restored_from,
        "exact": exact,
        # the restored step is never saved again, also where it came from a peer and is not held here
        "saved_again": restored is not None and flash.save(restored, state_for(rank, restored)),
    }
    flash.wait()  # a step recovered from peers is pulled into this node's tmpfs again, in the background
    report["held_here"] = restored is not None and restored in flash.engine.shelf.own
    with open(os.path.join(out, f"restore-{os.environ['STALWART_NODE']}-rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    for step in range((restored or 0) + 1, steps + 1):
        flash.save(step, state_for(rank, step), durable=step == 1)
    flash.wait()
    dist.barrier()
    if hold:  # alive, replicated, waiting to lose a node
        open(os.path.join(out, f"holding-rank{rank}"), "w").close()
        time.sleep(600)
    flash.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
