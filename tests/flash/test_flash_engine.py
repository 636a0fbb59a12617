"""The flash engine: bit-exact round trips, in-place restore, retention, async saves, the durable tier."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from stalwart.flash.durable import DurableTier
from stalwart.flash.engine import FlashEngine, FlashError
from stalwart.flash.layout import FlashLayout, RankLockedError


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(8, 32)).sum().backward()
    optimizer.step()
    shared = torch.randn(10)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "dtypes": {
            "bf16": torch.randn(7, 3).to(torch.bfloat16),
            "int64": torch.arange(-5, 5),
            "bool": torch.tensor([True, False, True]),
            "complex": torch.randn(4, dtype=torch.complex64),
            "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 5),
        },
        "strided": torch.randn(6, 4).t(),  # not contiguous
        "tied": (shared, shared),
        "plain": {"step": 12, "name": "run", "ratios": [0.5, 1.5], "nothing": None, "bytes": b"\x00\x01"},
        "ordered": collections.OrderedDict(b=torch.ones(2), a=torch.zeros(2)),
    }


def assert_same(a: object, b: object, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def blank_like(value: object) -> object:
    """The same structure with different tensor values (what a fresh process would hold)."""
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, 7) if value.dtype != torch.bool else torch.zeros_like(value)
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict((k, blank_like(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: blank_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_like(v) for v in value]
    if isinstance(value, tuple):
        return tuple(blank_like(v) for v in value)
    return value


@pytest.fixture
def layout(tmp_path: Path) -> FlashLayout:
    return FlashLayout(tmp_path / "flash", "job")


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_round_trip_is_bit_exact_and_in_place(layout: FlashLayout, blocking: bool) -> None:
    state = make_state()
    with_engine = FlashEngine(layout, keep=2)
    assert with_engine.save(5, state, async_save=not blocking)
    with_engine.close()

    target = blank_like(state)
    target["plain"] = {}  # plain values come back even where the target has none
    weight = target["model"]["0.weight"]
    engine = FlashEngine(layout, keep=2)
    assert engine.load(target) == 5
    assert engine.restored_from == "flash"
    assert_same(state, target)
    assert target["model"]["0.weight"] is weight  # filled in place, not replaced
    engine.close()


def test_restore_creates_missing_tensors_and_feeds_load_state_dict(layout: FlashLayout) -> None:
    state = make_state()
    with FlashEngine(layout) as engine:
        engine.save(1, state)
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}  # no Adam state yet
    with FlashEngine(layout) as engine:
        assert engine.load(target) == 1
    optimizer.load_state_dict(target["optimizer"])
    assert_same(state["optimizer"], optimizer.state_dict())
    assert torch.equal(model[0].weight, state["model"]["0.weight"])


def test_restore_refuses_a_tensor_of_another_shape(layout: FlashLayout) -> None:
    with FlashEngine(layout) as engine:
        engine.save(1, {"w": torch.zeros(3, 4)})
    with (
        FlashEngine(layout) as engine,
        pytest.raises(ValueError, match=r"state\['w'\].*shape \[3, 4\].*\[4, 3\]"),
    ):
        engine.load({"w": torch.zeros(4, 3)})


def test_saved_bytes_are_the_state_at_the_call_even_when_training_moves_on(layout: FlashLayout) -> None:
    state = {"w": torch.zeros(4_000_000)}
    engine = FlashEngine(layout)
    engine.save(1, state, async_save=True)
    state["w"].fill_(1.0)  # training changes the tensor as soon as save returns
    engine.wait()
    engine.close()
    target = {"w": torch.empty(4_000_000)}
    with FlashEngine(layout) as engine:
        assert engine.load(target) == 1
    assert torch.count_nonzero(target["w"]) == 0


def test_retention_keeps_the_newest_complete_steps_in_keep_plus_one_buffers(layout: FlashLayout) -> None:
    state = {"w": torch.zeros(1_000_000)}
    engine = FlashEngine(layout, keep=2)
    for step in range(1, 8):
        state["w"].fill_(step)
        engine.save(step, state, async_save=step % 2 != 0)
    engine.wait()
    assert layout.steps() == [6, 7] and layout.complete_steps(1) == [6, 7]
    buffers = list(layout.job_dir.rglob("*.obj")) + list((layout.job_dir / "pool").rglob("buf-*"))
    assert len(buffers) == 3  # keep + 1: one free for the next save, never a new allocation
    engine.close()
    assert not list((layout.job_dir / "pool").rglob("buf-*"))  # the free buffer is released on close
    target = {"w": torch.empty(1_000_000)}
    with FlashEngine(layout, keep=2) as engine:
        assert engine.load(target) == 7 and bool((target["w"] == 7).all())


def test_a_growing_state_grows_a_buffer(layout: FlashLayout) -> None:
    with FlashEngine(layout, keep=1) as engine:
        for step, size in enumerate([1000, 300_000, 200_000, 900_000], start=1):
            engine.save(step, {"w": torch.full((size,), float(step))})
        target: dict = {}
        assert engine.load(target) == 4
    assert target["w"].shape == (900_000,) and bool((target["w"] == 4).all())
    assert len(list(layout.job_dir.rglob("*.obj")) + list((layout.job_dir / "pool").rglob("buf-*"))) <= 2


def test_steps_must_grow_until_a_restore_chooses_an_older_one(layout: FlashLayout) -> None:
    engine = FlashEngine(layout, keep=3)
    for step in (1, 2, 3):
        engine.save(step, {"w": torch.full((10,), float(step))})
    assert engine.save(3, {"w": torch.zeros(10)}) is False  # already committed: nothing written
    with pytest.raises(ValueError, match="older than step 3"):
        engine.save(2, {"w": torch.zeros(10)})
    engine.close()
    with open(layout.object_path(3, 0), "r+b") as fh:  # step 3 goes bad: restore falls back to 2
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with FlashEngine(layout, keep=3) as engine:
        assert engine.load({"w": torch.empty(10)}) == 2
        assert layout.steps() == [1, 2]  # step 3 belonged to the abandoned timeline
        engine.save(3, {"w": torch.full((10,), 30.0)})  # training resumes from 2 and saves 3 anew
    target = {"w": torch.empty(10)}
    with FlashEngine(layout, keep=3) as engine:
        assert engine.load(target) == 3
    assert bool((target["w"] == 30).all())


class Custom:
    """A class whose instances would run its module's code when unpickled."""


