"""Elastic tasks the tests run through torch elastic (DDP on gloo, flash checkpoints)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

import stalwart as sw

env = sw.TaskEnvironment(name="elastic-tests")


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=2, monitor_interval=0.2))
def ddp(steps: int, kill_rank: int = -1, kill_after: int = 0) -> dict:
    """DDP on 2 processes; ``kill_rank`` SIGKILLs itself after step ``kill_after`` in the first round."""
    dist.init_process_group("gloo")
    context = sw.ctx()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    flash = sw.FlashCheckpointer(every_n_steps=1, async_save=False)
    state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
    start = flash.restore(state) or 0
    if start:
        optimizer.load_state_dict(state["optimizer"])
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for step in range(start, steps):
        data = torch.Generator().manual_seed(step * 100 + context.rank)
        x = torch.randn(16, 6, generator=data)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        flash.save(step + 1, {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()})
        if restarts == 0 and context.rank == kill_rank and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    flash.close()
    weights = [p.detach().clone() for p in model.parameters()]
    dist.destroy_process_group()
    return {
        "rank": context.rank,
        "world_size": context.world_size,
        "local_rank": context.local_rank,
        "restarts": restarts,
        "start": start,
        "restored_from": flash.restored_from,
        "weights": weights,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=0.2))
def raises_on_rank_one() -> None:
    dist.init_process_group("gloo")
    if sw.ctx().rank == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()


def _sum_of_ranks() -> int:
    dist.init_process_group("gloo")
    total = torch.tensor([float(sw.ctx().rank + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return int(total.item())


@env.task(elastic=sw.Elastic(nnodes=2, nproc_per_node=1, rdzv_configs={"join_timeout": 120}))
def two_nodes() -> int:
    return _sum_of_ranks()


@env.task(elastic=sw.Elastic(nnodes=2, nproc_per_node=1, rdzv_configs={"join_timeout": 5}))
def lonely_node() -> int:
    return _sum_of_ranks()


@env.task(retries=2, elastic=sw.Elastic(nproc_per_node=2, max_restarts=2, monitor_interval=0.2))
def refuses_on_rank_one(marker: str) -> None:
    """Rank 1 raises NonRetryableError; ``marker`` gets a line for each time it does."""
    dist.init_process_group("gloo")
    if sw.ctx().rank == 1:
        with open(marker, "a") as fh:
            restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            fh.write(f"attempt {sw.ctx().attempt} round {restarts}\n")
        raise sw.NonRetryableError("rank one's configuration is wrong")
    dist.barrier()


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=3))
def killed_while_its_peer_waits() -> None:
    """Rank 1 dies by SIGKILL; rank 0, waiting for it in a barrier, fails with a gloo error after it."""
    dist.init_process_group("gloo")
    dist.barrier()
    if sw.ctx().rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=0.2), retries=1)
def slow_ddp(steps: int, progress: str) -> dict:
    """Data-parallel steps (an all_reduce each); attempt 0 is slow and writes its step to ``progress``
    (the test sends its torch elastic agent SIGTERM meanwhile). Only the preemption save."""
    dist.init_process_group("gloo")
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=1000)
    weights = torch.zeros(16)
    start = flash.restore({"w": weights}) or 0
    for step in range(start, steps):
        grad = torch.ones(16)
        dist.all_reduce(grad)
        weights += grad
        if context.attempt == 0:
            time.sleep(0.05)
            if context.rank == 0:
                with open(progress, "w") as out:
                    out.write(str(step + 1))
        flash.maybe_save(step + 1, {"w": weights})
    flash.close()
    dist.destroy_process_group()
    return {"start": start, "restored_from": flash.restored_from, "w": weights[0].item()}


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0))
def gather_ranks() -> list[int]:
    """Every rank's number, gathered over gloo; the task leaves its process group to the worker."""
    dist.init_process_group("gloo")
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([float(dist.get_rank())]))
    return [int(t.item()) for t in gathered]


def worker_then_report(attempt_dir: str, rank: int, world_size: int, port: int, report: str) -> None:
    """Run the elastic worker as torch elastic would (its env), then say whether a process group is
    still alive in this process once the worker returned."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from stalwart.runtime.elastic_launch import run_worker

    run_worker(attempt_dir)
    with open(report, "w") as fh:
        fh.write(str(dist.is_initialized()))
