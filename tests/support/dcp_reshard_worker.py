"""A worker saving or loading DTensors through the flash DCP adapter (started by LocalCluster agents).

    dcp_reshard_worker.py OUT_DIR DURABLE_URL save|load

``save``: a mesh of every rank (1-D, Shard(0)) and a 2-D tensor sharded on its columns, as step 5.
``load``: whatever world size this run has, a 1-D mesh with the first tensor sharded on its columns and
the second on its rows; each rank checks its local shards against the full tensors and reports where
its objects came from.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stalwart as sw


def full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"rows": torch.randn(48, 20, generator=gen), "cols": torch.randn(12, 60, generator=gen)}


def main() -> None:
    warnings.simplefilter("ignore")
    out, durable, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    tensors = full()
    if mode == "save":
        state = {
            "rows": distribute_tensor(tensors["rows"], mesh, [Shard(0)]),
            "cols": distribute_tensor(tensors["cols"], mesh, [Shard(1)]),
            "bias": distribute_tensor(torch.arange(6.0), mesh, [Replicate()]),
        }
        writer = sw.FlashStorageWriter("job", durable=durable, replicas=1)
        dcp.save(state, checkpoint_id=5, storage_writer=writer)
        writer.wait()
        dist.barrier()
        writer.close()
        report = {"rank": rank, "saved": 5}
    else:
        state = {  # placements changed: rows now split by columns, cols by rows
            "rows": distribute_tensor(torch.zeros(48, 20), mesh, [Shard(1)]),
            "cols": distribute_tensor(torch.zeros(12, 60), mesh, [Shard(0)]),
            "bias": distribute_tensor(torch.zeros(6), mesh, [Replicate()]),
        }
        reader = sw.FlashStorageReader("job", durable=durable)
        dcp.load(state, checkpoint_id=5, storage_reader=reader)
        want = {
            "rows": distribute_tensor(tensors["rows"], mesh, [Shard(1)]).to_local(),
            "cols": distribute_tensor(tensors["cols"], mesh, [Shard(0)]).to_local(),
            "bias": torch.arange(6.0),
        }
        exact = all(torch.equal(state[k].to_local(), v) for k, v in want.items())
        report = {
            "rank": rank,
            "world": world,
            "exact": exact,
            "sources": sorted(set(reader.restored_from.values())),
            "node": os.environ["STALWART_NODE"],
        }
        dist.barrier()
        reader.close()
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
