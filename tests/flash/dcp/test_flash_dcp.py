"""The torch.distributed.checkpoint adapter of the flash tier: FlashStorageWriter / FlashStorageReader.

Every save goes through real ``dcp.save`` / ``dcp.async_save`` and every load through ``dcp.load``;
the two-rank test runs gloo over 127.0.0.1 in spawned processes.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import pickle
import re
import socket
from pathlib import Path
from typing import Any

import dcp_workers
import pytest
import torch
import torch.distributed.checkpoint as dcp
from processes import run_all
from torch.distributed.checkpoint.api import CheckpointException

from stalwart import FlashRestoreError, FlashSpaceError, FlashStorageReader, FlashStorageWriter
from stalwart.flash.objects import HEADER_SIZE, PACKED_HEADER_SIZE, Header

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore::FutureWarning",
)

OBJ, COMMIT = "rank-00000.obj", "rank-00000.commit"


# helpers


def _failure(exc: BaseException) -> BaseException:
    """The error a rank raised: DCP wraps errors of its plan/write/read steps in a CheckpointException
    (a BaseException) holding ``{rank: (exception, traceback)}``."""
    if isinstance(exc, CheckpointException):
        (inner, _), *_ = exc.failures.values()
        return inner
    return exc


def _make_state(seed: int) -> tuple[dict, torch.nn.Module]:
    """A model state dict, an Adam state dict after one step, odd dtypes, non-contiguous views and
    plain values; every value depends on ``seed``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    optim = torch.optim.Adam(
        model.parameters(), lr=1e-3 * (seed + 1), betas=(0.9 - 0.1 * seed, 0.999), weight_decay=0.01 * seed
    )
    model(torch.randn(8, 16, generator=gen)).square().sum().backward()
    optim.step()
    base = torch.randn(6, 10, generator=gen)
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "i64": torch.randint(-(2**62), 2**62, (33,), generator=gen, dtype=torch.int64),
        "flags": torch.rand(17, generator=gen) > 0.5,
        "transposed": base.t(),  # non-contiguous, not square: a raw copy of its storage would differ
        "strided": base[:, ::3],
        "scalar": torch.tensor(float(seed) + 0.25),
        "epoch": 3 + seed,
        "name": f"run-{seed}",
        "cfg": {"layers": [16, 32, 4 + seed], "tags": ["a", {"deep": [1, 2, seed]}], "ratio": 0.5 + seed},
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    return state, model


def _assert_same(got: Any, want: Any, path: str = "state") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert torch.equal(got, want), path
        # bit-exact, not just equal as numbers (-0.0 == 0.0)
        as_bytes = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
        assert torch.equal(as_bytes(got), as_bytes(want)), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, set(got) ^ set(want))
        for key in want:
            _assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, (path, got, want)


def _tensor_state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 48, generator=gen), "b": torch.arange(300, dtype=torch.int64) * seed}


def _save_steps(tmp_path: Path, steps: list[int], *, keep: int = 2) -> dict[int, dict]:
    saved = {}
    writer = FlashStorageWriter("job", root=tmp_path, keep=keep)
    try:
        for step in steps:
            saved[step] = _tensor_state(step)
            dcp.save(saved[step], checkpoint_id=step, storage_writer=writer)
    finally:
        writer.close()
    return saved


def _step_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "job" / "steps").iterdir())


# 1. world size 1


