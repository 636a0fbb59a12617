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
    saved = [step for step in range(1, 13) if flash.maybe_save(step, state)]
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
