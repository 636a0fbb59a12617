"""Fault injection for the flash tier: kill -9 mid-save, flipped and truncated bytes, a full tmpfs,
a second writer of a rank, failures in the background commit, and leftovers of a save that died.

The kill test runs ``STALWART_KILL_TRIALS`` trials (default 60, half sync and half async saves);
``scripts/soak-flash-kill [N]`` runs it with many more. ``STALWART_KILL_SEED`` changes the random
kill instants; every failure message names the seed and the trial.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import random
import shutil
import signal
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stalwart.flash.buffers import FlashSpaceError
from stalwart.flash.durable import DurableTier
from stalwart.flash.engine import FlashEngine, FlashError
from stalwart.flash.errors import FlashRestoreError
from stalwart.flash.layout import FlashLayout, RankLockedError
from stalwart.flash.objects import HEADER_SIZE, PACKED_HEADER_SIZE, Header

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


def _mp() -> Any:
    """Forkserver children: torch and the flash engine are imported once, in the server; plain fork is
    unsafe once torch's OpenMP threads run in the parent."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stalwart.flash.engine", __name__])
    return ctx


def _saver(root: str, blocking: bool, started: Any, attempted: Any, committed: Any, errfile: str) -> None:
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


def _holder(root: str, rank: int, started: Any, errfile: str) -> None:
    """Take a rank's lock, commit step 1 and sleep until killed."""
    try:
        engine = FlashEngine(FlashLayout(root, JOB), rank=rank)
        engine.save(1, state_of(1, 1000))
        started.set()
        time.sleep(600)
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def _forking_holder(root: str, started: Any, grandchild: Any, errfile: str) -> None:
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


def _rank_writer(root: str, rendezvous: str, rank: int, ready: Any, release: Any, errfile: str) -> None:
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


def _load_after_truncation(root: str, errfile: str) -> None:
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


def _child_error(errfile: Path) -> str:
    return errfile.read_text() if errfile.exists() else "(no traceback written)"


def _kill(process: Any) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.join(30)


# 1. kill -9 at random instants


def _kill_trials() -> int:
    raw = os.environ.get("STALWART_KILL_TRIALS", "60")
    try:
        trials = int(raw)
    except ValueError:
        raise ValueError(f"STALWART_KILL_TRIALS={raw!r} is not accepted; use an int >= 2") from None
    if trials < 2:
        raise ValueError(f"STALWART_KILL_TRIALS={raw!r} is not accepted; use an int >= 2")
    return trials


def _check_tidy(layout: FlashLayout, engine: FlashEngine, where: str) -> None:
    """After a restart every step directory holds exactly one committed object and its record."""
    assert layout.steps() == sorted(engine.shelf.own), where
    for step in layout.steps():
        names = sorted(os.listdir(layout.step_dir(step)))
        assert names == ["rank-00000.commit", "rank-00000.obj"], f"{where}: step {step} holds {names}"


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_kill_9_at_random_instants_never_loses_a_committed_step(tmp_path: Path, blocking: bool) -> None:
    total = _kill_trials()
    trials = (total + 1) // 2 if blocking else total // 2
    base_seed = int(os.environ.get("STALWART_KILL_SEED", "20240607"))
    seed = base_seed + (0 if blocking else 1)
    rng = random.Random(seed)
    ctx = _mp()
    counts = {"killed in startup": 0, "nothing committed": 0, "restored": 0, "newer than reported": 0}
    for trial in range(trials):
        where = f"{'sync' if blocking else 'async'} trial {trial} (STALWART_KILL_SEED={base_seed})"
        root = tmp_path / f"root-{trial}"
        errfile = tmp_path / f"child-{trial}.err"
        started = ctx.Event()
        attempted = ctx.Value("q", 0, lock=False)
        committed = ctx.Value("q", 0, lock=False)
        child = ctx.Process(
            target=_saver,
            args=(str(root), blocking, started, attempted, committed, str(errfile)),
            daemon=True,
        )
        child.start()
        try:
            roll = rng.random()
            if roll < 0.1:  # while the child starts up or opens its engine
                time.sleep(rng.uniform(0, 0.02))
                counts["killed in startup"] += 1
            else:
                assert started.wait(60), f"{where}: child never started: {_child_error(errfile)}"
                if roll < 0.55:  # anywhere in the first ~0.5 s of saving
                    time.sleep(rng.uniform(0, 0.5))
                else:  # inside one of the first saves, however fast this machine is today
                    target = rng.randint(2, 5)
                    deadline = time.monotonic() + 60
                    while attempted.value < target and child.is_alive() and time.monotonic() < deadline:
                        time.sleep(0.001)
                    time.sleep(rng.uniform(0, 0.03))
            assert child.is_alive(), f"{where}: child died on its own: {_child_error(errfile)}"
        finally:
            _kill(child)
        assert child.exitcode == -signal.SIGKILL, (
            f"{where}: exit code {child.exitcode}: {_child_error(errfile)}"
        )
        reported, tried = committed.value, attempted.value

        layout = FlashLayout(root, JOB)
        state = blank()
        with engine_on(layout) as engine:
            _check_tidy(layout, engine, where)
            step = engine.load(state)
            if reported:
                assert step is not None, f"{where}: step {reported} was committed, load found nothing"
                assert step >= reported, f"{where}: step {reported} was committed, load restored {step}"
            if step is not None:
                assert step <= tried, f"{where}: restored step {step}, the child only started {tried}"
                assert engine.restored_from == "flash", where
                assert_state(state, step, where=where)
                counts["restored"] += 1
                counts["newer than reported"] += step > reported
            else:
                assert engine.restored_from is None, where
                assert_unchanged(state, blank())
                counts["nothing committed"] += 1
            # the dead writer's lock and leftovers do not get in the way of the next save
            following = (step or 0) + 1
            assert engine.save(following, state_of(following), async_save=not blocking), where
            engine.wait()
            again = engine.load(state)
            assert again == following, f"{where}: saved {following} after the restart, restored {again}"
            assert_state(state, following, where=where)
        shutil.rmtree(root)
    mode = "sync" if blocking else "async"
    print(f"\n{trials} kill -9 trials, {mode} saves (STALWART_KILL_SEED={base_seed}): {counts}")
    # enough trials must kill a child that had committed something, or they test little
    assert counts["restored"] >= trials // 4, counts


