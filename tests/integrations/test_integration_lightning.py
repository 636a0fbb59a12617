"""Lightning: the flash callback and CheckpointIO, and a killed training that resumes bit-exactly."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import pytest
import torch

import stalwart as sw

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec")  # a deprecation inside Lightning


@pytest.fixture
def lt() -> Iterator[ModuleType]:
    """The Lightning task module; the test process keeps its torch settings (Lightning's
    ``deterministic=True`` switches deterministic algorithms on for the whole process)."""
    pytest.importorskip("lightning")
    import lightning_tasks

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield lightning_tasks
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_import_stalwart_loads_no_framework() -> None:
    code = (
        "import sys, stalwart, stalwart.integrations\n"
        "stalwart.FlashCheckpointer, stalwart.Checkpoint\n"
        "loaded = {'lightning', 'pytorch_lightning', 'transformers', 'accelerate'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_killed_training_resumes_bit_exactly_from_flash_then_durable_then_task_checkpoint(
    stalwart_home: Path, lt: ModuleType
) -> None:
    twin = lt.uninterrupted(max_steps=60)
    run = sw.run(lt.fit, max_steps=60, crashes="35,47,52")
    assert [a.status for a in run.attempts] == ["killed", "killed", "killed", "succeeded"]
    assert run.output["resumes"] == [
        ["0", "None", "None"],
        ["1", "flash", "35"],  # tmpfs of the same machine
        ["2", "durable", "45"],  # tmpfs lost: the durable copy, newer than ModelCheckpoint's step 40
        ["3", "task", "40"],  # durable copy and local files lost too: the task checkpoint
    ]
    assert run.output["global_step"] == 60
    assert _equal(run.output["weights"], twin)


def test_skip_rule_async_regular_files_and_enabled_false(tmp_path: Path, lt: ModuleType) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from stalwart.integrations.lightning import FlashCheckpointCallback, FlashCheckpointIO

    flash = sw.FlashCheckpointer("skip", root=tmp_path / "flash", keep=20)
    regular = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    callback = FlashCheckpointCallback(flash, every_n_steps=2, skip_every_n_steps=6)
    plugins = [FlashCheckpointIO(flash, AsyncCheckpointIO())]  # regular files written by a thread
    trainer = lt.make_trainer(12, [callback, regular], plugins=plugins)
    trainer.fit(lt.Regressor())
    flash.wait()
    assert flash.layout.complete_steps(1) == [2, 4, 8, 10]  # not 6 and 12: ModelCheckpoint saved those
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=0-step=12.ckpt", "epoch=0-step=6.ckpt"]  # through the wrapped async IO
    assert [callback.should_save(s) for s in (0, 2, 3, 6, 12, 14)] == [False, True, False, False, False, True]

    off = sw.FlashCheckpointer("off", root=tmp_path / "flash")
    disabled = FlashCheckpointCallback(off, every_n_steps=2, enabled=False)
    trainer = lt.make_trainer(6, [disabled], default_root_dir=tmp_path / "off")
    trainer.fit(lt.Regressor())
    assert off.layout.steps() == [] and not isinstance(trainer.strategy.checkpoint_io, FlashCheckpointIO)
    with pytest.raises(ValueError, match="skip_every_n_steps=0"):
        FlashCheckpointCallback(off, skip_every_n_steps=0)


def test_resume_without_a_trainer_writes_a_ckpt_file(tmp_path: Path, lt: ModuleType) -> None:
    from stalwart.integrations.lightning import FlashCheckpointCallback, resume_checkpoint

    twin = lt.uninterrupted(max_steps=20)
    torch.manual_seed(0)
    first = sw.FlashCheckpointer("first", root=tmp_path / "flash")
    callbacks = [FlashCheckpointCallback(first, every_n_steps=5)]
    lt.make_trainer(10, callbacks, enable_checkpointing=False).fit(lt.Regressor())
    first.close()

    again = sw.FlashCheckpointer("first", root=tmp_path / "flash")
    point = resume_checkpoint(flash=again, materialize_dir=tmp_path / "resume")
    assert (point.source, point.step) == ("flash", 10) and Path(point).is_file()
    assert Path(point).parent == tmp_path / "resume"
    model = lt.Regressor()
    callbacks = [FlashCheckpointCallback(sw.FlashCheckpointer("second", root=tmp_path / "flash"))]
    lt.make_trainer(20, callbacks, enable_checkpointing=False).fit(model, ckpt_path=point)
    assert _equal([p.detach() for p in model.parameters()], twin)


def test_objects_the_flash_tier_refuses_travel_pickled(tmp_path: Path) -> None:
    from stalwart.integrations.state import decode_checkpoint, encode_checkpoint

    checkpoint = {
        "state_dict": {"w": torch.arange(4.0)},
        "hyper_parameters": {"ratio": Fraction(1, 3), "name": "x", "sizes": (1, 2)},
        "global_step": 7,
    }
    encoded = encode_checkpoint(checkpoint)
    assert encoded["hyper_parameters"]["ratio"] == {"__stalwart_pickled__": 0}
    with sw.FlashCheckpointer("objects", root=tmp_path) as flash:
        flash.save(7, encoded)
        flash.wait()
        restored: dict = {}
        assert flash.restore(restored) == 7
    with pytest.raises(RuntimeError, match="weights_only=False"):
        decode_checkpoint(dict(restored), weights_only=True)
    decoded = decode_checkpoint(restored, weights_only=False)
    assert decoded["hyper_parameters"] == checkpoint["hyper_parameters"]
    assert torch.equal(decoded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert "__stalwart_pickled__" not in decoded and decoded["global_step"] == 7


def test_a_resume_point_is_a_path_string_that_says_where_it_came_from() -> None:
    from stalwart.integrations import ResumePoint

    point = ResumePoint(Path("/flash/job/steps/step-000000000003"), "durable", 3)
    assert point == "/flash/job/steps/step-000000000003" and isinstance(point, str)
    copied = pickle.loads(pickle.dumps(point))
    assert (copied.source, copied.step) == ("durable", 3) and "durable" in repr(copied)
    with pytest.raises(ValueError, match="source='disk' is not accepted"):
        ResumePoint("/x", "disk", 1)


def test_example_is_killed_and_resumes_from_flash(run_example) -> None:
    pytest.importorskip("lightning")
    proc = run_example("lightning_resume.py")
    assert "attempt 0: step 96 is in the flash tier; simulating a crash (SIGKILL)" in proc.stdout
    assert "attempt 1: resuming at step 96 from the flash tier" in proc.stdout
    assert "attempt 1: finished at step 160" in proc.stdout and "succeeded" in proc.stdout


def test_sigterm_saves_that_step_through_the_callback_and_the_retry_resumes_bit_exactly(
    stalwart_home: Path, lt: ModuleType
) -> None:
    twin = lt.uninterrupted(max_steps=30)
    run = sw.run(lt.fit_preempted, max_steps=30, term_at=12)
    assert [a.status for a in run.attempts] == ["preempted", "succeeded"]
    assert "step 13 saved to flash" in (run.attempts[0].error or "")
    assert run.output["resumed"] == ["flash", 13]
    assert _equal(run.output["weights"], twin)


def test_figures_reach_the_lightning_logger_after_a_crash(stalwart_home: Path, lt: ModuleType) -> None:
    """Saves, the restore (tier, step, time) and the steps the crash threw away land in the CSV log."""
    import csv

    run = sw.run(lt.fit_logged, max_steps=30, crash_at=23)
    assert [a.status for a in run.attempts] == ["killed", "succeeded"]
    rows = list(csv.DictReader((Path(run.output) / "metrics.csv").read_text().splitlines()))
    restore = [r for r in rows if r.get("stalwart/restore_step")]
    assert len(restore) == 1, restore
    assert float(restore[0]["stalwart/restore_step"]) == 20  # the newest flash step before step 23
    assert float(restore[0]["stalwart/restore_source"]) == 0  # flash: this machine's tmpfs
    assert float(restore[0]["stalwart/steps_lost"]) == 3  # steps 21, 22 and 23, trained again
    assert float(restore[0]["stalwart/restore_ms"]) > 0
    saves = {int(r["step"]): r for r in rows if r.get("stalwart/save_blocked_ms")}
    assert sorted(saves) == [25, 30]  # this attempt's saves, each logged at its step
    assert all(
        float(r["stalwart/save_blocked_ms"]) > 0 and float(r["stalwart/save_mb"]) > 0 for r in saves.values()
    )


def test_log_metrics_false_logs_nothing_and_bad_values_are_refused(tmp_path: Path, lt: ModuleType) -> None:
    from stalwart.integrations.lightning import FlashCheckpointCallback

    flash = sw.FlashCheckpointer("log-off", root=tmp_path)
    assert FlashCheckpointCallback(flash, log_metrics=False).figures is None
    with pytest.raises(ValueError, match="log_metrics='yes' is not accepted; use True or False"):
        FlashCheckpointCallback(flash, log_metrics="yes")  # type: ignore[arg-type]
    flash.close()
