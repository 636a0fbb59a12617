"""Upstream contract: PyTorch's ``test/distributed/checkpoint/test_dtensor_resharding.py``, with
``FileSystemWriter`` / ``FileSystemReader`` swapped for ``FlashStorageWriter`` / ``FlashStorageReader``.

Upstream: pytorch/pytorch, test/distributed/checkpoint/test_dtensor_resharding.py at commit
0554fa805623c950ec6246323985320324459ab4 (the stored copy read; the installed torch 2.13.0+cpu is
cf30153c4c131c8164ee7798e5022d810682e2cb, of which no copy of this file could be had). The cases, the
placements and the assertions are upstream's; the code is written here against stalwart's adapters
(not a verbatim copy), with torch's installed test utilities.

Changed, and why:
- The checkpoint directory (``with_temp_dir``) is the root of the flash job ``JOB``; each save is a new
  flash step (``save_state_dict`` resets the writer without an id: the step after the newest) and each
  load reads the newest step (``load_state_dict`` resets the reader without an id).
- Upstream's two classes (placement change, mesh change) run in one group of four ranks on CPU with gloo
  (``upstream_harness``: one start for the class, to keep the suite fast); upstream runs them in
  ``DTensorTestBase`` with ``with_comms`` on four ranks (``NUM_DEVICES`` on CPU). ``skip_if_lt_x_gpu(2)``
  is dropped: nothing here needs a GPU.

Left out: nothing (upstream's "TODO: resharding when world size changes" has no test to adapt).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dist_cp
import upstream_harness as harness
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, zeros
from torch.testing._internal.common_utils import instantiate_parametrized_tests, parametrize
from torch.testing._internal.distributed.checkpoint_utils import with_temp_dir

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # upstream's deprecated *_state_dict calls

ONE_D_PLACEMENTS = [[Shard(0)], [Replicate()]]
ONE_D_TO_ONE_D_PLACEMENTS = [([Replicate()], [Shard(0)]), ([Shard(0)], [Replicate()])]
TWO_D_PLACEMENTS = [
    [Replicate(), Replicate()],
    [Replicate(), Shard(0)],
    [Shard(0), Replicate()],
    [Shard(0), Shard(0)],
]
TWO_D_TO_TWO_D_PLACEMENTS = [(p1, p2) for p1 in TWO_D_PLACEMENTS for p2 in TWO_D_PLACEMENTS if p1 != p2]


class TestDTensorReshard(harness.GlooContinuousTest):
    """Upstream ``TestDTensorReshardPlacementChange`` and ``TestDTensorReshardMeshChange``: DCP reshards a
    DTensor to other placements and to another mesh shape, with the world size unchanged."""

    world_size = 4

    def _save(self, state_dict: dict) -> None:
        with harness.flash_writer(self.temp_dir) as writer:
            dist_cp.save_state_dict(
                state_dict=state_dict, storage_writer=writer, planner=dist_cp.DefaultSavePlanner()
            )

    def _load(self, state_dict: dict) -> None:
        reader = harness.flash_reader(self.temp_dir)
        try:
            dist_cp.load_state_dict(
                state_dict=state_dict, storage_reader=reader, planner=dist_cp.DefaultLoadPlanner()
            )
        finally:
            reader.close()

    # TestDTensorReshardPlacementChange

    @parametrize("one_d_to_one_d_placements", ONE_D_TO_ONE_D_PLACEMENTS)
    @with_temp_dir
    def test_1d_to_1d_reshard_placement_change(self, one_d_to_one_d_placements) -> None:
        original_placement, new_placement = one_d_to_one_d_placements
        global_tensor = torch.arange(16, dtype=torch.float).view(4, 4)
        mesh = init_device_mesh(self.device_type, (self.world_size,))
        to_save = {"dtensor": distribute_tensor(global_tensor, mesh, placements=original_placement)}
        self._save(to_save)

        to_load = {"dtensor": zeros([4, 4], device_mesh=mesh, placements=new_placement)}
        self._load(to_load)

        # the whole tensor, then the original placement again
        whole = to_load["dtensor"].redistribute(mesh, placements=[Replicate()])
        self.assertEqual(global_tensor, whole.to_local())
        back = whole.redistribute(mesh, placements=original_placement)
        self.assertEqual(to_save["dtensor"].to_local(), back.to_local())

    @parametrize("two_d_to_two_d_placements", TWO_D_TO_TWO_D_PLACEMENTS)
    @with_temp_dir
    def test_2d_to_2d_reshard_placement_change(self, two_d_to_two_d_placements) -> None:
        original_placement, new_placement = two_d_to_two_d_placements
        global_tensor = torch.arange(16, dtype=torch.float).view(4, 4)
        mesh_2d = init_device_mesh(self.device_type, (2, self.world_size // 2))
        to_save = {"dtensor": distribute_tensor(global_tensor, mesh_2d, placements=original_placement)}
        self._save(to_save)

        to_load = {"dtensor": zeros([4, 4], device_mesh=mesh_2d, placements=new_placement)}
        self._load(to_load)

        whole = to_load["dtensor"].redistribute(mesh_2d, placements=[Replicate(), Replicate()])
        self.assertEqual(global_tensor, whole.to_local())
        back = whole.redistribute(mesh_2d, placements=original_placement)
        self.assertEqual(to_save["dtensor"].to_local(), back.to_local())

    # TestDTensorReshardMeshChange

    @with_temp_dir
    def test_1d_to_2d_reshard_mesh_change(self) -> None:
        for placements_1d in ONE_D_PLACEMENTS:
            global_tensor = torch.arange(16, dtype=torch.float).view(4, 4)
            mesh_1d = init_device_mesh(self.device_type, (self.world_size,))
            self._save({"dtensor": distribute_tensor(global_tensor, mesh_1d, placements=placements_1d)})

            for placements_2d in TWO_D_PLACEMENTS:
                mesh_2d = init_device_mesh(self.device_type, (2, self.world_size // 2))
                to_load = {"dtensor": zeros([4, 4], device_mesh=mesh_2d, placements=placements_2d)}
                self._load(to_load)
                whole = to_load["dtensor"].redistribute(mesh_2d, placements=[Replicate(), Replicate()])
                self.assertEqual(global_tensor, whole.to_local(), f"{placements_1d} -> {placements_2d}")

    @with_temp_dir
    def test_2d_to_1d_reshard_mesh_change(self) -> None:
        for placements_2d in TWO_D_PLACEMENTS:
            global_tensor = torch.arange(16, dtype=torch.float).view(4, 4)
            mesh_2d = init_device_mesh(self.device_type, (2, self.world_size // 2))
            self._save({"dtensor": distribute_tensor(global_tensor, mesh_2d, placements=placements_2d)})

            for placements_1d in ONE_D_PLACEMENTS:
                mesh_1d = init_device_mesh(self.device_type, (self.world_size,))
                to_load = {"dtensor": zeros([4, 4], device_mesh=mesh_1d, placements=placements_1d)}
                self._load(to_load)
                whole = to_load["dtensor"].redistribute(mesh_1d, placements=[Replicate()])
                self.assertEqual(global_tensor, whole.to_local(), f"{placements_2d} -> {placements_1d}")


instantiate_parametrized_tests(TestDTensorReshard)
