"""Tasks the runner tests start in fresh processes (they import this module by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import stalwart as sw

env = sw.TaskEnvironment(name="runner-tests", env_vars={"FROM_ENV": "environment"})


@dataclass
class Point:
    x: int
    y: int


@env.task
def add(a: int, b: int = 1) -> int:
    return a + b


@env.task
def echo(text: str, times: int = 1) -> str:
    return text * times


@env.task
def scale(point: Point, factor: int) -> Point:
    return Point(point.x * factor, point.y * factor)


@env.task(retries=2)
def always_fails(message: str) -> None:
    raise ValueError(f"{message} on attempt {sw.ctx().attempt}")


@env.task(retries=5)
def refuses(message: str) -> None:
    raise sw.NonRetryableError(message)


@env.task(retries=3)
def killed_first(value: int) -> dict:
    context = sw.ctx()
    print(f"stdout of attempt {context.attempt}")
    print(f"stderr of attempt {context.attempt}", file=sys.stderr)
    if context.attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"value": value, "attempt": context.attempt, "run_id": context.run_id, "task": context.task_name}


@env.task(retries=1)
def exits_badly() -> int:
    os._exit(3)


@env.task(retries=1)
def exits_cleanly() -> int:
    sys.exit(0)


@env.task(retries=sw.RetryStrategy(count=2, backoff=sw.Backoff(base=0.4, factor=2.0, cap=0.6)))
def fails_twice() -> int:
    if sw.ctx().attempt < 2:
        raise RuntimeError("not yet")
    return sw.ctx().attempt


@env.task(env_vars={"FROM_TASK": "task"})
def environment() -> dict:
    return {key: os.environ.get(key) for key in ("FROM_ENV", "FROM_TASK", "FROM_OVERRIDE")}


@env.task
def calls_another(a: int) -> int:
    return add(a, b=10) * 2  # a task called inside a task is a plain function call


@env.task(retries=1)
def resumable(total: int) -> int:
    """Counts to ``total``, one step per attempt, keeping its count in the task checkpoint."""
    cp = sw.ctx().checkpoint
    previous = cp.load_object()
    count = (previous or {"count": 0})["count"] + 1
    cp.save_sync({"count": count, "attempt": sw.ctx().attempt})
    if count < total:
        raise RuntimeError(f"count {count} of {total}")
    return count


@env.task
def leaves_a_child(marker: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(marker, "w") as fh:
        fh.write(str(child.pid))
    os.kill(os.getpid(), signal.SIGKILL)


@env.task
def sleeps(marker: str) -> None:
    with open(marker, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(120)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling")


@env.task
def returns_unpicklable() -> object:
    return Unpicklable()


@env.task(retries=3)
def touches(marker: str) -> str:
    """Appends a line to ``marker`` each time it runs, so a test can count its executions."""
    with open(marker, "a") as fh:
        fh.write(f"attempt {sw.ctx().attempt}\n")
    return marker


# Flyte SDK task features: timeouts, errors, nested retries


@env.task(retries=1, timeout=1)
def sleeps_past_its_limit() -> None:
    time.sleep(60)


@env.task(retries=1, timeout=timedelta(seconds=6))  # room for a slow start of attempt 1 on a busy machine
def slow_first_attempt() -> int:
    if sw.ctx().attempt == 0:
        time.sleep(60)
    return sw.ctx().attempt_number


@env.task(retries=20, timeout=sw.Timeout(deadline=timedelta(seconds=3)))
def sleeps_past_the_deadline() -> None:
    time.sleep(60)


@env.task(retries=1, timeout=10)  # attempt 0 needs 30 s; attempt 1 (import torch, restore) much less
def trains_past_its_limit(steps: int) -> dict:
    """Attempt 0 is too slow and is stopped at its limit; SIGTERM makes the flash checkpointer save the
    step it reached, and attempt 1 resumes there."""
    import torch

    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=1000)
    state = {"w": torch.zeros(4)}
    start = flash.restore(state) or 0
    for step in range(start, steps):
        state["w"] += 1
        flash.maybe_save(step + 1, state)
        time.sleep(0.1 if context.attempt == 0 else 0.0)
    flash.close()
    return {"resumed_at": start, "w": state["w"].tolist(), "attempt": context.attempt}


@env.task(retries=2)
def oom_killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@env.task(retries=2, timeout=30)
def raises_recoverable_no_more() -> None:
    raise sw.NonRecoverableError("the input is wrong")


@env.task(retries=sw.RetryStrategy(2, backoff=sw.Backoff(base=timedelta(milliseconds=50))))
def flaky_nested(marker: str) -> int:
    """Fails twice (counted in a file), then returns how many calls it took."""
    path = Path(marker)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls < 3:
        raise ConnectionError(f"call {calls} failed")
    return calls


@env.task
def calls_a_flaky_task(marker: str) -> int:
    return flaky_nested(marker)


@env.task(retries=3)
def nested_refuses() -> None:
    raise sw.NonRetryableError("no retry helps")


@env.task
def calls_a_refusing_task() -> None:
    nested_refuses()


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=0.2))
def where_am_i() -> dict:
    context = sw.ctx()
    return {
        "node_rank": context.node_rank,
        "nnodes": context.nnodes,
        "local_world_size": context.local_world_size,
        "restart_attempt": context.restart_attempt,
        "attempt_number": context.attempt_number,
        "world_size": context.world_size,
    }


@env.task(retries=1)
def trains_and_is_killed(steps: int, killed_after: int) -> dict:
    """Saves every 5 steps to the flash tier; attempt 0 is killed (SIGKILL) after step ``killed_after``,
    attempt 1 resumes from flash and finishes."""
    import torch

    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=5)
    state = {"w": torch.zeros(1000)}
    start = flash.restore(state) or 0
    for step in range(start + 1, steps + 1):
        state["w"] += 1
        flash.maybe_save(step, state)
        if context.attempt == 0 and step == killed_after:
            time.sleep(FLUSH_WAIT)  # the events of the steps reached are written before the kill
            os.kill(os.getpid(), signal.SIGKILL)
    flash.close()
    return {"resumed_at": start, "w": float(state["w"][0])}


FLUSH_WAIT = 1.2  # > 2 x the event writer's interval
