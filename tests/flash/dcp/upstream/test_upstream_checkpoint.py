"""Upstream contract: PyTorch's ``test/distributed/checkpoint/test_checkpoint.py`` (fault injection), with
its fake ``FaultyStorageWriter`` / ``FaultyStorageReader`` replaced by stalwart's ``FlashStorageWriter`` /
``FlashStorageReader`` with the same faults injected.

Upstream: pytorch/pytorch, test/distributed/checkpoint/test_checkpoint.py at commit
080bd5788d08c79988b0009f68858bf5a235d3d7 (the stored copy read; the installed torch 2.13.0+cpu is
cf30153c4c131c8164ee7798e5022d810682e2cb, of which no copy of this file could be had). The cases, the
stages and ranks that fail and the assertions are upstream's; the code is written here against
stalwart's adapters (not a verbatim copy), with torch's installed test utilities.

Changed, and why:
- Upstream's storage is a fake that stores nothing: every method only raises on the listed ranks. Here
  each method raises on the listed ranks at its start, as upstream's does, and otherwise runs the flash
  adapter's own method; ``*_async`` faults let the real write/read run, then fail its future. So the
  saves and loads are real, and each case also checks what upstream cannot: a save that failed on any
  rank at any stage never becomes the newest loadable step, the last good step still loads with its
  values, and a save after the failures works (a crash must leave the newest committed step loadable).
- The dummy cases load back what they saved and compare it (upstream's fake has nothing to load).
- Upstream instantiates these tests for accelerators only (``except_for="cpu"``, ``skip_if_lt_x_gpu``);
  nothing in them needs a device beyond a process group, so they run on CPU with gloo, four ranks, the
  sharded tensor placed on ``rank:r/cpu``.
- A directory given as the checkpoint path becomes the root of the flash job ``JOB``.

Left out, and why:
- ``TestDistributedCheckpointing`` (``test_tensor_metadata_with_missing_rank_spec``,
  ``test_default_metadata``) checks ``_create_default_local_metadata`` of the planner; no storage layer
  takes part, so there is nothing to swap.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import upstream_harness as harness
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from torch.distributed.checkpoint import CheckpointException, load_state_dict, save_state_dict
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.testing._internal.common_utils import TestCase, instantiate_parametrized_tests, parametrize
from torch.testing._internal.distributed.checkpoint_utils import with_temp_dir

from stalwart import FlashStorageReader, FlashStorageWriter

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",  # upstream uses the deprecated save_state_dict/load_state_dict and ShardedTensor
    "ignore:torch.distributed is disabled:UserWarning",
)


class _Faults:
    """Upstream's ``TestStorageBase``: a stage listed in ``fail_conf`` fails on the ranks listed for it."""

    def _set_faults(self, fail_conf: dict[str, Any]) -> None:
        self.fail_conf = fail_conf
        self.fault_rank = dist.get_rank() if dist.is_initialized() else 0

    def _fails(self, name: str) -> bool:
        return self.fault_rank in (self.fail_conf.get(name) or ())

    def _fail_rank(self, name: str) -> None:
        if self._fails(name):
            raise ValueError(f"rank fail {self.fault_rank} for {name}")

    def _fail_rank_async(self, name: str, future: Future) -> Future:
        """``future`` (of the real write or read, done) or, on a listed rank, a failed one."""
        if not self._fails(name):
            return future
        failed: Future = Future()
        failed.set_exception(ValueError(f"async rank fail {self.fault_rank} for {name}"))
        return failed


class FaultyFlashWriter(_Faults, FlashStorageWriter):
    def __init__(self, root: str, fail_conf: dict[str, Any]) -> None:
        FlashStorageWriter.__init__(self, harness.JOB, root=root)
        self._set_faults(fail_conf)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._fail_rank("fail_set_up_storage_writer")
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._fail_rank("fail_prepare_local_plan")
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._fail_rank("fail_prepare_global_plan")
        return super().prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._fail_rank("fail_write_data")
        return self._fail_rank_async("fail_write_data_async", super().write_data(plan, planner))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self._fail_rank("fail_finish")
        super().finish(metadata, results)


class FaultyFlashReader(_Faults, FlashStorageReader):
    def __init__(self, root: str, fail_conf: dict[str, Any]) -> None:
        FlashStorageReader.__init__(self, harness.JOB, root=root)
        self._set_faults(fail_conf)

    def read_metadata(self) -> Metadata:  # no **kwargs, as the flash reader's
        self._fail_rank("fail_read_metadata")
        return super().read_metadata()

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._fail_rank("fail_set_up_storage_reader")
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        self._fail_rank("fail_prepare_local_plan")
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        self._fail_rank("fail_prepare_global_plan")
        return super().prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self._fail_rank("fail_read_data")
        return self._fail_rank_async("fail_read_data_async", super().read_data(plan, planner))


