"""Child processes of a test: started together, joined within one deadline, none left behind."""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Sequence
from typing import Any


def run_all(procs: Sequence[Any], timeout: float, what: str = "processes") -> None:
    """Start ``procs`` (multiprocessing processes), wait for all within ``timeout`` seconds, and kill any
    still running then (failing the test: a hung rank must not hang the suite)."""
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [proc.pid for proc in procs if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    assert not hung, f"{what} {hung} did not finish within {timeout:.0f} s"


def init_gloo(rank: int, world_size: int, port: int, timeout: float = 60) -> None:
    """Join a gloo process group of ``world_size`` ranks meeting at 127.0.0.1:``port``."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )


def sigkill_after_events() -> None:
    """SIGKILL this process once the events it recorded are on disk, so the steps it reached (and a
    failure throws away) are exact rather than up to half a second behind."""
    from stalwart.runtime import events

    recorder = events._get()
    assert recorder is not None, "no events recorder: not inside a stalwart task"
    recorder.flush()
    os.kill(os.getpid(), signal.SIGKILL)