def test_save_async_save_load_round_trip_bit_exact(tmp_path: Path) -> None:
    first, _ = _make_state(0)
    second, _ = _make_state(2)
    want_first, want_second = copy.deepcopy(first), copy.deepcopy(second)

    writer = FlashStorageWriter("job", root=tmp_path)
    try:
        dcp.save(first, checkpoint_id=writer.step_dir(10), storage_writer=writer)
        dcp.async_save(second, checkpoint_id=writer.step_dir(11), storage_writer=writer).result(timeout=60)
    finally:
        writer.close()
    for step in (10, 11):
        # the global metadata rides in the coordinator's object: nothing else to keep in step
        assert sorted(p.name for p in (tmp_path / "job" / "steps" / f"step-{step:012d}").iterdir()) == [
            COMMIT,
            OBJ,
        ]

    reader = FlashStorageReader("job", root=tmp_path)
    assert reader.latest_step() == 11
    for checkpoint_id, want in ((10, want_first), (reader.step_dir(11), want_second)):
        target, model = _make_state(1)  # different values everywhere, the same structure
        with pytest.raises(AssertionError):
            _assert_same(target, want)  # the fresh target really differs
        dcp.load(target, checkpoint_id=checkpoint_id, storage_reader=reader)
        _assert_same(target, want)
        _assert_same(model.state_dict(), want["model"])  # loaded in place into the model's tensors


# 2. world size 2 (gloo over loopback, spawned processes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_gloo_save_async_save_load(tmp_path: Path) -> None:
    root, out = tmp_path / "flash", tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=dcp_workers.save_and_load_two_ranks, args=(rank, 2, port, str(root), str(out)), daemon=True
        )
        for rank in range(2)
    ]
    run_all(procs, 120, "rank processes")

    results = {}
    for rank in range(2):
        path = out / f"result-{rank}.json"
        assert path.exists(), f"rank {rank} reported nothing (exit code {procs[rank].exitcode})"
        results[rank] = json.loads(path.read_text())
    for rank, result in results.items():
        assert result["ok"], f"rank {rank} failed:\n{result.get('error')}"
        assert procs[rank].exitcode == 0
        assert result["latest_step"] == 11
        checks = result["checks"]
        assert any(k.startswith("10/model.") for k in checks) and f"11/rank{rank}" in checks
        assert all(checks.values()), {k: v for k, v in checks.items() if not v}
        assert result["item_ranks"] == [0, 1]  # each rank's object holds items of the step
    for step in (10, 11):
        names = sorted(p.name for p in (root / "job" / "steps" / f"step-{step:012d}").iterdir())
        assert names == [
            "rank-00000.commit",
            "rank-00000.obj",
            "rank-00001.commit",
            "rank-00001.obj",
        ]


# 3. latest_step and unfinished saves


def test_latest_step_needs_every_rank_including_the_coordinator(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2, 3], keep=5)
    reader = FlashStorageReader("job", root=tmp_path)
    assert reader.latest_step() == 3

    (reader.step_dir(3) / COMMIT).unlink()  # the coordinator (it carries the metadata) never committed
    assert reader.latest_step() == 2

    commit = reader.step_dir(2) / COMMIT  # step 2 now claims a world of 2: rank 1 never committed
    record = json.loads(commit.read_text())
    commit.write_text(json.dumps({**record, "world_size": 2}))
    assert reader.latest_step() == 1
    assert reader.steps() == {1: 1}

    fresh = FlashStorageReader("job", root=tmp_path)  # no checkpoint_id: the latest loadable step
    target = _tensor_state(99)
    dcp.load(target, storage_reader=fresh)
    _assert_same(target, saved[1])


def test_loading_a_step_whose_save_did_not_finish_names_the_complete_ones(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2], keep=5)
    reader = FlashStorageReader("job", root=tmp_path)
    (reader.step_dir(2) / COMMIT).unlink()
    target = _tensor_state(99)
    before = copy.deepcopy(target)
    with pytest.raises(BaseException) as info:  # DCP wraps it: CheckpointException
        dcp.load(target, checkpoint_id=reader.step_dir(2), storage_reader=reader)
    error = _failure(info.value)  # DCP turns what read_metadata raises into an AssertionError naming it
    assert "flash step 2 of job 'job' is not complete on any node" in str(error)
    assert "complete steps: 1" in str(error)
    _assert_same(target, before)


