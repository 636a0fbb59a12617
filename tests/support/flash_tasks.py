"""A training task with flash checkpoints, started by the tests in fresh attempt processes."""

from __future__ import annotations

import os
import shutil
import signal
import time

import torch

import stalwart as sw

env = sw.TaskEnvironment(name="flash-tests")


@env.task(retries=2)
def train(steps: int, crash_after: int = 0, wipe_flash: bool = False, term_in: int = 0) -> dict:
    """Deterministic training; attempt 0 dies by SIGKILL after step ``crash_after`` (0: never), or gets
    SIGTERM in the middle of step ``term_in`` (0: never)."""
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=2, durable_every_n_steps=4)  # job id and store from the run
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if wipe_flash and context.attempt > 0:
        shutil.rmtree(flash.job_dir, ignore_errors=True)  # as if the attempt ran on a new machine
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    start = flash.restore(state) or 0
    if start:
        optimizer.load_state_dict(state["optimizer"])
    for step in range(start, steps):
        data = torch.Generator().manual_seed(step)
        x = torch.randn(32, 8, generator=data)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        if context.attempt == 0 and step + 1 == term_in:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice, before the step is complete
        optimizer.step()
        flash.maybe_save(step + 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if context.attempt == 0 and step + 1 == crash_after:
            flash.wait()  # the step is committed (and its durable copy uploaded, if due)
            os.kill(os.getpid(), signal.SIGKILL)
    flash.close()
    return {
        "attempt": context.attempt,
        "start": start,
        "restored_from": flash.restored_from,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


@env.task(retries=2)
def slow_train(steps: int, progress: str) -> dict:
    """Attempt 0 trains slowly (the test sends its runner SIGTERM meanwhile) and writes its step to
    ``progress``; later attempts run at full speed."""
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=1000)  # only the preemption save
    weights = torch.zeros(16)
    start = flash.restore({"w": weights}) or 0
    for step in range(start, steps):
        weights += 1.0
        if context.attempt == 0:
            time.sleep(0.05)
            with open(progress, "w") as out:
                out.write(str(step + 1))
        flash.maybe_save(step + 1, {"w": weights})
    flash.close()
    return {"start": start, "restored_from": flash.restored_from, "w": weights[0].item()}
