"""A worker of an elastic job whose node count changes (``LocalCluster`` with ``min_nodes``).

    elastic_reshard_worker.py OUT_DIR

Two kinds of state, both on the flash tier with one replica on a peer node:

- replicated: a tiny model trained with DDP and its Adam optimizer, through ``FlashCheckpointer``,
  restored with ``reshard="replicated"``;
- sharded: a DTensor table split by rows over every rank of the world (as FSDP2 shards), saved with
  ``dcp.save`` through ``FlashStorageWriter`` and loaded with DCP's planner at whatever world size the
  job now has.

At every start each rank restores both and writes ``restore-ATTEMPT-rankR.json``: the steps, the tiers,
and whether the state is bit-exact (rank 0 records a digest of the replicated state at every save; the
table is a function of its step). Then it trains, one step every 0.25 s, rank 0 writing
``progress.json`` so the test knows when to take a node away or add one, until the test writes the
last step into ``last.json`` (rank 0 reads it and tells the others; at most ``LIMIT`` steps).
"""

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import stalwart as sw

ROWS, COLS = 36, 8
LIMIT = 1000


def table(step: int) -> torch.Tensor:
    """The sharded state after ``step`` steps."""
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) * (step + 1)


def digest(model: torch.nn.Module, optim: torch.optim.Optimizer) -> str:
    found = hashlib.sha256()
    tensors = list(model.state_dict().values())
    tensors += [v for s in optim.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    for tensor in tensors:
        found.update(tensor.detach().contiguous().numpy().tobytes())
    return found.hexdigest()


def finished(out: Path, step: int) -> bool:
    """Whether ``step`` is the last (the same answer on every rank: rank 0's)."""
    last = json.loads((out / "last.json").read_text()) if (out / "last.json").exists() else LIMIT
    done = torch.tensor(int(dist.get_rank() == 0 and step >= min(last, LIMIT)))
    dist.broadcast(done, 0)
    return bool(done)


def write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def main() -> None:
    warnings.simplefilter("ignore")
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = f"{os.environ['TORCHELASTIC_RESTART_COUNT']}-world{world}"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    ddp = DistributedDataParallel(model)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    flash = sw.FlashCheckpointer("replicated", replicas=1, every_n_steps=1)
    writer = sw.FlashStorageWriter("sharded", replicas=1)
    mesh = init_device_mesh("cpu", (world,))

    state = {"model": model, "optim": optim}
    step = flash.restore(state, reshard="replicated") or 0
    report = {"rank": rank, "world": world, "node": os.environ["STALWART_NODE"], "step": step}
    report["source"] = flash.restored_from
    if step:
        saved = json.loads((out / "digests.json").read_text())[str(step)]
        report["exact"] = digest(model, optim) == saved["digest"]
        report["saved_by"] = saved["world"]
    sharded = {"table": distribute_tensor(torch.zeros(ROWS, COLS, dtype=torch.float64), mesh, [Shard(0)])}
    reader = sw.FlashStorageReader("sharded")
    latest = reader.latest_step()
    if latest is not None:
        dcp.load(sharded, checkpoint_id=latest, storage_reader=reader)
        want = distribute_tensor(table(latest), mesh, [Shard(0)]).to_local()
        report["table_step"] = latest
        report["table_exact"] = torch.equal(sharded["table"].to_local(), want)
        report["table_sources"] = sorted(set(reader.restored_from.values()))
    reader.close()
    write_json(out / f"restore-{attempt}-rank{rank}.json", report)

    digests = json.loads((out / "digests.json").read_text()) if (out / "digests.json").exists() else {}
    while not finished(out, step):
        step += 1
        gen = torch.Generator().manual_seed(step * 100 + rank)
        optim.zero_grad()
        ddp(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        optim.step()
        sharded = {"table": distribute_tensor(table(step), mesh, [Shard(0)])}
        dcp.save(sharded, checkpoint_id=step, storage_writer=writer)
        if rank == 0:  # the digest is on disk before the save can be restored
            digests[str(step)] = {"digest": digest(model, optim), "world": world}
            write_json(out / "digests.json", digests)
        flash.maybe_save(step, state)
        if rank == 0:
            write_json(out / "progress.json", {"step": step, "world": world, "attempt": attempt})
        time.sleep(0.25)
    flash.close()
    writer.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