def test_a_reused_reader_without_checkpoint_id_loads_the_latest_step(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    reader = FlashStorageReader("job", root=tmp_path)
    try:
        for step in (1, 2):
            saved = _tensor_state(step)
            dcp.save(saved, checkpoint_id=step, storage_writer=writer)
            target = _tensor_state(99)
            dcp.load(target, storage_reader=reader)
            _assert_same(target, saved)
    finally:
        writer.close()


# 4. corruption


def test_flipped_data_byte_fails_the_load_and_fills_nothing(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2])
    reader = FlashStorageReader("job", root=tmp_path)
    path = reader.step_dir(2) / OBJ
    with open(path, "r+b") as fh:
        header = Header.unpack(fh.read(PACKED_HEADER_SIZE), where=str(path))
        offset = HEADER_SIZE + header.data_size // 2
        assert offset > 4096
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))

    target = {k: torch.full_like(v, -3) for k, v in saved[2].items()}
    before = copy.deepcopy(target)
    with pytest.raises(BaseException) as info:  # a CheckpointException
        dcp.load(target, checkpoint_id=2, storage_reader=reader)
    error = _failure(info.value)  # found verifying the coordinator's object, which holds the metadata
    assert "data checksum mismatch" in str(error) and str(path) in str(error)
    _assert_same(target, before)  # nothing copied from the corrupt object

    dcp.load(target, checkpoint_id=1, storage_reader=reader)  # the older step is intact
    _assert_same(target, saved[1])


def test_flipped_metadata_byte_fails_the_load(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    reader = FlashStorageReader("job", root=tmp_path)
    path = reader.step_dir(1) / OBJ  # the global metadata is in the coordinator's meta region
    with open(path, "r+b") as fh:
        header = Header.unpack(fh.read(PACKED_HEADER_SIZE), where=str(path))
        offset = header.meta_offset + header.meta_size // 3
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(BaseException) as info:
        dcp.load(_tensor_state(99), checkpoint_id=1, storage_reader=reader)
    assert "metadata checksum mismatch" in str(_failure(info.value))


# 5. retention


def test_keep_two_keeps_the_newest_two_steps_loadable(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2, 3, 4, 5], keep=2)
    steps = tmp_path / "job" / "steps"
    objects = sorted(p.parent.name for p in steps.glob("*/rank-*.obj"))
    commits = sorted(p.parent.name for p in steps.glob("*/rank-*.commit"))
    assert objects == commits == ["step-000000000004", "step-000000000005"]
    reader = FlashStorageReader("job", root=tmp_path)
    assert reader.latest_step() == 5
    for step in (4, 5):
        target = _tensor_state(99)
        dcp.load(target, checkpoint_id=step, storage_reader=reader)
        _assert_same(target, saved[step])


def test_keep_two_leaves_only_the_newest_two_step_dirs(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert _step_names(tmp_path) == ["step-000000000004", "step-000000000005"]


def test_keep_one_never_drops_the_last_loadable_step_before_the_next_is_loadable(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path, keep=1)
    try:
        state = _tensor_state(1)
        dcp.save(state, checkpoint_id=1, storage_writer=writer)

        def dies(*args: Any, **kwargs: Any) -> None:  # as if the coordinator were killed, or ENOSPC
            raise OSError("simulated failure while writing dcp.metadata")

        writer.finish = dies  # type: ignore[method-assign]
        with pytest.raises(BaseException) as info:  # a CheckpointException
            dcp.save(_tensor_state(2), checkpoint_id=2, storage_writer=writer)
        assert "simulated failure" in str(_failure(info.value))
    finally:
        writer.close()
    assert FlashStorageReader("job", root=tmp_path).latest_step() == 1


# 6. bad input


def test_bad_checkpoint_ids_are_refused(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path)
    reader = FlashStorageReader("job", root=tmp_path)
    other_job = FlashStorageReader("other", root=tmp_path).step_dir(3)
    try:
        for checkpoint_id in ("not-a-step", other_job, tmp_path / "step-x", -1, True):
            with pytest.raises(ValueError, match="use an int step or a step directory") as info:
                dcp.save(_tensor_state(1), checkpoint_id=checkpoint_id, storage_writer=writer)
            assert "writer.step_dir(100)" in str(info.value)
            with pytest.raises(ValueError, match="use an int step or a step directory"):
                dcp.load(_tensor_state(1), checkpoint_id=checkpoint_id, storage_reader=reader)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "job" / "steps"))):
            dcp.save(_tensor_state(1), checkpoint_id=other_job, storage_writer=writer)
        assert not (tmp_path / "job" / "steps").exists() or not _step_names(tmp_path)
    finally:
        writer.close()