def _local(value: Any) -> Any:
    """What of ``value`` this rank holds: its shards of a sharded tensor, else the value itself."""
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    return value


def _zeros_like(state: dict[str, Any], spec: ChunkShardingSpec | None) -> dict[str, Any]:
    """A state dict of the same structure as ``state`` with other values, to load into."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out[key] = sharded_tensor.zeros(spec, *value.size())
        elif isinstance(value, torch.Tensor):
            out[key] = torch.zeros_like(value)
        else:
            out[key] = [0]
    return out


class _FailureCases:
    """Upstream's ``TestDistributedFailure`` helpers, on the flash adapters; ``root`` is the flash root."""

    root: str
    spec: ChunkShardingSpec | None = None

    def _test_dist_failure(
        self: Any, callback: Callable[[], None], bad_ranks: list[int], ignore_exception_type: bool = False
    ) -> None:
        if not bad_ranks:  # nothing fails: it must work
            callback()
            return
        with self.assertRaises(CheckpointException) as cm:
            callback()
        failures = cm.exception.failures
        for rank, (error, _) in failures.items():
            self.assertIn(rank, bad_ranks, f"{rank} did not fail: {error!r}")
            if not ignore_exception_type:
                self.assertEqual(ValueError, type(error), str(error))
        for rank in bad_ranks:
            self.assertIn(rank, failures, f"{rank} was supposed to fail, was fine")

    def _test_save(
        self: Any, state_dict: dict[str, Any], coordinator: int = 0, **fail_conf: list[int]
    ) -> None:
        (bad_ranks,) = fail_conf.values() if fail_conf else ([],)
        writer = FaultyFlashWriter(self.root, fail_conf)

        def save() -> None:
            save_state_dict(
                state_dict,
                storage_writer=writer,
                coordinator_rank=coordinator,
                no_dist=not dist.is_initialized(),
            )

        try:
            self._test_dist_failure(save, bad_ranks)
        finally:
            writer.close()

    def _test_load(
        self: Any,
        state_dict: dict[str, Any],
        coordinator: int = 0,
        ignore_exception_type: bool = False,
        **fail_conf: list[int],
    ) -> None:
        (bad_ranks,) = fail_conf.values() if fail_conf else ([],)
        reader = FaultyFlashReader(self.root, fail_conf)

        def load() -> None:
            load_state_dict(
                state_dict,
                storage_reader=reader,
                coordinator_rank=coordinator,
                no_dist=not dist.is_initialized(),
            )

        try:
            self._test_dist_failure(load, bad_ranks, ignore_exception_type)
        finally:
            reader.close()

    # what upstream's fake storage cannot check

    def _save_good(self: Any, state_dict: dict[str, Any]) -> int:
        """Save ``state_dict`` with no fault; the step it became, which must be the newest loadable one."""
        with harness.flash_writer(self.root) as writer:
            save_state_dict(state_dict, storage_writer=writer, no_dist=not dist.is_initialized())
            step = writer.step
        self.assertIsNotNone(step)
        self._assert_newest(step, state_dict)
        return step

    def _assert_newest(self: Any, step: int, state_dict: dict[str, Any]) -> None:
        """``step`` is the newest loadable step and loads as ``state_dict``."""
        reader = harness.flash_reader(self.root)
        try:
            self.assertEqual(reader.latest_step(), step)
            target = _zeros_like(state_dict, self.spec)
            load_state_dict(target, storage_reader=reader, no_dist=not dist.is_initialized())
        finally:
            reader.close()
        for key, value in state_dict.items():
            self.assertEqual(_local(target[key]), _local(value), f"{key} of step {step}")

    def _save_error_handling(self: Any, state_dict: dict[str, Any], cases: list[dict[str, Any]]) -> None:
        good = self._save_good(state_dict)
        for case in cases:
            self._test_save(state_dict, **case)
            self._assert_newest(good, state_dict)  # the failed save is not a step to load
        self._save_good(state_dict)  # saving goes on after the failures


# one process, no process group


