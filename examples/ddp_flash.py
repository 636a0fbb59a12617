"""DDP on 2 CPU processes with flash checkpoints: a worker is killed mid-run and the job goes on.

torch elastic restarts the worker group (max_restarts=2); the workers restore the newest step from the
flash tier in /dev/shm (the same node: nothing is read from the durable store) and finish. Run it with
``python examples/ddp_flash.py``.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

import stalwart as sw

env = sw.TaskEnvironment(name="ddp-demo")


@env.task(retries=1, elastic=sw.Elastic(nproc_per_node=2, max_restarts=2, monitor_interval=0.5))
def train(steps: int = 40, kill_at: int = 25) -> dict:
    dist.init_process_group("gloo")
    context = sw.ctx()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    flash = sw.FlashCheckpointer(every_n_steps=5)  # job id: the run id; durable copy: the run's store
    state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
    start = flash.restore(state) or 0
    if start:
        optimizer.load_state_dict(state["optimizer"])
        print(f"rank {context.rank}: resumed at step {start} from {flash.restored_from}", flush=True)
    first_round = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    loss = torch.tensor(0.0)
    for step in range(start, steps):
        data = torch.Generator().manual_seed(1000 * step + context.rank)
        x = torch.randn(64, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        flash.maybe_save(step + 1, {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()})
        if first_round and context.rank == 1 and step + 1 == kill_at:
            flash.wait()
            print(f"rank 1: killed by SIGKILL after step {step + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    flash.close()
    dist.destroy_process_group()
    return {"resumed_at": start, "restored_from": flash.restored_from, "loss": round(loss.item(), 6)}


if __name__ == "__main__":
    run = sw.run(train)
    print(f"run {run.id}: {run.status}: {run.output}")