def test_plain_values_that_could_run_code_are_refused_at_save(layout: FlashLayout) -> None:
    class Local:
        pass

    with FlashEngine(layout) as engine:
        with pytest.raises(
            ValueError, match=r"test_flash_engine\.Custom is not allowed in a flash checkpoint"
        ):
            engine.save(1, {"w": torch.zeros(2), "obj": Custom()})
        with pytest.raises(ValueError, match="cannot save this state in a flash checkpoint"):
            engine.save(1, {"w": torch.zeros(2), "obj": Local()})
        assert engine.save(1, {"w": torch.zeros(2)})  # the failed saves left nothing behind


def test_bad_arguments_are_refused(layout: FlashLayout) -> None:
    with pytest.raises(ValueError, match="rank=2 is not accepted with world_size=2"):
        FlashEngine(layout, rank=2, world_size=2)
    with pytest.raises(ValueError, match="keep=0"):
        FlashEngine(layout, keep=0)
    with pytest.raises(ValueError, match=r"job_id='\.\./x'"):
        FlashLayout("/dev/shm", "../x")
    with FlashEngine(layout) as engine:
        with pytest.raises(ValueError, match="step=-1"):
            engine.save(-1, {})
        with pytest.raises(TypeError, match="state must be a dict"):
            engine.save(1, [torch.zeros(1)])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="durable=True needs a durable store"):
            engine.save(1, {}, durable=True)
        with pytest.raises(ValueError, match="flash checkpoints store dense tensors"):
            engine.save(1, {"s": torch.zeros(3, 3).to_sparse()})
    with pytest.raises(RuntimeError, match="closed"):
        engine.save(2, {})


def test_durable_copy_restores_when_the_flash_root_is_wiped(layout: FlashLayout, tmp_path: Path) -> None:
    durable_url = (tmp_path / "durable").as_uri()
    state = make_state()
    engine = FlashEngine(layout, keep=2, durable=DurableTier(durable_url))
    engine.save(10, state, durable=True)
    state["plain"]["step"] = 20
    engine.save(20, state, async_save=True)  # flash only
    engine.close()
    import shutil

    shutil.rmtree(layout.job_dir)  # a new machine: tmpfs is empty
    target = blank_like(state)
    with FlashEngine(layout, keep=2, durable=DurableTier(durable_url)) as engine:
        assert engine.load(target) == 10
        assert engine.restored_from == "durable"
    assert target["plain"]["step"] == 12
    assert_same({k: v for k, v in make_state().items()}, target)
    # the downloaded step is a local flash step again
    with FlashEngine(layout, keep=2) as engine:
        assert engine.load(blank_like(state)) == 10 and engine.restored_from == "flash"


