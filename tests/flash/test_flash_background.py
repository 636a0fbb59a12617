"""Failures in the background commit surface on the next call, and leftovers of a save that died are
adopted back into the pool and never loaded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from flash_faults import JOB, LOGGER, assert_state, blank, engine_on, restore, state_of

from stalwart.flash.engine import FlashError
from stalwart.flash.layout import FlashLayout

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


def test_a_commit_record_write_killed_midway_leaves_what_the_next_start_removes(tmp_path: Path) -> None:
    """kill -9 between writing a commit record's scratch file and renaming it (here: the process exits
    in place of the rename) leaves a scratch name the next start recognises and removes."""
    import subprocess
    import sys
    import textwrap

    import torch

    root = tmp_path / "flash"
    code = textwrap.dedent(
        f"""
        import os
        import torch
        from stalwart import atomic
        from stalwart.flash.engine import FlashEngine
        from stalwart.flash.layout import FlashLayout

        engine = FlashEngine(FlashLayout({str(root)!r}, "job"))
        engine.save(1, {{"w": torch.ones(10)}})
        atomic.os.replace = lambda *args: os._exit(9)  # killed before the commit record's rename
        engine.save(2, {{"w": torch.ones(10)}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    layout = FlashLayout(root, "job")
    leftovers = [p.name for p in layout.step_dir(2).iterdir() if p.name.endswith(".tmp")]
    # the names _clean_stale removes even while other ranks' objects keep the step directory alive
    assert leftovers and all(name.startswith("rank-00000.commit.") for name in leftovers), leftovers
    with engine_on(layout) as engine:
        assert engine.load({"w": torch.zeros(10)}) == 1  # step 2 never committed
    assert not layout.step_dir(2).exists() or not any(
        p.name.endswith(".tmp") for p in layout.step_dir(2).iterdir()
    )
