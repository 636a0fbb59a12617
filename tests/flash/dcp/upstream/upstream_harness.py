"""What the adapted upstream DCP tests share: torch's own multi-process test base on CPU with gloo, and the
mapping of an upstream checkpoint directory onto a flash job.

Upstream runs most DCP storage tests in ``MultiProcessTestCase`` (a fresh group of processes per test).
Here the classes run in ``MultiProcContinuousTest`` (torch's base that starts the ranks once per class and
runs every test of the class in them, as upstream's ``DTensorContinuousTestBase`` tests do): a spawned rank
spends about 4 s importing torch's test utilities, so one group per test would not fit the time budget on
a 2-core machine. Changes to that base: after a failed test the ranks (which may be out of step, or
stuck in a collective) are replaced by fresh ones before the next test, where the base would skip the
rest of the class; ranks are joined within a deadline and killed after it, so a hung rank fails its test
instead of hanging the suite; a class whose ranks start processes (``dcp.async_save``'s process
executor) has non-daemonic ranks (``daemon_ranks``); and every rank ends when the test process does.

Where an upstream test gives DCP a directory (``checkpoint_id=path``, ``FileSystemWriter(path)``), the
adapted test uses the flash job ``JOB`` under that directory as its root, and a step as the checkpoint id.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import threading
import time
import unittest
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal import common_distributed
from torch.testing._internal.common_distributed import MultiProcContinuousTest
from torch.testing._internal.distributed._tensor.common_dtensor import DTensorContinuousTestBase

from stalwart import FlashStorageReader, FlashStorageWriter

# Importing torch's test utilities freezes torch.backends' flags (common_utils calls
# torch.backends.disable_global_flags()), and pytest imports every test module before it runs any test:
# every other test that sets a flag (Lightning's Trainer sets torch.backends.cudnn's) would then fail.
# Nothing here needs them frozen. (torch.backends is a module wrapper: the flag lives in the globals of
# its functions.)
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

JOB = "job"


@contextlib.contextmanager
def flash_writer(root: str, **kwargs: object) -> Iterator[FlashStorageWriter]:
    """A writer of the job ``JOB`` under ``root`` (an upstream test's checkpoint directory), closed after."""
    writer = FlashStorageWriter(JOB, root=root, **kwargs)  # type: ignore[arg-type]
    try:
        yield writer
    finally:
        writer.close()


def flash_reader(root: str, **kwargs: object) -> FlashStorageReader:
    return FlashStorageReader(JOB, root=root, **kwargs)  # type: ignore[arg-type]


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


class GlooContinuousTest(DTensorContinuousTestBase):
    """``world_size`` ranks on CPU with gloo, started once for the class (see the module docstring)."""

    world_size = 4
    timeout = timedelta(seconds=60)  # of each collective: a rank left behind fails the test, not the suite
    start_timeout = timedelta(seconds=180)  # for every rank to start (import torch) on a loaded machine
    test_timeout = 240  # seconds the main process waits for one test's result from each rank
    join_timeout = 60.0  # seconds the ranks get to leave at the end of the class
    daemon_ranks = True  # False where a rank starts processes (dcp.async_save's process executor)

    @property
    def device_type(self) -> str:  # DCP on CPU, even where an accelerator exists
        return "cpu"

    @classmethod
    def backend_str(cls) -> str:
        return "gloo"

    @classmethod
    def _init_pg(cls, rank: int, world_size: int, rdvz_file: str) -> None:
        """The base's, but the ranks first wait for each other with ``start_timeout`` (their start is
        slow and uneven under load): ``timeout`` then bounds only the collectives of the tests."""
        os.environ["LOCAL_RANK"] = str(rank)
        store = dist.FileStore(rdvz_file, world_size)
        store.set_timeout(cls.start_timeout)
        if store.add("ranks started", 1) == world_size:
            store.set("every rank started", "1")
        store.wait(["every rank started"])
        dist.init_process_group(
            backend=cls.backend_str(), world_size=world_size, rank=rank, store=store, timeout=cls.timeout
        )
        cls.pg = dist.distributed_c10d._get_default_group()

    def setUp(self) -> None:
        cls = type(self)
        if cls.poison_pill:  # the last test failed: its ranks may be out of step, start fresh ones
            cls._stop_ranks(timeout=10.0)
            cls.poison_pill = False
        common_distributed.TIMEOUT_OVERRIDE[self._testMethodName] = self.test_timeout
        super().setUp()

    @classmethod
    def _spawn_processes(cls, world_size: int) -> None:
        """The base's, with ``daemon_ranks`` (a daemonic process may not start children)."""
        ctx = multiprocessing.get_context("spawn")
        with tempfile.NamedTemporaryFile(delete=False) as rendezvous:
            cls.rdvz_file = rendezvous.name
        cls.processes, cls.task_queues, cls.completion_queues = [], [], []
        for rank in range(world_size):
            task_queue, completion_queue = ctx.Queue(), ctx.Queue()
            process = ctx.Process(
                target=cls._worker_loop,
                name=f"process {rank}",
                daemon=cls.daemon_ranks,
                args=(rank, world_size, cls.rdvz_file, task_queue, completion_queue),
            )
            process.start()
            cls.processes.append(process)
            cls.task_queues.append(task_queue)
            cls.completion_queues.append(completion_queue)

    @classmethod
    def _worker_loop(cls, *args: Any) -> None:
        """A rank: the base's loop, ended when the test process ends whatever becomes of it."""
        parent = multiprocessing.parent_process()
        if parent is not None:
            threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
        super()._worker_loop(*args)

    @classmethod
    def _stop_ranks(cls, timeout: float) -> list[int]:
        """Ask the ranks to leave, kill those still running after ``timeout`` s; the pids killed."""
        if not cls._processes_spawned:
            return []
        for task_queue in cls.task_queues:
            task_queue.put(None)
        deadline = time.monotonic() + timeout
        for process in cls.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [process.pid for process in cls.processes if process.is_alive()]
        for process in cls.processes:
            if process.is_alive():
                process.kill()
                process.join(10)
        with contextlib.suppress(OSError):
            os.remove(cls.rdvz_file)
        cls._processes_spawned = False
        return hung

    @classmethod
    def tearDownClass(cls) -> None:
        failed = cls.poison_pill
        hung = cls._stop_ranks(timeout=cls.join_timeout)
        super(MultiProcContinuousTest, cls).tearDownClass()  # past the base's join without a deadline
        if hung and not failed:
            raise unittest.TestCase.failureException(
                f"ranks {hung} of {cls.__name__} did not exit within {cls.join_timeout:.0f} s"
            )
