"""Hugging Face Trainer: mirrored checkpoint-N directories, and a killed training that resumes bit-exactly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import stalwart as sw


@pytest.fixture
def ht() -> Iterator[ModuleType]:
    """The transformers task module, offline; the test process keeps its torch settings."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import hf_tasks

    threads = torch.get_num_threads()
    yield hf_tasks
    torch.set_num_threads(threads)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_killed_training_resumes_bit_exactly_from_flash_then_durable_then_task_checkpoint(
    stalwart_home: Path, tmp_path: Path, ht: ModuleType
) -> None:
    twin, twin_step = ht.uninterrupted(tmp_path / "twin", max_steps=50)
    run = sw.run(ht.train, max_steps=50, crashes="20,30,40")
    assert [a.status for a in run.attempts] == ["killed", "killed", "killed", "succeeded"]
    assert run.output["resumes"] == [
        ["0", "None", "None"],
        ["1", "flash", "20"],  # tmpfs of the same machine
        ["2", "durable", "30"],  # tmpfs lost: the durable copy (the output directory ties; flash goes first)
        ["3", "task", "40"],  # durable copy and output directory lost too: the task checkpoint
    ]
    assert run.output["global_step"] == twin_step == 50
    assert _equal(run.output["weights"], twin)


def test_mirror_then_resume_picks_the_newest_complete_directory(tmp_path: Path, ht: ModuleType) -> None:
    from stalwart.integrations.transformers import CheckpointMirrorCallback, resume_checkpoint

    out = tmp_path / "out"
    task = sw.Checkpoint((tmp_path / "task").as_uri(), attempt=0, path=tmp_path / "restore-0")
    flash = sw.FlashCheckpointer("hf", root=tmp_path / "flash", every_n_steps=20)
    torch.set_num_threads(1)
    ht.make_trainer(out, 30, [CheckpointMirrorCallback(task, flash)]).train()
    flash.close()
    assert [info.filename for info in task.list()] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    again = sw.FlashCheckpointer("hf", root=tmp_path / "flash")
    assert again.layout.complete_steps(1) == [20]  # flash takes the saves at multiples of its every_n_steps

    later = sw.Checkpoint(task.uri, attempt=1, path=tmp_path / "restore-1")
    point = resume_checkpoint(out, flash=again, checkpoint=later)
    assert (point.source, point.step) == ("checkpoint", 30)  # the newest complete directory is local

    (out / "checkpoint-30" / "trainer_state.json").unlink()  # as if killed while the Trainer wrote it
    point = resume_checkpoint(out, flash=again, checkpoint=later)
    assert (point.source, point.step) == ("task", 30) and Path(point) == out / "checkpoint-30"
    assert (out / "checkpoint-30" / "trainer_state.json").is_file()  # rebuilt whole from the task checkpoint

    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            (out / name / "trainer_state.json").unlink()
    point = resume_checkpoint(out, flash=again, checkpoint=False)
    assert (point.source, point.step) == ("flash", 20)
    assert sorted(os.listdir(out)) == ["checkpoint-10", "checkpoint-20"]  # step 30 was dropped: newer
    restored = {p.name: p.read_bytes() for p in (out / "checkpoint-20").iterdir()}
    assert "model.safetensors" in restored and "trainer_state.json" in restored
    again.close()


def test_two_ddp_processes_stop_together_when_one_is_preempted_and_resume_bit_exactly(
    stalwart_home: Path, ht: ModuleType
) -> None:
    """SIGTERM reaches rank 1 only, during step 14: it posts the next boundary, 15 (rank 0 may be past
    14's already), where both ranks stop once the main process saved it with every rank's RNG state;
    the retry resumes both, equal to an uninterrupted DDP run."""
    twin = sw.run(ht.ddp_train_preempted, max_steps=30, term_at=-1)
    run = sw.run(ht.ddp_train_preempted, max_steps=30, term_at=13)
    assert [a.status for a in run.attempts] == ["preempted", "succeeded"], run.attempts[0].error
    for rank in (0, 1):
        want = torch.load(stalwart_home / f"hf-ddp-{twin.id}-rank-{rank}.pt", weights_only=False)
        got = torch.load(stalwart_home / f"hf-ddp-{run.id}-rank-{rank}.pt", weights_only=False)
        assert got["resumed"] == ["flash", 15], f"rank {rank}: {got['resumed']}"
        assert got["global_step"] == 30
        assert _equal(got["weights"], want["weights"]), f"rank {rank}"


def test_example_is_killed_and_resumes_from_flash(run_example, ht: ModuleType) -> None:
    proc = run_example("transformers_resume.py")
    assert "attempt 0: checkpoint-40 is mirrored; simulating a crash (SIGKILL)" in proc.stdout
    assert "attempt 1: resuming at step 40 from the flash tier" in proc.stdout
    assert "attempt 1: finished at step 60" in proc.stdout and "succeeded" in proc.stdout


def test_sigterm_saves_that_step_through_the_mirror_and_the_retry_resumes_bit_exactly(
    stalwart_home: Path, tmp_path: Path, ht: ModuleType
) -> None:
    twin, _ = ht.uninterrupted(tmp_path / "twin", max_steps=30)
    run = sw.run(ht.train_preempted, max_steps=30, term_at=13)
    assert [a.status for a in run.attempts] == ["preempted", "succeeded"]
    assert "step 14 saved to flash" in (run.attempts[0].error or "")
    assert run.output["resumed"] == ["flash", 14]
    assert run.output["global_step"] == 30
    assert _equal(run.output["weights"], twin)


def test_figures_join_the_trainer_log_after_a_crash(stalwart_home: Path, ht: ModuleType) -> None:
    """The restore (tier, step, time), the steps the crash threw away and each save's blocked time reach
    the Trainer's log_history."""
    run = sw.run(ht.train_logged, max_steps=40, crash_at=24)
    assert [a.status for a in run.attempts] == ["killed", "succeeded"]
    history = run.output
    restores = [entry for entry in history if "stalwart/restore_step" in entry]
    assert len(restores) == 1, history
    first = restores[0]
    assert first["step"] == 25  # the first log after resuming from step 20
    assert first["stalwart/restore_step"] == 20
    assert first["stalwart/restore_source"] == 0  # flash
    assert first["stalwart/steps_lost"] == 4  # steps 21..24, trained again
    assert first["loss"] > 0  # the figures joined the Trainer's own entry
    saves = [entry["step"] for entry in history if "stalwart/save_blocked_ms" in entry]
    # Each save joins the next log (the Trainer logs, then saves): step 10's at 15 (attempt 0's, which
    # the checkpoint of step 20 carried over), 30's at 35, and 40's in the closing entry.
    assert saves == [15, 35, 40], history
