"""FlashStorageWriter across saves: who holds a rank and when, process groups that are not the whole
world, and saves without a checkpoint id.

A rank is owned by one process from its first save (its engine serves replicas to peers between saves)
until its writers close; writers of one job in one process share it and take turns. The multi-rank
cases run gloo over 127.0.0.1 in spawned processes (workers in ``dcp_workers``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
from pathlib import Path
from typing import Any

import dcp_workers
import pytest
import torch
import torch.distributed.checkpoint as dcp
from processes import run_all
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from stalwart import FlashStorageReader, FlashStorageWriter
from stalwart.flash.layout import FlashLayout, RankLockedError

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore::FutureWarning",
)


def _failure(exc: BaseException) -> BaseException:
    if isinstance(exc, CheckpointException):
        (inner, _), *_ = exc.failures.values()
        return inner
    return exc


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 128, generator=gen), "b": torch.arange(500, dtype=torch.int64) * seed}


def _loads(root: Path, step: int, want: dict[str, torch.Tensor]) -> None:
    target = _state(10_000)
    dcp.load(target, checkpoint_id=step, storage_reader=FlashStorageReader("job", root=root))
    for key, tensor in want.items():
        assert torch.equal(target[key], tensor), (step, key)


def _lock_is_free(root: Path, rank: int = 0) -> bool:
    try:
        FlashLayout(root, "job").lock(rank).release()
    except RankLockedError:
        return False
    return True


class _GatedPlanner(DefaultSavePlanner):
    """Holds the save inside ``write_data`` (at its first item) until the test lets it go."""

    def __init__(self, entered: threading.Event, go: threading.Event) -> None:
        super().__init__()
        self.entered, self.go = entered, go

    def resolve_data(self, write_item: Any) -> Any:
        self.entered.set()
        if not self.go.wait(120):
            raise TimeoutError("the test never let the gated save go on")
        return super().resolve_data(write_item)


class _FailingPlanner(DefaultSavePlanner):
    """The save fails inside ``write_data``, after the writer took its rank."""

    def resolve_data(self, write_item: Any) -> Any:
        raise OSError("simulated failure while reading the state")


# 13. who owns a rank


def test_writers_of_one_job_share_the_rank_in_one_process(tmp_path: Path) -> None:
    saved = {step: _state(step) for step in (1, 2, 3, 4)}
    first = FlashStorageWriter("job", root=tmp_path, keep=5)
    dcp.save(saved[1], checkpoint_id=1, storage_writer=first)
    assert not _lock_is_free(tmp_path), "between saves the rank stays owned (it serves its replicas)"
    second = FlashStorageWriter("job", root=tmp_path, keep=5)
    dcp.save(saved[2], checkpoint_id=2, storage_writer=second)
    dcp.save(saved[3], checkpoint_id=3, storage_writer=first)  # the first writer again
    third = FlashStorageWriter("job", root=tmp_path, keep=5)
    dcp.async_save(saved[4], checkpoint_id=4, storage_writer=third).result(timeout=60)
    for writer in (first, second):
        writer.close()
    assert not _lock_is_free(tmp_path), "the third writer still uses the rank"
    third.close()
    assert _lock_is_free(tmp_path), "the last writer to close lets the rank go"
    assert FlashStorageReader("job", root=tmp_path).latest_step() == 4
    for step, want in saved.items():
        _loads(tmp_path, step, want)


def test_a_writer_with_other_settings_is_refused_while_the_rank_is_in_use(tmp_path: Path) -> None:
    first = FlashStorageWriter("job", root=tmp_path, keep=2)
    try:
        dcp.save(_state(1), checkpoint_id=1, storage_writer=first)
        with pytest.raises(CheckpointException) as info:
            dcp.save(
                _state(2), checkpoint_id=2, storage_writer=FlashStorageWriter("job", root=tmp_path, keep=3)
            )
        assert "already saved in this process by a writer with other settings" in str(_failure(info.value))
    finally:
        first.close()


def test_two_writers_saving_the_same_rank_at_once_are_refused(tmp_path: Path) -> None:
    entered, go = threading.Event(), threading.Event()
    first, second = FlashStorageWriter("job", root=tmp_path), FlashStorageWriter("job", root=tmp_path)
    outcome: dict[str, BaseException | None] = {}

    def save_first() -> None:
        try:
            dcp.save(_state(1), checkpoint_id=1, storage_writer=first, planner=_GatedPlanner(entered, go))
            outcome["first"] = None
        except BaseException as exc:
            outcome["first"] = exc

    thread = threading.Thread(target=save_first)
    thread.start()
    try:
        assert entered.wait(60), "the first save never reached write_data"
        assert not _lock_is_free(tmp_path), "a writer in the middle of a save must hold its rank's lock"
        with pytest.raises(CheckpointException) as info:  # the same rank, the same process, at once
            dcp.save(_state(2), checkpoint_id=2, storage_writer=second)
        error = _failure(info.value)
        assert isinstance(error, RankLockedError), repr(error)
        assert f"pid {os.getpid()}" in str(error)
    finally:
        go.set()
        thread.join(120)
    assert not thread.is_alive() and outcome["first"] is None, outcome
    dcp.save(_state(2), checkpoint_id=2, storage_writer=second)  # now it is its turn
    _loads(tmp_path, 1, _state(1))
    _loads(tmp_path, 2, _state(2))
    first.close()
    second.close()


def test_a_save_that_fails_midway_leaves_nothing_and_the_rank_usable(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path)
    dcp.save(_state(1), checkpoint_id=1, storage_writer=writer)
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2), checkpoint_id=2, storage_writer=writer, planner=_FailingPlanner())
    assert "simulated failure" in str(_failure(info.value))
    assert not writer.step_dir(2).exists()
    other = FlashStorageWriter("job", root=tmp_path)
    dcp.save(_state(2), checkpoint_id=2, storage_writer=other)
    dcp.save(_state(3), checkpoint_id=3, storage_writer=writer)
    _loads(tmp_path, 2, _state(2))
    _loads(tmp_path, 3, _state(3))
    writer.close()
    other.close()
    assert _lock_is_free(tmp_path)


def test_a_writer_reuses_its_buffers_from_save_to_save(tmp_path: Path) -> None:
    """keep=1: the object of step 1 goes back to the pool when step 2 is loadable; step 3 is written
    into that same tmpfs file (its pages were allocated once), although no lock is held in between."""
    writer = FlashStorageWriter("job", root=tmp_path, keep=1)
    dcp.save(_state(1), checkpoint_id=1, storage_writer=writer)
    first_inode = (writer.step_dir(1) / "rank-00000.obj").stat().st_ino
    dcp.save(_state(2), checkpoint_id=2, storage_writer=writer)
    dcp.save(_state(3), checkpoint_id=3, storage_writer=writer)
    assert (writer.step_dir(3) / "rank-00000.obj").stat().st_ino == first_inode
    _loads(tmp_path, 3, _state(3))
    writer.close()
    assert not list((tmp_path / "job" / "pool" / "rank-00000").glob("buf-*")), "close() frees the pool"


# 14. saves without a checkpoint id, and process groups


def test_a_save_without_checkpoint_id_takes_the_step_after_the_newest(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    first, second, third = _state(1), _state(2), _state(3)
    dcp.save_state_dict(first, storage_writer=writer, no_dist=True)  # DCP calls writer.reset()
    assert writer.step == 0
    dcp.save(second, checkpoint_id=writer.step_dir(7), storage_writer=writer)
    dcp.save(third, storage_writer=writer)  # no checkpoint id: no reset at all
    assert writer.step == 8
    assert FlashStorageReader("job", root=tmp_path).latest_step() == 8
    for step, want in ((0, first), (7, second), (8, third)):
        _loads(tmp_path, step, want)
    fresh = FlashStorageWriter("job", root=tmp_path, keep=5)  # a new writer continues the job
    dcp.save_state_dict(_state(4), storage_writer=fresh, no_dist=True)
    assert fresh.step == 9
    _loads(tmp_path, 9, _state(4))


def test_saves_with_dcp_plan_caching_write_their_own_steps(tmp_path: Path) -> None:
    """With plan caching DCP hands a rank the final plan of the previous save when nothing changed: the
    step must not travel in it."""
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    saved = {}
    for step in (1, 2, None, None):  # explicit ids, then the next step twice
        state = _state(len(saved) + 1)
        planner = DefaultSavePlanner(enable_plan_caching=True)
        if step is None:
            dcp.save(state, storage_writer=writer, planner=planner)
        else:
            dcp.save(state, checkpoint_id=step, storage_writer=writer, planner=planner)
        saved[writer.step] = state
    assert sorted(saved) == [1, 2, 3, 4]
    for step, want in saved.items():
        _loads(tmp_path, step, want)


# multi-rank cases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(target: Any, world: int, root: Path, out: Path, timeout: float = 180) -> dict[int, dict]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=target, args=(rank, world, port, str(root), str(out)), daemon=True)
        for rank in range(world)
    ]
    run_all(procs, timeout, "rank processes")
    results = {}
    for rank in range(world):
        path = out / f"result-{rank}.json"
        assert path.exists(), f"rank {rank} reported nothing (exit code {procs[rank].exitcode})"
        results[rank] = json.loads(path.read_text())
    failed = {rank: r.get("error") for rank, r in results.items() if not r["ok"]}
    assert not failed, "\n".join(f"rank {rank} failed:\n{error}" for rank, error in failed.items())
    return results


def test_a_save_failing_on_another_rank_leaves_the_coordinator_able_to_save(tmp_path: Path) -> None:
    """Rank 1 fails in write_data, so the coordinator never gets finish(); new writers of the job then
    save on both ranks, and once they close no rank's lock is held."""
    root, out = tmp_path / "flash", tmp_path / "out"
    out.mkdir()
    results = _run_ranks(dcp_workers.failed_save_then_new_writers, 2, root, out)
    for rank, result in results.items():
        assert "simulated failure on rank 1" in result["first_error"], (rank, result)
        assert result["lock_free_after_close"] is True, rank
        assert result["latest_step"] == 2 and result["loaded"] is True, (rank, result)
        assert "the ranks name different flash steps (3, 4)" in result["mixed_error"], result
        assert result["steps_after"][-1] == 2, result  # nothing of step 3 or 4 was written


