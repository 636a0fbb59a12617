"""A full tmpfs: FlashSpaceError, and every committed step stays loadable."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from flash_faults import JOB, MiB, assert_state, blank, engine_on, restore, state_of

from stalwart.flash.buffers import FlashSpaceError
from stalwart.flash.engine import FlashEngine, FlashError
from stalwart.flash.layout import FlashLayout

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
