"""FlashCheckpointer: its policy, its arguments, and a retried task resuming from flash or durable."""

from __future__ import annotations

from pathlib import Path

import flash_tasks
import pytest
import torch

import stalwart as sw
from stalwart.flash.durable import DurableTier


def test_maybe_save_follows_every_n_steps_and_durable_every_n_steps(tmp_path: Path) -> None:
    durable = (tmp_path / "durable").as_uri()
    flash = sw.FlashCheckpointer(
        "policy", root=tmp_path / "flash", durable=durable, every_n_steps=3, durable_every_n_steps=6, keep=10
    )
    state = {"w": torch.zeros(10)}
    saved = []
    for step in range(1, 13):
        if flash.maybe_save(step, state):
            saved.append(step)
        # the upload of step 6 ends before step 12 comes: a durable step still waiting when a newer one
        # comes is dropped for it by design (tests/flash/test_flash_durable.py), as on a busy machine here
        flash.wait()
    assert saved == [3, 6, 9, 12]
    assert flash.maybe_save(12, state) is False  # not twice
    flash.wait()
    assert flash.layout.complete_steps(1) == [3, 6, 9, 12]
    assert DurableTier(durable).complete_steps(1) == [6, 12]
    flash.close()
    with sw.FlashCheckpointer("policy", root=tmp_path / "flash") as again:
        assert again.restore({"w": torch.empty(10)}) == 12 and again.restored_from == "flash"


def test_sync_mode_and_context_manager(tmp_path: Path) -> None:
    with sw.FlashCheckpointer("sync", root=tmp_path, async_save=False) as flash:
        assert flash.save(1, {"w": torch.ones(3)})
        assert flash.layout.complete_steps(1) == [1]  # committed when save returns
    assert "sync" in repr(flash)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job_id": "../up"}, "job_id='../up' is not accepted"),
        ({"job_id": "j", "every_n_steps": 0}, "every_n_steps=0"),
        ({"job_id": "j", "keep": True}, "keep=True"),
        ({"job_id": "j", "durable_every_n_steps": 5}, "needs durable="),
        (
            {"job_id": "j", "durable": "file:///x", "every_n_steps": 2, "durable_every_n_steps": 5},
            "not a multiple",
        ),
        ({"job_id": "j", "async_save": "yes"}, "async_save='yes'"),
        ({"job_id": "j", "root": 5}, "root=5"),
        ({"job_id": "j", "durable": ""}, "durable=''"),
    ],
)
def test_bad_arguments_say_what_is_accepted(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sw.FlashCheckpointer(**kwargs)


def test_job_id_is_required_outside_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STALWART_RUN_ID", raising=False)
    with pytest.raises(ValueError, match="job_id is required outside a stalwart task"):
        sw.FlashCheckpointer()
    with pytest.raises(ValueError, match="step=-3"):
        sw.FlashCheckpointer("j").maybe_save(-3, {})


def _weights_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_retried_task_resumes_from_flash_then_from_durable(stalwart_home: Path) -> None:
    twin = sw.run(flash_tasks.train, steps=10).output
    assert twin["start"] == 0 and twin["restored_from"] is None

    run = sw.run(flash_tasks.train, steps=10, crash_after=6)
    assert [a.status for a in run.attempts] == ["killed", "succeeded"]
    assert run.output["start"] == 6 and run.output["restored_from"] == "flash"
    assert _weights_equal(run.output["weights"], twin["weights"])  # bit-exact with the uninterrupted run

    wiped = sw.run(flash_tasks.train, steps=10, crash_after=6, wipe_flash=True)
    assert [a.status for a in wiped.attempts] == ["killed", "succeeded"]
    assert wiped.output["start"] == 4 and wiped.output["restored_from"] == "durable"  # the copy of step 4
    assert _weights_equal(wiped.output["weights"], twin["weights"])


# restoring a chosen step (issue 11)


def _spiky(tmp_path: Path) -> tuple[sw.FlashCheckpointer, dict[int, torch.Tensor]]:
    """Steps 1..5 saved, flash keeping the newest 2 and the durable store all 5."""
    flash = sw.FlashCheckpointer(
        "spike",
        root=tmp_path / "flash",
        durable=(tmp_path / "durable").as_uri(),
        durable_every_n_steps=1,
        durable_keep=5,
        keep=2,
        async_save=False,
    )
    saved = {step: torch.full((64,), float(step)) for step in range(1, 6)}
    for step, weights in saved.items():
        flash.save(step, {"w": weights})
    flash.wait()
    return flash, saved


def test_steps_lists_what_each_tier_holds(tmp_path: Path) -> None:
    flash, _ = _spiky(tmp_path)
    assert flash.steps() == {"flash": [4, 5], "durable": [1, 2, 3, 4, 5]}
    flash.close()


def test_restore_a_chosen_step_from_whichever_tier_holds_it_and_go_on_from_there(tmp_path: Path) -> None:
    flash, saved = _spiky(tmp_path)
    state = {"w": torch.zeros(64)}
    assert flash.restore(state, step=4) == 4 and flash.restored_from == "flash"
    assert torch.equal(state["w"], saved[4])
    assert flash.restore(state, step=2) == 2 and flash.restored_from == "durable"  # past the loss spike
    assert torch.equal(state["w"], saved[2])
    assert flash.steps() == {"flash": [2], "durable": [1, 2]}  # what came after is an abandoned timeline
    assert flash.save(3, {"w": torch.full((64,), 30.0)})  # so training can save those numbers again
    flash.close()
    with sw.FlashCheckpointer(
        "spike", root=tmp_path / "flash", durable=(tmp_path / "durable").as_uri()
    ) as again:
        state = {"w": torch.zeros(64)}
        assert again.restore(state) == 3 and torch.equal(state["w"], torch.full((64,), 30.0))


def test_restoring_a_step_no_tier_holds_names_those_that_exist_and_changes_nothing(tmp_path: Path) -> None:
    flash, _ = _spiky(tmp_path)
    state = {"w": torch.zeros(64)}
    with pytest.raises(sw.FlashRestoreError, match=r"step 9 .*flash: 4, 5; durable: 1, 2, 3, 4, 5"):
        flash.restore(state, step=9)
    assert torch.equal(state["w"], torch.zeros(64))
    assert flash.steps() == {"flash": [4, 5], "durable": [1, 2, 3, 4, 5]}
    for bad in (-1, True, "3", 2.0):
        with pytest.raises(ValueError, match=r"step=.* is not accepted; use an int >= 0 or None"):
            flash.restore(state, step=bad)
    flash.close()
