"""What the flash fault-injection tests share: deterministic states, engines, and the child processes
they kill (started by a forkserver that imports this module once)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.flash.objects import HEADER_SIZE

JOB = "job"
N = 2_000_000  # float32 elements of "a": ~8 MB, two 4 MiB chunks
MiB = 2**20
LOGGER = "stalwart.flash"


# deterministic states


def state_of(step: int, n: int = N) -> dict[str, Any]:
    """The state a run holds at ``step``: every byte of it depends on the step."""
    return {"a": torch.full((n,), float(step)), "b": torch.arange(1000) * step, "meta": {"step": step}}


def blank(n: int = N) -> dict[str, Any]:
    """What a restarted process holds before restoring: the right shapes, none of the values."""
    return {
        "a": torch.full((n,), -1.0),
        "b": torch.full((1000,), -1, dtype=torch.int64),
        "meta": {"step": -1},
    }


def assert_state(got: dict[str, Any], step: int, n: int = N, where: str = "") -> None:
    expected = state_of(step, n)
    assert set(got) == set(expected), where
    for key in ("a", "b"):
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, where
        assert torch.equal(got[key], expected[key]), f"{where} tensor {key!r} is not step {step}'s"
    assert got["meta"] == {"step": step}, where


def assert_unchanged(got: dict[str, Any], before: dict[str, Any]) -> None:
    assert got.keys() == before.keys()
    assert torch.equal(got["a"], before["a"]) and torch.equal(got["b"], before["b"])
    assert got["meta"] == before["meta"]


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {"a": state["a"].clone(), "b": state["b"].clone(), "meta": dict(state["meta"])}


@contextlib.contextmanager
def engine_on(layout: FlashLayout, **kwargs: Any) -> Iterator[FlashEngine]:
    engine = FlashEngine(layout, **kwargs)
    try:
        yield engine
    finally:
        engine.close()


def restore(layout: FlashLayout, n: int = N, **kwargs: Any) -> tuple[int | None, dict[str, Any], str | None]:
    """A new process's restore: a fresh engine loads into a blank state."""
    state = blank(n)
    with engine_on(layout, **kwargs) as engine:
        step = engine.load(state)
        return step, state, engine.restored_from


# child processes


def mp_context() -> Any:
    """Forkserver children: torch and the flash engine are imported once, in the server; plain fork is
    unsafe once torch's OpenMP threads run in the parent."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stalwart.flash.engine", __name__])
    return ctx


def saver(root: str, blocking: bool, started: Any, attempted: Any, committed: Any, errfile: str) -> None:
    """Save steps 1, 2, 3... until killed; ``committed`` is the newest step known to be committed."""
    try:
        torch.set_num_threads(1)
        engine = FlashEngine(FlashLayout(root, JOB))
        started.set()
        step = 1
        while True:
            attempted.value = step
            engine.save(step, state_of(step), async_save=not blocking)
            # a non-blocking save returns once the previous step's background commit has finished
            committed.value = step if blocking else step - 1
            step += 1
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def holder(root: str, rank: int, started: Any, errfile: str) -> None:
    """Take a rank's lock, commit step 1 and sleep until killed."""
    try:
        engine = FlashEngine(FlashLayout(root, JOB), rank=rank)
        engine.save(1, state_of(1, 1000))
        started.set()
        time.sleep(600)
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def forking_holder(root: str, started: Any, grandchild: Any, errfile: str) -> None:
    """Take rank 0's lock, then fork a worker (as a DataLoader with the fork start method does)."""
    try:
        engine = FlashEngine(FlashLayout(root, JOB))
        engine.save(1, state_of(1, 1000))
        pid = os.fork()
        if pid == 0:  # the worker: it never touches the engine
            time.sleep(60)
            os._exit(0)
        grandchild.value = pid
        started.set()
        time.sleep(600)
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def rank_writer(root: str, rendezvous: str, rank: int, ready: Any, release: Any, errfile: str) -> None:
    """One rank of a two-rank job (gloo): commit step 1 and hold the rank until released."""
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
        engine = FlashEngine(FlashLayout(root, JOB), rank=rank, world_size=2)
        engine.save(1, state_of(1, 1000))
        dist.barrier()
        ready.set()
        assert release.wait(120)
        engine.close()
        dist.destroy_process_group()
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def load_after_truncation(root: str, errfile: str) -> None:
    """The engine that committed a step loads it again after the object was truncated under it."""
    try:
        layout = FlashLayout(root, JOB)
        engine = FlashEngine(layout)
        engine.save(1, state_of(1))
        engine.save(2, state_of(2))
        with open(layout.object_path(2, 0), "r+b") as fh:
            fh.truncate(HEADER_SIZE + 1000)
        state = blank()
        step = engine.load(state)
        assert step == 1, step
        assert_state(state, 1)
        # the truncated buffer must not be reused as if it were whole either
        assert engine.save(2, state_of(2))
        state = blank()
        assert engine.load(state) == 2
        assert_state(state, 2)
        engine.close()
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def child_error(errfile: Path) -> str:
    return errfile.read_text() if errfile.exists() else "(no traceback written)"


def kill(process: Any) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.join(30)
