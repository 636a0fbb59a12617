"""Worker functions for the multi-process DCP tests (importable by ``spawn`` children)."""

from __future__ import annotations

import json
import os
import traceback
import warnings
from pathlib import Path

from processes import init_gloo


def _model():
    import torch

    torch.manual_seed(0)  # the same on every rank: a replicated model
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _fresh_model_state() -> dict:
    import torch

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return model.state_dict()


def save_and_load_two_ranks(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Save a replicated model plus a per-rank entry at steps 10 (dcp.save) and 11 (dcp.async_save),
    then load both into fresh tensors; write what was checked to ``out/result-<rank>.json``."""
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from stalwart import FlashStorageReader, FlashStorageWriter

    result: dict = {"rank": rank, "ok": False}
    try:
        init_gloo(rank, world_size, port)
        model = _model()
        key = f"rank{rank}"
        expected = {
            10: {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                key: torch.full((100,), rank),
            }
        }
        writer = FlashStorageWriter("job", root=root)
        try:
            dcp.save(
                {"model": model.state_dict(), key: torch.full((100,), rank)},
                checkpoint_id=writer.step_dir(10),
                storage_writer=writer,
            )
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-2.0).add_(0.5)  # the same on both ranks: still replicated
            entry = torch.full((100,), 1000 + rank)
            expected[11] = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                key: entry.clone(),
            }
            future = dcp.async_save(
                {"model": model.state_dict(), key: entry},
                checkpoint_id=writer.step_dir(11),
                storage_writer=writer,
            )
            future.result(timeout=60)
        finally:
            writer.close()
        dist.barrier()

        reader = FlashStorageReader("job", root=root)
        result["latest_step"] = reader.latest_step()
        checks: dict[str, bool] = {}
        for step, checkpoint_id in ((10, 10), (11, reader.step_dir(11))):
            target = {"model": _fresh_model_state(), key: torch.full((100,), -7)}
            dcp.load(target, checkpoint_id=checkpoint_id, storage_reader=reader)
            for name, want in expected[step]["model"].items():
                got = target["model"][name]
                checks[f"{step}/model.{name}"] = bool(got.dtype == want.dtype and torch.equal(got, want))
            got = target[key]
            want = expected[step][key]
            checks[f"{step}/{key}"] = bool(got.dtype == want.dtype and torch.equal(got, want))
        result["checks"] = checks
        # which ranks' objects hold the items of step 11 (DCP spreads replicated items over ranks)
        metadata = reader.read_metadata()
        result["item_ranks"] = sorted({item.rank for item in metadata.storage_data.values()})
        dist.barrier()
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        Path(out, f"result-{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0 if result["ok"] else 1)  # no lingering threads keep the child alive


def _finish(rank: int, out: str, result: dict) -> None:
    import torch.distributed as dist

    Path(out, f"result-{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0 if result["ok"] else 1)  # no lingering threads keep the child alive


def _lock_is_free(root: str, job: str, rank: int) -> bool:
    from stalwart.flash.layout import FlashLayout, RankLockedError

    try:
        FlashLayout(root, job).lock(rank).release()
    except RankLockedError:
        return False
    return True


def failed_save_then_new_writers(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Step 1 fails on rank 1 inside write_data (so the coordinator never gets finish); new writers then
    save step 2 on both ranks. Records whether each rank's lock is free after each save."""
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from stalwart import FlashStorageReader, FlashStorageWriter

    class FailingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            raise OSError("simulated failure on rank 1")

    result: dict = {"rank": rank, "ok": False}
    try:
        init_gloo(rank, world_size, port)
        key = f"rank{rank}"
        first = FlashStorageWriter("job", root=root)
        try:
            dcp.save(
                {key: torch.full((1000,), rank)},
                checkpoint_id=1,
                storage_writer=first,
                planner=FailingPlanner() if rank == 1 else None,
            )
            result["first_error"] = "no error"
        except CheckpointException as exc:
            result["first_error"] = str(exc)
        dist.barrier()
        state = {"shared": torch.arange(4000.0) * 3, key: torch.full((1000,), 10 + rank)}
        second = FlashStorageWriter("job", root=root)
        dcp.save(state, checkpoint_id=2, storage_writer=second)
        dist.barrier()
        reader = FlashStorageReader("job", root=root)
        result["latest_step"] = reader.latest_step()
        target = {"shared": torch.zeros(4000), key: torch.zeros(1000, dtype=torch.int64)}
        dcp.load(target, checkpoint_id=2, storage_reader=reader)
        result["loaded"] = all(torch.equal(target[k], state[k]) for k in state)
        try:  # the ranks disagree on the step: refused before anything is written
            dcp.save(state, checkpoint_id=3 + rank, storage_writer=second)
            result["mixed_error"] = "no error"
        except CheckpointException as exc:
            result["mixed_error"] = str(exc)
        result["steps_after"] = FlashStorageReader("job", root=root).layout.steps()
        dist.barrier()
        first.close()
        second.close()
        result["lock_free_after_close"] = _lock_is_free(root, "job", rank)
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        _finish(rank, out, result)


def subgroup_and_no_dist(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """World of 3: ranks 1 and 2 save job "group" through a subgroup, rank 2 saves job "solo" alone with
    no_dist=True, rank 1 tries use_collectives=False on job "nocoll"."""
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from stalwart import FlashStorageReader, FlashStorageWriter

    result: dict = {"rank": rank, "ok": False}
    try:
        init_gloo(rank, world_size, port)
        group = dist.new_group([1, 2])  # every rank takes part in creating it
        if rank in (1, 2):
            key = f"rank{rank}"
            state = {"shared": torch.arange(3000.0) * 7, key: torch.full((500,), rank)}
            writer = FlashStorageWriter("group", root=root, process_group=group)
            dcp.save(state, checkpoint_id=5, storage_writer=writer, process_group=group)
            dist.barrier(group)
            reader = FlashStorageReader("group", root=root, process_group=group)
            result["group_latest_step"] = reader.latest_step()
            target = {"shared": torch.zeros(3000), key: torch.zeros(500, dtype=torch.int64)}
            dcp.load(target, checkpoint_id=5, storage_reader=reader, process_group=group)
            result["group_loaded"] = all(torch.equal(target[k], state[k]) for k in state)
        dist.barrier()
        if rank == 2:
            state = {"solo": torch.linspace(0, 1, 700)}
            writer = FlashStorageWriter("solo", root=root)
            dcp.save(state, checkpoint_id=3, storage_writer=writer, no_dist=True)
            reader = FlashStorageReader("solo", root=root, no_dist=True)
            result["solo_latest_step"] = reader.latest_step()
            target = {"solo": torch.zeros(700)}
            dcp.load(target, checkpoint_id=3, storage_reader=reader, no_dist=True)
            result["solo_loaded"] = torch.equal(target["solo"], state["solo"])
        if rank == 1:
            try:
                dcp.save(
                    {"x": torch.ones(10)},
                    checkpoint_id=1,
                    storage_writer=FlashStorageWriter("nocoll", root=root),
                    use_collectives=False,
                )
                result["no_collectives_error"] = "no error"
            except Exception as exc:
                result["no_collectives_error"] = str(exc)
        dist.barrier()
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        _finish(rank, out, result)


def a_rank_failing_before_write_data_on_two_nodes(
    rank: int, world_size: int, port: int, root: str, out: str
) -> None:
    """Each rank its own node and flash root. Step 1 fails on rank 1 before its writer's first
    write_data (the planner's finish_plan raises), so rank 1 never opens its engine while rank 0 does;
    steps 2 (the same writers) and 3 (new writers, after closing) must save, replicate and load. Then a
    load fails on rank 1 before its reader's read_metadata, and node 1 loses its replica of rank 0's
    object: the next load finds it on node 0."""
    os.environ["STALWART_NODE"] = f"node{rank}"
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from stalwart import FlashStorageReader, FlashStorageWriter

    class FailingPlanner(DefaultSavePlanner):
        def finish_plan(self, new_plan):
            raise ValueError("simulated failure on rank 1 before write_data")

    mine = str(Path(root, f"node{rank}"))
    result: dict = {"rank": rank, "ok": False}
    try:
        init_gloo(rank, world_size, port, timeout=60)  # a rank left in a collective fails after this
        key = f"rank{rank}"
        writer = FlashStorageWriter("job", root=mine)
        try:
            dcp.save(
                {key: torch.full((1000,), rank)},
                checkpoint_id=1,
                storage_writer=writer,
                planner=FailingPlanner() if rank == 1 else None,
            )
            result["first_failures"] = "no error"
        except CheckpointException as exc:
            result["first_failures"] = sorted(exc.failures)
            result["first_error"] = str(exc)
        loaded = {}
        for step in (2, 3):
            if step == 3:
                writer.close()
                writer = FlashStorageWriter("job", root=mine)
            state = {"shared": torch.arange(4000.0) * step, key: torch.full((1000,), 10 * step + rank)}
            dcp.save(state, checkpoint_id=step, storage_writer=writer)
            writer.wait()  # this rank's replica is on the other node
            dist.barrier()
            reader = FlashStorageReader("job", root=mine)
            target = {"shared": torch.zeros(4000), key: torch.zeros(1000, dtype=torch.int64)}
            dcp.load(target, checkpoint_id=step, storage_reader=reader)
            dist.barrier()  # the other node may pull from this one until every load is over
            reader.close()
            loaded[step] = all(torch.equal(target[k], state[k]) for k in state)
        result["loaded"] = loaded
        other = 1 - rank
        result["replica_of_other"] = {
            step: Path(mine, "job", "steps", f"step-{step:012d}", f"rank-{other:05d}.commit").exists()
            for step in (2, 3)
        }
        dist.barrier()

        class FaultyReader(FlashStorageReader):
            def read_metadata(self):
                if rank == 1:
                    raise ValueError("simulated failure on rank 1 before read_metadata")
                return super().read_metadata()

        target = {"shared": torch.zeros(4000), key: torch.zeros(1000, dtype=torch.int64)}
        faulty = FaultyReader("job", root=mine)
        try:
            dcp.load(target, checkpoint_id=3, storage_reader=faulty)
            result["faulty_load_failures"] = "no error"
        except CheckpointException as exc:
            result["faulty_load_failures"] = sorted(exc.failures)
        dist.barrier()
        faulty.close()
        if rank == 1:  # node 1 loses its replica of rank 0's object: the load must find it on node 0
            step_dir = Path(mine, "job", "steps", f"step-{3:012d}")
            (step_dir / "rank-00000.commit").unlink()
            (step_dir / "rank-00000.obj").unlink()
        dist.barrier()
        reader = FlashStorageReader("job", root=mine)
        dcp.load(target, checkpoint_id=3, storage_reader=reader)
        dist.barrier()
        reader.close()
        result["after_faults_loaded"] = all(torch.equal(target[k], state[k]) for k in state)
        result["restored_from"] = reader.restored_from
        writer.close()
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        _finish(rank, out, result)