class TestDistributedFailureNoDist(_FailureCases, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self._dir = tempfile.TemporaryDirectory()
        self.root = self._dir.name

    def tearDown(self) -> None:
        self._dir.cleanup()
        super().tearDown()

    def test_save_error_handling_no_dist(self) -> None:
        state_dict = {"replicated": torch.rand(10, 10), "bytes": [1, 2, 3, 4]}
        self.assertFalse(dist.is_initialized())
        self._save_error_handling(
            state_dict,
            [
                {"fail_set_up_storage_writer": [0]},
                {"fail_finish": [0]},
                {"fail_prepare_global_plan": [0]},
                {"fail_prepare_local_plan": [0]},
                {"fail_write_data": [0]},
                {"fail_write_data_async": [0]},
            ],
        )

    def test_load_error_handling_no_dist(self) -> None:
        state_dict = {"replicated": torch.rand(10, 10), "bytes": [1, 2, 3, 4]}
        self._save_good(state_dict)
        self._test_load(state_dict)
        self._test_load(state_dict, fail_set_up_storage_reader=[0])
        self._test_load(state_dict, fail_read_metadata=[0], ignore_exception_type=True)
        self._test_load(state_dict, fail_prepare_local_plan=[0])
        self._test_load(state_dict, fail_prepare_global_plan=[0])
        self._test_load(state_dict, fail_read_data=[0])
        self._test_load(state_dict, fail_read_data_async=[0])


# four ranks, gloo


SAVE_CASES = [
    {"fail_set_up_storage_writer": [0]},
    {"fail_finish": [0]},
    {"fail_prepare_global_plan": [0]},
    {"fail_prepare_local_plan": [0]},
    {"fail_write_data": [2]},
    {"fail_write_data_async": [3]},
    {"coordinator": 1, "fail_set_up_storage_writer": [1]},
    {"coordinator": 1, "fail_finish": [1]},
]
LOAD_CASES = [
    {},
    {"fail_set_up_storage_reader": [0]},
    {"fail_prepare_global_plan": [0]},
    {"fail_read_metadata": [0], "ignore_exception_type": True},
    {"fail_prepare_local_plan": [1]},
    {"fail_read_data": [3]},
    {"fail_read_data_async": [1]},
    {"coordinator": 3, "fail_set_up_storage_reader": [0]},
    {"coordinator": 1, "fail_read_metadata": [3], "ignore_exception_type": True},
    {"coordinator": 2, "fail_read_data": [0]},
    {"coordinator": 3, "fail_read_data_async": [2]},
    {"coordinator": 1, "fail_prepare_global_plan": [1]},
]


def _case_name(case: dict[str, Any]) -> str:
    """``fail_write_data_2``, ``coordinator_1_fail_finish_1``, ``no_fault``."""
    parts = []
    for key, value in case.items():
        if key == "ignore_exception_type":
            continue
        parts.append(f"{key}_{'_'.join(map(str, value)) if isinstance(value, list) else value}")
    return "_".join(parts) or "no_fault"


class TestDistributedFailure(_FailureCases, harness.GlooContinuousTest):
    world_size = 4
    timeout = timedelta(seconds=15)  # a case that leaves ranks in a collective fails after this

    def get_spec(self) -> ChunkShardingSpec:
        return ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(dist.get_world_size())])

    def _state_dict(self) -> dict[str, Any]:
        self.spec = self.get_spec()
        return {
            "sharded": sharded_tensor.rand(self.spec, 20, 20),
            "replicated": torch.rand(10, 10),
            "bytes": [1, 2, 3, 4],
        }

    @with_temp_dir
    def test_dummy_writer_works(self) -> None:
        self.root = self.temp_dir
        state_dict = self._state_dict()
        writer = FaultyFlashWriter(self.root, {})
        try:
            save_state_dict(state_dict, writer)
            step = writer.step
        finally:
            writer.close()
        self._assert_newest(step, state_dict)

    @with_temp_dir
    def test_dummy_reader_works(self) -> None:
        self.root = self.temp_dir
        state_dict = self._state_dict()
        self._save_good(state_dict)
        target = _zeros_like(state_dict, self.spec)
        reader = FaultyFlashReader(self.root, {})
        try:
            load_state_dict(target, reader)
        finally:
            reader.close()
        for key, value in state_dict.items():
            self.assertEqual(_local(target[key]), _local(value), key)

    # upstream's test_save_error_handling / test_load_error_handling, one test per case (in upstream's
    # order) so that each case passes or fails on its own

    @parametrize("case", SAVE_CASES, name_fn=_case_name)
    @with_temp_dir
    def test_save_error_handling(self, case: dict[str, Any]) -> None:
        self.root = self.temp_dir
        self._save_error_handling(self._state_dict(), [case])

    @parametrize("case", LOAD_CASES, name_fn=_case_name)
    @with_temp_dir
    def test_load_error_handling(self, case: dict[str, Any]) -> None:
        self.root = self.temp_dir
        state_dict = self._state_dict()
        good = self._save_good(state_dict)
        self._test_load(state_dict, **case)
        self._assert_newest(good, state_dict)  # a failed load changes nothing stored


instantiate_parametrized_tests(TestDistributedFailure)