def test_subgroup_and_no_dist_saves_record_their_own_world(tmp_path: Path) -> None:
    """World of 3: ranks 1 and 2 save through a subgroup (their group ranks 0 and 1), rank 2 alone with
    no_dist=True; each step is complete in the world that saved it and loads back."""
    root, out = tmp_path / "flash", tmp_path / "out"
    out.mkdir()
    results = _run_ranks(dcp_workers.subgroup_and_no_dist, 3, root, out)
    for rank in (1, 2):
        result = results[rank]
        assert result["group_latest_step"] == 5, result
        assert result["group_loaded"] is True, result
    assert results[2]["solo_latest_step"] == 3 and results[2]["solo_loaded"] is True
    assert "use_collectives" in results[1]["no_collectives_error"]
    group_commits = {
        p.name: json.loads(p.read_text())["world_size"]
        for p in (root / "group" / "steps" / f"step-{5:012d}").glob("*.commit")
    }
    assert group_commits == {"rank-00000.commit": 2, "rank-00001.commit": 2}
    solo_commits = {
        p.name: json.loads(p.read_text())["world_size"]
        for p in (root / "solo" / "steps" / f"step-{3:012d}").glob("*.commit")
    }
    assert solo_commits == {"rank-00000.commit": 1}


def test_a_rank_failing_inside_dcp_is_reported_by_dcp_on_two_nodes(tmp_path: Path) -> None:
    """No collective of the adapter's own runs inside DCP's steps: the writers' engines are formed from
    what DCP's plans carry, and a load's ranks survey each other's nodes through their servers. So a
    rank that fails before its first write_data, or before read_metadata, is reported by DCP on every
    rank (a collective there left the others waiting in it until the group's timeout), and the job
    saves, replicates to the other node and loads afterwards, with the same writers and new ones."""
    root, out = tmp_path / "flash", tmp_path / "out"
    out.mkdir()
    results = _run_ranks(dcp_workers.a_rank_failing_before_write_data_on_two_nodes, 2, root, out)
    for rank, result in results.items():
        assert result["first_failures"] == [1], (rank, result)
        assert "simulated failure on rank 1 before write_data" in result["first_error"], result
        assert result["loaded"] == {"2": True, "3": True}, (rank, result)
        assert result["replica_of_other"] == {"2": True, "3": True}, (rank, result)
        assert result["faulty_load_failures"] == [1], (rank, result)
        assert result["after_faults_loaded"] is True, (rank, result)
    # node 1 read rank 0's object from node 0 (its survey asked node 0's server what it holds)
    assert results[1]["restored_from"] == {"0": "peer", "1": "flash"}, results[1]
    assert results[0]["restored_from"] == {"0": "flash"}, results[0]