def test_validate_checkpoint_id(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path)
    assert FlashStorageWriter.validate_checkpoint_id(writer.step_dir(3)) is True
    assert FlashStorageWriter.validate_checkpoint_id(str(writer.step_dir(3))) is True
    assert FlashStorageWriter.validate_checkpoint_id("/tmp/x") is False
    assert FlashStorageReader.validate_checkpoint_id(writer.step_dir(3)) is True
    assert FlashStorageReader.validate_checkpoint_id("/tmp/x") is False


def test_a_step_not_newer_than_a_saved_one_is_refused(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    try:
        dcp.save(_tensor_state(5), checkpoint_id=5, storage_writer=writer)
        for step in (5, 4):
            with pytest.raises(BaseException) as info:  # DCP wraps it: CheckpointException
                dcp.save(_tensor_state(step), checkpoint_id=step, storage_writer=writer)
            error = _failure(info.value)
            assert isinstance(error, ValueError), repr(info.value)
            assert f"flash step {step} is not newer than step 5" in str(error)
        assert sorted(p.name for p in (tmp_path / "job" / "steps").iterdir()) == ["step-000000000005"]
        saved = _tensor_state(6)
        dcp.save(saved, checkpoint_id=6, storage_writer=writer)  # the writer still works
    finally:
        writer.close()
    target = _tensor_state(99)
    dcp.load(target, checkpoint_id=6, storage_reader=FlashStorageReader("job", root=tmp_path))
    _assert_same(target, saved)


def test_a_writer_that_holds_its_rank_refuses_to_be_sent_to_another_process(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path)
    try:
        dcp.save(_tensor_state(1), checkpoint_id=1, storage_writer=writer)
        with pytest.raises(TypeError, match="already saved in this process and holds its rank"):
            pickle.dumps(writer)
        fresh = pickle.loads(pickle.dumps(FlashStorageWriter("other", root=tmp_path, keep=3)))
        assert (fresh.layout.job_dir, fresh.keep) == (tmp_path / "other", 3)  # settings travel
    finally:
        writer.close()


# 7. bad input across the adapter


def test_a_reader_of_a_job_that_does_not_exist_names_the_jobs_there(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    reader = FlashStorageReader("jbo", root=tmp_path)
    with pytest.raises(BaseException) as info:
        dcp.load(_tensor_state(99), storage_reader=reader)
    message = str(_failure(info.value))
    assert "flash job 'jbo' has no checkpoint under" in message and "jobs there: job" in message
    assert not (tmp_path / "jbo").exists(), "a load must not create the job it did not find"
    with pytest.raises(FileNotFoundError, match="jobs there: job"):
        reader.latest_step() if reader.latest_step() is not None else reader.read_metadata()


def test_a_state_dict_that_does_not_match_the_checkpoint_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    _save_steps(tmp_path, [1])
    reader = FlashStorageReader("job", root=tmp_path)
    for target, expected in (
        ({"w": torch.zeros(64, 48), "missing": torch.zeros(3)}, "missing"),
        ({"w": torch.zeros(64, 47), "b": torch.zeros(300, dtype=torch.int64)}, "w"),
    ):
        before = copy.deepcopy(target)
        with pytest.raises(BaseException) as info:
            dcp.load(target, checkpoint_id=1, storage_reader=reader)
        assert expected in str(_failure(info.value)), info.value
        if expected == "missing":
            _assert_same(target, before)
    target = _tensor_state(99)
    dcp.load(target, checkpoint_id=1, storage_reader=reader)  # the checkpoint is intact
    _assert_same(target, _tensor_state(1))


def test_a_full_flash_root_refuses_the_save_and_keeps_the_committed_step(small_tmpfs: Path) -> None:
    writer = FlashStorageWriter("job", root=small_tmpfs, keep=1)
    small = {"w": torch.arange(1000.0)}
    try:
        dcp.save(small, checkpoint_id=1, storage_writer=writer)
        huge = {"w": torch.zeros(80 * 2**20 // 4)}  # 80 MiB: more than the whole flash root
        with pytest.raises(BaseException) as info:
            dcp.save(huge, checkpoint_id=2, storage_writer=writer)
        error = _failure(info.value)
        assert isinstance(error, FlashSpaceError), repr(info.value)
        assert str(small_tmpfs) in str(error)
    finally:
        writer.close()
    target = {"w": torch.zeros(1000)}
    reader = FlashStorageReader("job", root=small_tmpfs)
    assert reader.latest_step() == 1
    dcp.load(target, storage_reader=reader)
    assert torch.equal(target["w"], small["w"])


# 8. going back


def test_loading_an_older_step_forgets_nothing_until_continue_from(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2, 3], keep=5)
    reader = FlashStorageReader("job", root=tmp_path)
    target = _tensor_state(99)
    dcp.load(target, checkpoint_id=1, storage_reader=reader)  # on purpose: an older step
    _assert_same(target, saved[1])
    assert reader.steps() == {1: 1, 2: 1, 3: 1}, "loading an older step must not drop newer ones"
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    try:
        with pytest.raises(BaseException) as info:
            dcp.save(_tensor_state(20), checkpoint_id=2, storage_writer=writer)
        assert "writer.continue_from(step)" in str(_failure(info.value))
        assert writer.continue_from(1) == [2, 3]
        assert reader.steps() == {1: 1}
        dcp.save(_tensor_state(20), checkpoint_id=2, storage_writer=writer)
    finally:
        writer.close()
    dcp.load(target, checkpoint_id=2, storage_reader=reader)
    _assert_same(target, _tensor_state(20))


def test_loading_the_newest_step_forgets_a_save_that_never_completed(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2], keep=5)
    reader = FlashStorageReader("job", root=tmp_path)
    commit = reader.step_dir(2) / COMMIT  # step 2 claims a world of 2: rank 1 never committed
    commit.write_text(json.dumps({**json.loads(commit.read_text()), "world_size": 2}))
    target = _tensor_state(99)
    dcp.load(target, storage_reader=reader)
    _assert_same(target, saved[1])
    assert not reader.step_dir(2).exists(), "the incomplete step 2 is forgotten"
    writer = FlashStorageWriter("job", root=tmp_path, keep=5)
    try:
        dcp.save(_tensor_state(7), checkpoint_id=2, storage_writer=writer)  # its number is free again
    finally:
        writer.close()


def test_ranks_that_picked_different_steps_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    """Each rank surveys alone inside DCP's read_metadata (no collective there); the coordinator then
    refuses a plan whose ranks picked different steps, naming what each picked."""
    from torch.distributed.checkpoint.planner import LoadPlan

    from stalwart.flash.dcp.reader import _Choice, _Order

    reader = FlashStorageReader("job", root=tmp_path)
    agreed = reader.prepare_global_plan(
        [LoadPlan([], storage_data=_Choice(4, 2, True, False)) for _ in range(2)]
    )
    assert all(isinstance(p.storage_data, _Order) and p.storage_data.generation for p in agreed)
    assert len({p.storage_data.generation for p in agreed}) == 1  # one new timeline for every rank
    older = reader.prepare_global_plan([LoadPlan([], storage_data=_Choice(3, 2, False, False))] * 2)
    assert all(p.storage_data.generation is None for p in older)  # an older step on purpose: no forgetting
    visiting = reader.prepare_global_plan(
        [LoadPlan([], storage_data=_Choice(4, 2, True, v)) for v in (False, True)]
    )
    assert all(p.storage_data.generation is None for p in visiting)  # an owner elsewhere keeps its steps
    with pytest.raises(FlashRestoreError, match=r"different flash steps .*rank 0: step 3, rank 1: step 4"):
        reader.prepare_global_plan(
            [LoadPlan([], storage_data=_Choice(step, 2, True, False)) for step in (3, 4)]
        )


# dcp.async_save's staging: the writer is its own stager


def _storage(staged: dict, key: str) -> int:
    return staged[key].untyped_storage().data_ptr()


def test_async_save_saves_the_state_as_it_was_at_the_call(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.staging import AsyncStager

    writer = FlashStorageWriter("job", root=tmp_path)
    assert isinstance(writer, AsyncStager)  # dcp.async_save stages through it when given no stager
    state = {"w": torch.randn(1 << 22), "step": torch.tensor(1)}
    want = copy.deepcopy(state)
    for step in (1, 2):
        future = dcp.async_save(state, checkpoint_id=step, storage_writer=writer)
        state["w"].add_(1.0)  # training goes on at once
        state["step"].add_(1)
        future.result()
        target = {"w": torch.zeros(1 << 22), "step": torch.tensor(0)}
        dcp.load(target, checkpoint_id=step, storage_reader=FlashStorageReader("job", root=tmp_path))
        _assert_same(target, want)
        want = copy.deepcopy(state)
    writer.close()


def test_a_staged_copy_is_reused_only_once_written(tmp_path: Path) -> None:
    writer = FlashStorageWriter("job", root=tmp_path)
    state = {"w": torch.randn(4096), "b": torch.arange(8)}
    first = writer.stage(state)
    second = writer.stage(state)  # the first is still lent (not yet written): never staged into again
    assert _storage(first, "w") != _storage(second, "w")
    dcp.save(first, checkpoint_id=1, storage_writer=writer)  # written into the flash buffer: free again
    third = writer.stage(state)
    assert _storage(third, "w") == _storage(first, "w")
    assert torch.equal(third["w"], state["w"]) and torch.equal(third["b"], state["b"])
    reshaped = writer.stage({"w": torch.randn(10), "b": torch.arange(8)})  # another shape: a new copy
    assert _storage(reshaped, "w") not in {_storage(first, "w"), _storage(second, "w")}
    writer.close()


def test_a_visitor_load_is_not_changed_by_the_owner_reusing_the_step_memory(tmp_path: Path) -> None:
    """While another process owns the rank (dcp.async_save's checkpoint process) it may drop the step
    being loaded and reuse its memory for a newer one: the visitor copies each object out and verifies
    the copy, so what it loads is the committed step even if the owner's file changes mid-load."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from stalwart.flash.engine import FlashEngine
    from stalwart.flash.layout import FlashLayout

    state = _tensor_state(3)
    writer = FlashStorageWriter("job", root=tmp_path)
    dcp.save(state, checkpoint_id=1, storage_writer=writer)
    writer.close()
    layout = FlashLayout(tmp_path, "job")
    owner = FlashEngine(layout)  # another owner of rank 0 (in a real job: the checkpoint process)
    path = layout.object_path(1, 0)
    original = path.read_bytes()

    class OwnerReusesTheMemory(DefaultLoadPlanner):
        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            with open(path, "r+b") as file:  # the owner writes a newer step into the same memory
                file.seek(HEADER_SIZE)
                file.write(b"\xff" * (len(original) - HEADER_SIZE - 64))
            return super().resolve_tensor(read_item)

    try:
        reader = FlashStorageReader("job", root=tmp_path)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(target, checkpoint_id=1, storage_reader=reader, planner=OwnerReusesTheMemory())
        _assert_same(target, state)
        assert reader.restored_from == {0: "flash"}
        assert not list(layout.pool_dir(0).parent.glob("visitor-*"))  # its buffers are freed
    finally:
        owner.close()
