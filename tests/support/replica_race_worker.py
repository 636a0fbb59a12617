"""A worker of a two-node flash job where node 0 is slow to finish its restore (started by
stalwart.testing.LocalCluster agents).

    replica_race_worker.py OUT_DIR

Rank 0 takes 3 s to clean up its replicas after the restore's collectives, as a loaded machine may make
it; rank 1 saves step 1 as soon as its own restore returns and waits for the replica to be sent. Rank 0
then reports whether rank 1's replica of step 1 is on its node.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import stalwart as sw
from stalwart.flash.replica_server import ReplicaKeeper


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        original = ReplicaKeeper.drop_other_than

        def slow_drop(self: ReplicaKeeper, keep_steps) -> None:
            time.sleep(3)
            open(os.path.join(out, "slow-cleanup-ran"), "w").close()
            original(self, keep_steps)

        ReplicaKeeper.drop_other_than = slow_drop  # type: ignore[method-assign]
    flash = sw.FlashCheckpointer("job", replicas=1, async_save=False)
    assert flash.restore({"w": torch.zeros(1000)}) is None
    if rank == 1:
        flash.save(1, {"w": torch.full((1000,), 1.0)})
        flash.wait()  # sent, and acknowledged by rank 0's server
    dist.barrier()
    if rank == 0:
        layout = flash.layout
        report = {
            "replica_committed": layout.read_commit(1, 1) is not None,
            "replica_object": layout.object_path(1, 1).exists(),
        }
        with open(os.path.join(out, "report.json"), "w") as fh:
            json.dump(report, fh)
    flash.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
