"""kill -9 at random instants of a save never loses a committed step.

The test runs ``STALWART_KILL_TRIALS`` trials (default 60, half sync and half async saves);
``scripts/soak-flash-kill [N]`` runs it with many more. ``STALWART_KILL_SEED`` changes the random
kill instants; every failure message names the seed and the trial.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from flash_faults import (
    JOB,
    assert_state,
    assert_unchanged,
    blank,
    child_error,
    engine_on,
    kill,
    mp_context,
    saver,
    state_of,
)

from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout

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
    ctx = mp_context()
    counts = {"killed in startup": 0, "nothing committed": 0, "restored": 0, "newer than reported": 0}
    for trial in range(trials):
        where = f"{'sync' if blocking else 'async'} trial {trial} (STALWART_KILL_SEED={base_seed})"
        root = tmp_path / f"root-{trial}"
        errfile = tmp_path / f"child-{trial}.err"
        started = ctx.Event()
        attempted = ctx.Value("q", 0, lock=False)
        committed = ctx.Value("q", 0, lock=False)
        child = ctx.Process(
            target=saver,
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
                assert started.wait(60), f"{where}: child never started: {child_error(errfile)}"
                if roll < 0.55:  # anywhere in the first ~0.5 s of saving
                    time.sleep(rng.uniform(0, 0.5))
                else:  # inside one of the first saves, however fast this machine is today
                    target = rng.randint(2, 5)
                    deadline = time.monotonic() + 60
                    while attempted.value < target and child.is_alive() and time.monotonic() < deadline:
                        time.sleep(0.001)
                    time.sleep(rng.uniform(0, 0.03))
            assert child.is_alive(), f"{where}: child died on its own: {child_error(errfile)}"
        finally:
            kill(child)
        assert child.exitcode == -signal.SIGKILL, (
            f"{where}: exit code {child.exitcode}: {child_error(errfile)}"
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