# 2. corruption


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        assert len(byte) == 1, f"offset {offset} is past the end of {path}"
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def _header(path: Path) -> Header:
    with open(path, "rb") as fh:
        return Header.unpack(fh.read(PACKED_HEADER_SIZE), where=str(path))


def corrupt(path: Path, kind: str) -> None:
    header = _header(path)
    if kind == "data":
        _flip(path, HEADER_SIZE + 1_234_567)
    elif kind == "data-last-byte":
        _flip(path, header.data_offset + header.data_size - 1)
    elif kind == "header-magic":
        _flip(path, 0)
    elif kind == "header-step":
        _flip(path, 16)  # inside the step field
    elif kind == "metadata":
        _flip(path, header.meta_offset + 5)
    elif kind == "chunk-hashes":
        _flip(path, header.end - 1)
    elif kind == "truncated-mid-data":
        os.truncate(path, HEADER_SIZE + 1000)
    elif kind == "truncated-last-byte":
        os.truncate(path, header.end - 1)
    else:
        raise AssertionError(kind)


KINDS = [
    "data",
    "data-last-byte",
    "header-magic",
    "header-step",
    "metadata",
    "chunk-hashes",
    "truncated-mid-data",
    "truncated-last-byte",
]


def _warned_about(caplog: pytest.LogCaptureFixture, path: Path) -> bool:
    return any(
        r.name.startswith(LOGGER) and r.levelno == logging.WARNING and str(path) in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_object_falls_back_to_the_older_step(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        engine.save(2, state_of(2))
    bad = layout.object_path(2, 0)
    corrupt(bad, kind)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, state, source = restore(layout)
    assert (step, source) == (1, "flash")
    assert_state(state, 1)
    assert _warned_about(caplog, bad), caplog.text
    # the corrupt step was forgotten: training goes on from step 1
    with engine_on(layout) as engine:
        assert engine.load(blank()) == 1
        assert engine.save(2, state_of(2))
    step, state, _ = restore(layout)
    assert step == 2
    assert_state(state, 2)


@pytest.mark.parametrize("kind", ["data", "header-step", "metadata", "truncated-mid-data"])
def test_corrupt_only_step_restores_from_the_durable_copy(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    url = (tmp_path / "durable").as_uri()
    with engine_on(layout, durable=DurableTier(url)) as engine:
        engine.save(1, state_of(1), durable=True)
    bad = layout.object_path(1, 0)
    corrupt(bad, kind)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, state, source = restore(layout, durable=DurableTier(url))
    assert (step, source) == (1, "durable")
    assert_state(state, 1)
    assert _warned_about(caplog, bad), caplog.text
    # the downloaded copy is a good flash object now
    step, state, source = restore(layout)
    assert (step, source) == (1, "flash")
    assert_state(state, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_only_step_without_durable_is_an_error_not_a_fresh_start(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
    bad = layout.object_path(1, 0)
    corrupt(bad, kind)
    state = blank()
    state["a"][::1000] = 3.25  # the caller's own values, which nothing may overwrite
    before = snapshot(state)
    for _ in range(2):  # the next attempt finds the same checkpoint, not "nothing": it fails again
        with caplog.at_level(logging.WARNING, logger=LOGGER), engine_on(layout) as engine:
            with pytest.raises(FlashRestoreError, match="failed verification") as info:
                engine.load(state)
            assert engine.restored_from is None
        assert str(bad) in str(info.value) and str(layout.job_dir) in str(info.value)
        assert_unchanged(state, before)
        assert _warned_about(caplog, bad), caplog.text


@pytest.mark.parametrize("kind", ["data", "metadata", "header-step"])
def test_corruption_under_the_live_engine_is_caught_on_load(tmp_path: Path, kind: str) -> None:
    """The engine that wrote a step still maps it; a byte flipped in the file shows through the map."""
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        engine.save(2, state_of(2), async_save=True)
        engine.wait()
        corrupt(layout.object_path(2, 0), kind)
        state = blank()
        assert engine.load(state) == 1
        assert_state(state, 1)
        assert engine.save(2, state_of(2))
    step, state, _ = restore(layout)
    assert step == 2
    assert_state(state, 2)


def test_truncation_under_the_live_engine_is_caught_on_load(tmp_path: Path) -> None:
    ctx = _mp()
    errfile = tmp_path / "child.err"
    child = ctx.Process(target=_load_after_truncation, args=(str(tmp_path / "flash"), str(errfile)))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"exit code {child.exitcode}: {_child_error(errfile)}"


# 3. out of space


@pytest.mark.parametrize("path", ["new-buffer", "grow-free-buffer"])
@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_full_flash_root_raises_flash_space_error_and_keeps_committed_steps(
    small_tmpfs: Path, blocking: bool, path: str
) -> None:
    n16, n48 = 4 * MiB, 12 * MiB  # float32 elements: 16 MiB and 48 MiB states
    layout = FlashLayout(small_tmpfs, JOB)
    # keep=2: no free buffer, a new one must be allocated; keep=1: step 1's buffer is free and must grow
    keep = 2 if path == "new-buffer" else 1
    with engine_on(layout, keep=keep) as engine:
        last = 1 if keep == 2 else 2
        for step in range(1, last + 1):
            assert engine.save(step, state_of(step, n16), async_save=not blocking)
        engine.wait()
        free_before = [(b.path, b.capacity) for b in engine.shelf.pool._free]
        assert len(free_before) == (0 if keep == 2 else 1)
        with pytest.raises(FlashSpaceError) as info:
            engine.save(last + 1, state_of(last + 1, n48), async_save=not blocking)
            engine.wait()
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
        assert "no space" in str(info.value) and "committed checkpoints are intact" in str(info.value)
        # a failed growth leaves the free buffer as it was
        assert [(b.path, b.capacity) for b in engine.shelf.pool._free] == free_before
        assert not layout.step_dir(last + 1).exists()
        state = blank(n16)
        assert engine.load(state) == last
        assert_state(state, last, n16)
        # training goes on with states that fit
        assert engine.save(last + 1, state_of(last + 1, n16), async_save=not blocking)
        engine.wait()
        state = blank(n16)
        assert engine.load(state) == last + 1
        assert_state(state, last + 1, n16)
    step, state, _ = restore(layout, n16)
    assert step == last + 1
    assert_state(state, last + 1, n16)


def _fill(directory: Path) -> Path:
    """Take every free block of the file system (as another user of a shared /dev/shm would)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def _fill_before_commit(engine: FlashEngine, monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[Path]:
    """Once the next save has its (reserved) buffer, something else fills the tmpfs before the commit."""
    fillers: list[Path] = []
    commit_staged = engine.shelf.commit_staged

    def fill_then_commit(step: int, staged: Any) -> Any:
        fillers.append(_fill(directory))
        return commit_staged(step, staged)

    monkeypatch.setattr(engine.shelf, "commit_staged", fill_then_commit)
    return fillers


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_tmpfs_filling_up_before_the_commit_record_keeps_committed_steps(
    small_tmpfs: Path, blocking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = FlashLayout(small_tmpfs, JOB)
    with engine_on(layout) as engine:
        assert engine.save(1, state_of(1), async_save=not blocking)
        engine.wait()
        fillers = _fill_before_commit(engine, monkeypatch, small_tmpfs)
        with pytest.raises((OSError, FlashError)) as info:
            engine.save(2, state_of(2), async_save=not blocking)
            engine.wait()
        error = info.value  # FlashSpaceError itself, also from the background commit of an async save
        assert isinstance(error, FlashSpaceError) and error.errno == errno.ENOSPC, info.value
        if not blocking:
            assert "step 2" in str(info.value)
        monkeypatch.undo()
        assert fillers and not layout.object_path(2, 0).exists()
        assert len(engine.shelf.pool._free) == 1  # the staged buffer went back to the pool
        state = blank()
        assert engine.load(state) == 1
        assert_state(state, 1)
        # once the space is back, training goes on
        fillers[0].unlink()
        assert engine.save(2, state_of(2), async_save=not blocking)
        engine.wait()
    step, state, _ = restore(layout)
    assert step == 2
    assert_state(state, 2)


def test_tmpfs_full_at_the_commit_record_raises_flash_space_error(
    small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = FlashLayout(small_tmpfs, JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        _fill_before_commit(engine, monkeypatch, small_tmpfs)
        with pytest.raises(OSError) as info:
            engine.save(2, state_of(2))
        monkeypatch.undo()
        assert isinstance(info.value, FlashSpaceError), repr(info.value)
        assert "committed checkpoints are intact" in str(info.value)
        assert not layout.step_dir(2).exists(), os.listdir(layout.step_dir(2))


# 4. rank lock


def test_second_writer_of_a_rank_in_the_same_process_is_refused(tmp_path: Path) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1, 1000))
        with pytest.raises(RankLockedError, match=rf"rank 0 of flash job '{JOB}'.*pid {os.getpid()}"):
            FlashEngine(layout)
        # the refused engine touched nothing: the first one goes on
        assert engine.save(2, state_of(2, 1000))
    with engine_on(layout) as engine:  # closed: the lock is free again
        state = blank(1000)
        assert engine.load(state) == 2
        assert_state(state, 2, 1000)


def test_live_child_holds_the_rank_and_its_kill_9_releases_it(tmp_path: Path) -> None:
    ctx = _mp()
    root = tmp_path / "flash"
    layout = FlashLayout(root, JOB)
    errfile = tmp_path / "child.err"
    started = ctx.Event()
    child = ctx.Process(target=_holder, args=(str(root), 0, started, str(errfile)), daemon=True)
    child.start()
    try:
        assert started.wait(60), _child_error(errfile)
        with pytest.raises(RankLockedError, match=rf"rank 0 of flash job '{JOB}'.*pid {child.pid}\b"):
            FlashEngine(layout)
    finally:
        _kill(child)
    assert child.exitcode == -signal.SIGKILL, _child_error(errfile)
    with engine_on(layout) as engine:
        state = blank(1000)
        assert engine.load(state) == 1
        assert_state(state, 1, 1000)
        assert engine.save(2, state_of(2, 1000))


def test_forked_children_of_a_killed_writer_do_not_hold_its_rank(tmp_path: Path) -> None:
    ctx = _mp()
    root = tmp_path / "flash"
    errfile = tmp_path / "child.err"
    started = ctx.Event()
    grandchild = ctx.Value("q", 0, lock=False)
    child = ctx.Process(
        target=_forking_holder, args=(str(root), started, grandchild, str(errfile)), daemon=True
    )
    child.start()
    try:
        assert started.wait(60), _child_error(errfile)
        _kill(child)
        assert child.exitcode == -signal.SIGKILL, _child_error(errfile)
        with engine_on(FlashLayout(root, JOB)) as engine:
            state = blank(1000)
            assert engine.load(state) == 1
            assert_state(state, 1, 1000)
    finally:
        _kill(child)
        if grandchild.value:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild.value, signal.SIGKILL)


def test_different_ranks_of_a_job_coexist(tmp_path: Path) -> None:
    ctx = _mp()
    root = tmp_path / "flash"
    ready, release = [ctx.Event(), ctx.Event()], ctx.Event()
    errfiles = [tmp_path / f"rank-{rank}.err" for rank in (0, 1)]
    ranks = [
        ctx.Process(
            target=_rank_writer,
            args=(str(root), str(tmp_path / "gloo"), rank, ready[rank], release, str(errfiles[rank])),
            daemon=True,
        )
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    try:
        for rank in (0, 1):
            assert ready[rank].wait(120), _child_error(errfiles[rank])
        layout = FlashLayout(root, JOB)
        assert layout.complete_steps(2) == [1]
        for rank, process in enumerate(ranks):  # each rank is held by its own live writer
            with pytest.raises(
                RankLockedError, match=rf"rank {rank} of flash job '{JOB}'.*pid {process.pid}\b"
            ):
                layout.lock(rank)
        release.set()
        for rank, process in enumerate(ranks):
            process.join(60)
            assert process.exitcode == 0, _child_error(errfiles[rank])
    finally:
        for process in ranks:
            _kill(process)


# 5. background errors


@pytest.mark.parametrize("failing", ["commit", "hash_data"])
@pytest.mark.parametrize("surfaced_by", ["save", "wait"])
def test_background_commit_failure_surfaces_on_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, surfaced_by: str
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        engine.save(2, state_of(2))
        engine.save(3, state_of(3))  # keep=2: step 1's buffer is free now
        (spare,) = engine.shelf.pool._free
        spare_inode = os.stat(spare.path).st_ino

        def boom(*args: Any, **kwargs: Any) -> Any:
            raise OSError(f"injected failure of {failing}")

        target = engine.shelf if failing == "commit" else engine.copier
        monkeypatch.setattr(target, failing, boom)
        assert engine.save(4, state_of(4), async_save=True)
        with pytest.raises(FlashError, match=r"step 4 failed in the background: injected failure"):
            if surfaced_by == "save":
                engine.save(5, state_of(5), async_save=True)
            else:
                engine.wait()
        monkeypatch.undo()
        engine.wait()  # raised once, not again
        # the buffer went back to the pool, and step 4 left nothing behind
        assert [os.stat(b.path).st_ino for b in engine.shelf.pool._free] == [spare_inode]
        assert all(b.path.parent == layout.pool_dir(0) for b in engine.shelf.pool._free)
        assert not layout.step_dir(4).exists()
        assert sorted(engine.shelf.own) == [2, 3]
        state = blank()
        assert engine.load(state) == 3
        assert_state(state, 3)
        # the engine saves again, reusing the buffer
        assert engine.save(4, state_of(4), async_save=True)
        engine.wait()
        assert layout.object_path(4, 0).stat().st_ino == spare_inode
    step, state, _ = restore(layout)
    assert step == 4
    assert_state(state, 4)


def test_non_blocking_save_returns_only_after_the_previous_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the async kill trials count on: once save(n) returns, step n - 1 is committed."""
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        commit_staged = engine.shelf.commit_staged

        def slow_commit(step: int, staged: Any) -> Any:
            time.sleep(0.8)
            return commit_staged(step, staged)

        monkeypatch.setattr(engine.shelf, "commit_staged", slow_commit)
        assert engine.save(1, state_of(1, 1000), async_save=True)
        assert layout.complete_steps(1) == []  # still committing in the background
        assert engine.save(2, state_of(2, 1000), async_save=True)
        assert layout.complete_steps(1) == [1]
        engine.wait()
        assert layout.complete_steps(1) == [1, 2]


# 6. leftovers of a save that died


def test_leftovers_of_an_unfinished_save_are_adopted_and_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout, keep=3) as engine:
        for step in (1, 2, 3):
            engine.save(step, state_of(step))
    # step 3's save died after its object was renamed into place, before its commit record was
    layout.commit_path(3, 0).unlink()
    Path(str(layout.commit_path(3, 0)) + ".123.tmp").write_bytes(b'{"step": 3, "ra')
    # and step 4's died while writing its commit record
    layout.step_dir(4).mkdir()
    Path(str(layout.commit_path(4, 0)) + ".456.tmp").write_bytes(b"{")
    orphan = layout.object_path(3, 0).stat().st_ino
    pool = layout.pool_dir(0)
    assert list(pool.glob("buf-*")) == []  # close() freed the pool

    with caplog.at_level(logging.INFO, logger=LOGGER), engine_on(layout) as engine:
        assert layout.steps() == [1, 2]  # no stray file, no empty step directory
        assert [p.stat().st_ino for p in pool.glob("buf-*")] == [orphan]
        state = blank()
        assert engine.load(state) == 2
        assert_state(state, 2)
        assert engine.restored_from == "flash"
        assert engine.save(3, state_of(3))
        assert layout.object_path(3, 0).stat().st_ino == orphan  # the adopted buffer carries it
    assert "adopting the object of an unfinished save of step 3" in caplog.text
    step, state, _ = restore(layout)
    assert step == 3
    assert_state(state, 3)


# found along the way


def test_refused_load_leaves_the_state_untouched(tmp_path: Path) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, {"meta": {"step": 1}, "a": torch.ones(10)})
    state = {"meta": {"step": -1}, "a": torch.zeros(11)}
    with engine_on(layout) as engine, pytest.raises(ValueError, match="shape"):
        engine.load(state)
    assert state["meta"] == {"step": -1}
    assert torch.equal(state["a"], torch.zeros(11))