def test_durable_retention_and_s3(layout: FlashLayout, s3_bucket: tuple[str, dict]) -> None:
    url, options = s3_bucket
    durable = DurableTier(f"{url}/flash-job", options, keep=2)
    engine = FlashEngine(layout, keep=1, durable=durable)
    for step in (1, 2, 3, 4):  # blocking: each step is uploaded before the next (none is skipped)
        engine.save(step, {"w": torch.full((100_000,), float(step))}, durable=True, async_save=False)
    engine.wait()
    engine.close()
    assert durable.complete_steps(1) == [3, 4]
    import shutil

    shutil.rmtree(layout.job_dir)
    target = {"w": torch.empty(100_000)}
    with FlashEngine(layout, durable=DurableTier(f"{url}/flash-job", options)) as engine:
        assert engine.load(target) == 4 and engine.restored_from == "durable"
    assert bool((target["w"] == 4).all())


def test_a_failed_upload_surfaces_on_the_next_call(layout: FlashLayout, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the durable store should be a directory")
    engine = FlashEngine(layout, durable=DurableTier(blocker.as_uri()))
    engine.save(1, {"w": torch.zeros(10)}, durable=True)
    with pytest.raises(FlashError, match=r"the durable copy of flash step 1 .* failed"):
        engine.wait()
    engine.save(2, {"w": torch.ones(10)})  # training goes on; the flash step is committed
    engine.close()
    with FlashEngine(layout) as engine:
        assert engine.load({"w": torch.empty(10)}) == 2


def test_nothing_to_restore_returns_none_and_touches_nothing(layout: FlashLayout) -> None:
    target = {"w": torch.full((5,), 3.0)}
    with FlashEngine(layout) as engine:
        assert engine.load(target) is None and engine.restored_from is None
    assert bool((target["w"] == 3).all())


def test_a_buffer_moves_into_a_step_directory_removed_under_it(tmp_path: Path, monkeypatch) -> None:
    """Another process's cleanup may remove an empty step directory between mkdir and rename."""
    import os

    from stalwart.flash import buffers

    buffer = buffers.Buffer.allocate(tmp_path / "buf", 65536)
    target = tmp_path / "steps" / "step-1" / "rank-0.obj"
    rename = os.rename
    removed = []

    def cleanup_first(src: str, dst: str) -> None:
        if not removed:
            os.rmdir(os.path.dirname(dst))  # what a concurrent remove_step_if_abandoned does
            removed.append(dst)
        rename(src, dst)

    monkeypatch.setattr(buffers.os, "rename", cleanup_first)
    buffer.move(target)
    assert removed and target.exists() and buffer.path == target
    buffer.close()


# a process that reads while another owns the rank (dcp.async_save's checkpoint process)


def test_a_visitor_reads_while_another_owns_the_rank_and_changes_nothing(layout: FlashLayout) -> None:
    owner = FlashEngine(layout)
    try:
        owner.save(1, {"w": torch.ones(1000)})
        with pytest.raises(RankLockedError):
            FlashEngine(layout)  # a second owner is refused, as before
        visitor = FlashEngine(layout, visit_if_owned=True)
        try:
            assert visitor.visitor and not owner.visitor
            pool = visitor.shelf.pool.directory
            assert pool.is_dir() and pool != layout.pool_dir(0)  # buffers of its own, not the owner's
            assert visitor.shelf.verify(1).step == 1
            for attempt in (
                lambda: visitor.save(2, {"w": torch.zeros(1000)}),
                lambda: visitor.continue_from(0),
                lambda: visitor.load({"w": torch.zeros(1000)}),
            ):
                with pytest.raises(RankLockedError, match="owned by another live process"):
                    attempt()
        finally:
            visitor.close()
        assert not pool.exists()
        assert owner.save(2, {"w": torch.full((1000,), 2.0)})  # the owner goes on, nothing of it changed
        assert layout.steps() == [1, 2]
    finally:
        owner.close()


def test_buffers_a_killed_visitor_left_are_freed_by_the_owner(layout: FlashLayout) -> None:
    dead = layout.pool_dir(0).with_name("visitor-00000-999999999")  # no such process
    dead.mkdir(parents=True)
    (dead / "buf-0").write_bytes(b"x" * 4096)
    alive = layout.pool_dir(0).with_name(f"visitor-00000-{os.getpid()}")
    alive.mkdir()
    FlashEngine(layout).close()
    assert not dead.exists()
    assert alive.is_dir()  # a live visitor keeps its buffers
