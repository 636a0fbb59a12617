"""One writer per rank of a job: a second one is refused, a killed one's lock is released."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from flash_faults import (
    JOB,
    assert_state,
    blank,
    child_error,
    engine_on,
    forking_holder,
    holder,
    kill,
    mp_context,
    rank_writer,
    state_of,
)

from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout, RankLockedError

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
    ctx = mp_context()
    root = tmp_path / "flash"
    layout = FlashLayout(root, JOB)
    errfile = tmp_path / "child.err"
    started = ctx.Event()
    child = ctx.Process(target=holder, args=(str(root), 0, started, str(errfile)), daemon=True)
    child.start()
    try:
        assert started.wait(60), child_error(errfile)
        with pytest.raises(RankLockedError, match=rf"rank 0 of flash job '{JOB}'.*pid {child.pid}\b"):
            FlashEngine(layout)
    finally:
        kill(child)
    assert child.exitcode == -signal.SIGKILL, child_error(errfile)
    with engine_on(layout) as engine:
        state = blank(1000)
        assert engine.load(state) == 1
        assert_state(state, 1, 1000)
        assert engine.save(2, state_of(2, 1000))


def test_forked_children_of_a_killed_writer_do_not_hold_its_rank(tmp_path: Path) -> None:
    ctx = mp_context()
    root = tmp_path / "flash"
    errfile = tmp_path / "child.err"
    started = ctx.Event()
    grandchild = ctx.Value("q", 0, lock=False)
    child = ctx.Process(
        target=forking_holder, args=(str(root), started, grandchild, str(errfile)), daemon=True
    )
    child.start()
    try:
        assert started.wait(60), child_error(errfile)
        kill(child)
        assert child.exitcode == -signal.SIGKILL, child_error(errfile)
        with engine_on(FlashLayout(root, JOB)) as engine:
            state = blank(1000)
            assert engine.load(state) == 1
            assert_state(state, 1, 1000)
    finally:
        kill(child)
        if grandchild.value:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild.value, signal.SIGKILL)


def test_different_ranks_of_a_job_coexist(tmp_path: Path) -> None:
    ctx = mp_context()
    root = tmp_path / "flash"
    ready, release = [ctx.Event(), ctx.Event()], ctx.Event()
    errfiles = [tmp_path / f"rank-{rank}.err" for rank in (0, 1)]
    ranks = [
        ctx.Process(
            target=rank_writer,
            args=(str(root), str(tmp_path / "gloo"), rank, ready[rank], release, str(errfiles[rank])),
            daemon=True,
        )
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    try:
        for rank in (0, 1):
            assert ready[rank].wait(120), child_error(errfiles[rank])
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
            assert process.exitcode == 0, child_error(errfiles[rank])
    finally:
        for process in ranks:
            kill(process)
