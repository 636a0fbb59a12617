"""FlashCheckpointer.continue_from: training resumed from elsewhere (a regular checkpoint file) at an older
step than the flash tier holds; the newer steps are an abandoned timeline in every tier."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import stalwart as sw


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), value), "step": torch.tensor(int(value))}


def test_continue_from_an_older_step_forgets_newer_steps_in_every_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, durable = tmp_path / "flash", tmp_path / "durable"
    flash = sw.FlashCheckpointer("cont", root=root, durable=durable, durable_every_n_steps=1, keep=10)
    for step in range(1, 6):
        flash.save(step, _state(step))
    flash.wait()

    with caplog.at_level(logging.WARNING, logger="stalwart.flash"):
        assert flash.continue_from(2) == [3, 4, 5]
    warned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(warned) == 1 and "3, 4, 5" in warned[0] and "step 2" in warned[0], warned
    assert flash.layout.complete_steps(1) == [1, 2]
    for step in (3, 4):  # the new timeline saves the same step numbers again, in both tiers
        flash.save(step, _state(100 + step))
    flash.close()  # raises if a durable copy of the new timeline failed

    shutil.rmtree(flash.job_dir)  # tmpfs lost: only the durable copy remains
    again = sw.FlashCheckpointer("cont", root=root, durable=durable)
    restored: dict = {}
    assert again.restore(restored) == 4 and again.restored_from == "durable"
    assert torch.equal(restored["w"], _state(104)["w"])  # the new timeline's step 4
    again.close()


def test_continue_from_the_newest_step_or_later_forgets_nothing(tmp_path: Path) -> None:
    with sw.FlashCheckpointer("same", root=tmp_path) as flash:
        for step in (2, 4):
            flash.save(step, _state(step))
        assert flash.continue_from(4) == [] and flash.continue_from(9) == []
        assert flash.last_saved_step == 4
        flash.wait()
        assert flash.layout.complete_steps(1) == [2, 4]
        with pytest.raises(ValueError, match="use an int >= 0"):
            flash.continue_from(-1)
