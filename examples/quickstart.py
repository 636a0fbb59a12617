"""stalwart quick start: a training that is killed mid-way resumes by itself from its checkpoint.

The first attempt kills itself with SIGKILL after epoch 4 (as a crash or an OOM kill would). The
runner starts a second attempt in a fresh process; it loads the checkpoint the first one saved and
finishes the remaining epochs. Run it with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import os
import signal

import torch

import stalwart as sw

env = sw.TaskEnvironment(name="quickstart", resources=sw.Resources(cpu=1, memory="1Gi"))


def make_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=generator)
    w = torch.randn(16, 1, generator=generator)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=generator)


@env.task(retries=3)
def train(epochs: int = 8, crash_after_epoch: int = 4) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = make_data()
    context = sw.ctx()

    start = 0
    state = context.checkpoint.load_object()  # the newest checkpoint of an earlier attempt, or None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        print(f"attempt {context.attempt}: resumed from the checkpoint of epoch {start}")

    loss = torch.tensor(float("nan"))
    for epoch in range(start, epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(64):
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        context.checkpoint.save_sync(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
        )
        print(f"attempt {context.attempt}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
        if context.attempt == 0 and epoch + 1 == crash_after_epoch:
            print(f"attempt {context.attempt}: simulating a crash (SIGKILL)")
            os.kill(os.getpid(), signal.SIGKILL)
    return round(loss.item(), 6)


if __name__ == "__main__":
    run = sw.run(train)
    print()
    print(f"run {run.id}: {run.status}, final loss {run.output}")
    for attempt in run.attempts:
        print(f"  attempt {attempt.number}: {attempt.error or attempt.status}")
    print(f"details: stalwart show {run.id}")
