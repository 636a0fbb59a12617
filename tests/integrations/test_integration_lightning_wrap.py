"""Lightning's one call (``wrap_trainer``): killed trainings resume bit-exactly, alone or under DDP."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import stalwart as sw

pl = pytest.importorskip("lightning.pytorch")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*treespec"),  # a deprecation inside Lightning
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),  # deliberately
]

TESTS = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture
def lt() -> Iterator[ModuleType]:
    """The Lightning task module; the test process keeps its torch settings."""
    import lightning_tasks

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield lightning_tasks
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_process_killed_by_sigkill_resumes_bit_exactly_from_flash_with_the_one_call(
    tmp_path: Path, lt: ModuleType
) -> None:
    """The training dies by SIGKILL in a process of its own (outside any stalwart task); the test
    process resumes it with the same script, which starts with the same one call."""
    import lightning_wrap_tasks

    twin = lt.uninterrupted(max_steps=60)
    ckpt_dir, out = tmp_path / "ckpt", tmp_path / "out.pt"
    base = tmp_path / "shm" / "job-145"  # the job's flash directory: the job id is its name
    env = {k: v for k, v in os.environ.items() if not k.startswith("STALWART_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    script = [sys.executable, str(TESTS / "lightning_wrap_tasks.py")]
    args = [str(base), str(ckpt_dir), "60", "35", str(out)]  # flash 5..35 but 20, a file at 20
    proc = subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=1-step=20.ckpt"]

    lightning_wrap_tasks.main(str(base), str(ckpt_dir), 60, 0, str(out))
    resumes = [json.loads(line) for line in Path(f"{out}.resumes").read_text().splitlines()]
    assert resumes == [None, ["flash", 35]]
    result = torch.load(out, weights_only=True)
    assert result["global_step"] == 60
    assert _equal(result["weights"], twin)


def test_two_ddp_processes_resume_with_the_one_call_after_rank_zero_is_killed(
    stalwart_home: Path, lt: ModuleType
) -> None:
    """Both ranks read the same batches, so DDP's averaged gradients equal one process's: the
    uninterrupted single-process run is the twin of the DDP run."""
    import lightning_wrap_tasks

    twin = lt.uninterrupted(max_steps=60)
    run = sw.run(lightning_wrap_tasks.ddp_fit, max_steps=60, crash_at=35)
    assert [a.status for a in run.attempts] == ["succeeded"]
    ranks = [torch.load(stalwart_home / f"ddp-rank-{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, result in enumerate(ranks):
        assert (result["rank"], result["restarts"]) == (rank, 1)
        assert result["resumed"] == ["flash", 35]  # rank 0 chose, rank 1 was told
        assert result["global_step"] == 60
        assert _equal(result["weights"], twin), f"rank {rank}"
    assert run.output["resumed"] == ["flash", 35]


def test_an_error_on_rank_zero_while_it_chooses_is_raised_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 chooses (and loads a flash state) for all ranks: if it fails, no rank waits for its answer."""
    import rank_zero_worker
    from processes import run_all

    from stalwart.testing.cluster import free_port

    spawn, port = multiprocessing.get_context("spawn"), free_port()
    procs = [
        spawn.Process(target=rank_zero_worker.ask, args=(rank, port, str(tmp_path)), daemon=True)
        for rank in (0, 1)
    ]
    run_all(procs, 240, "rank processes")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["got"] for r in results] == [{"step": 35, "rank": 0}] * 2  # rank 0's value on both
    failure = "ZeroDivisionError: division by zero"
    assert results[0]["raised"] == failure
    assert results[1]["raised"] == (
        f"RuntimeError: rank 0 could not obtain the checkpoint to resume from: {failure}"
    )


def test_bad_inputs_are_refused_clearly_and_leave_the_trainer_untouched(
    tmp_path: Path, lt: ModuleType
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stalwart.integrations.lightning import FlashCheckpointCallback, FlashCheckpointIO, wrap_trainer

    base = tmp_path / "shm" / "job-1"

    def trainer(**kwargs: object) -> pl.Trainer:
        return lt.make_trainer(10, [], enable_checkpointing=False, **kwargs)

    fresh = trainer()
    bad = [
        ((object(),), {"every_n_steps": 5}, TypeError, "use a lightning.pytorch.Trainer"),
        ((fresh, base), {"job_id": "job-1", "every_n_steps": 5}, ValueError, "not both"),
        ((fresh,), {"every_n_steps": 5}, ValueError, "outside a stalwart task, give base="),
        ((fresh, tmp_path / "a b"), {"every_n_steps": 5}, ValueError, "its last part 'a b' is the job id"),
        ((fresh, "/"), {"every_n_steps": 5}, ValueError, "its last part '' is the job id"),
        ((fresh, ""), {"every_n_steps": 5}, ValueError, "base='' is not accepted"),
        ((fresh, 7), {"every_n_steps": 5}, ValueError, "base=7 is not accepted"),
        ((fresh,), {"job_id": "../x", "every_n_steps": 5}, ValueError, "job_id='../x' is not accepted"),
        ((fresh, base), {"every_n_steps": 0}, ValueError, "every_n_steps=0 is not accepted"),
        ((fresh, base), {"every_n_steps": True}, ValueError, "every_n_steps=True is not accepted"),
        ((fresh, base), {"every_n_steps": 5, "skip_every_n_steps": 0}, ValueError, "skip_every_n_steps=0"),
        ((fresh, base), {"every_n_steps": 5, "async_save": "yes"}, ValueError, "async_save='yes'"),
        ((fresh, base), {"every_n_steps": 5, "threads": 0}, ValueError, "threads=0 is not accepted"),
        ((fresh, base), {"every_n_steps": 5, "rank": 1}, TypeError, "no rank or world_size"),
        ((fresh, base), {"every_n_steps": 5, "durable_every_n_steps": 10}, ValueError, "needs durable="),
    ]
    for args, kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            wrap_trainer(*args, **kwargs)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'every_n_steps'"):
        wrap_trainer(fresh, base)  # type: ignore[call-arg]
    assert not any(isinstance(c, FlashCheckpointCallback) for c in fresh.callbacks)
    assert not isinstance(fresh.strategy.checkpoint_io, FlashCheckpointIO)
    assert not base.exists()

    # once per trainer: a second call, or a trainer given the pieces by hand, is refused
    assert wrap_trainer(fresh, base, every_n_steps=5) is None
    with pytest.raises(RuntimeError, match="call wrap_trainer once per trainer"):
        wrap_trainer(fresh, base, every_n_steps=5)
    flash = sw.FlashCheckpointer("by-hand", root=tmp_path / "shm")
    by_hand = lt.make_trainer(10, [FlashCheckpointCallback(flash)], enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="call wrap_trainer once per trainer"):
        wrap_trainer(by_hand, tmp_path / "shm" / "other", every_n_steps=5)
    fresh.strategy.checkpoint_io.flash.close()

    # several processes that Lightning would start itself in fit(): they cannot agree before it
    spawned = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="start them before \\(torchrun"):
        wrap_trainer(spawned, base, every_n_steps=5)

    # a ModelCheckpoint with no directory yet: its files cannot be found when choosing where to resume
    unplaced = lt.make_trainer(10, [ModelCheckpoint(every_n_train_steps=5)])
    with pytest.warns(UserWarning, match="ModelCheckpoint has no dirpath yet"):
        wrap_trainer(unplaced, tmp_path / "shm" / "job-2", every_n_steps=5)
    unplaced.strategy.checkpoint_io.flash.close()


def test_when_the_flash_root_is_wiped_the_one_call_resumes_bit_exactly_from_the_newest_file(
    tmp_path: Path, lt: ModuleType
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stalwart.integrations.lightning import FlashCheckpointCallback, wrap_trainer

    twin = lt.uninterrupted(max_steps=12)
    root, ckpt_dir = tmp_path / "shm", tmp_path / "ckpt"

    def trainer(max_steps: int) -> pl.Trainer:
        return lt.make_trainer(max_steps, [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4)])

    first = trainer(10)  # stops at 10 as if killed: flash at 3, 6, 9 and files at 4, 8
    assert wrap_trainer(first, root / "job", every_n_steps=3) is None
    kinds = [type(c) for c in first.callbacks]
    assert kinds.index(FlashCheckpointCallback) < kinds.index(ModelCheckpoint)  # a step's flash save first
    torch.manual_seed(0)
    first.fit(lt.Regressor())
    first.strategy.checkpoint_io.flash.close()

    newer = trainer(12)
    point = wrap_trainer(newer, root / "job", every_n_steps=3)
    assert (point.source, point.step) == ("flash", 9)  # newer than the file at 8
    newer.strategy.checkpoint_io.flash.close()

    shutil.rmtree(root)
    wiped = trainer(12)
    point = wrap_trainer(wiped, root / "job", every_n_steps=3)
    assert (point.source, point.step) == ("checkpoint", 8)
    assert Path(point) == ckpt_dir / "epoch=0-step=8.ckpt"
    model = lt.Regressor()
    wiped.fit(model, ckpt_path=point)
    wiped.strategy.checkpoint_io.flash.close()
    assert _equal([p.detach() for p in model.parameters()], twin)


def test_two_ddp_processes_stop_together_when_one_is_preempted_and_resume_bit_exactly(
    stalwart_home: Path, lt: ModuleType
) -> None:
    """SIGTERM reaches rank 1 only (its node is preempted): both ranks save that step and stop, the
    attempt is recorded as preempted, and the retry resumes both from it."""
    import lightning_wrap_tasks

    twin = lt.uninterrupted(max_steps=40)
    run = sw.run(lightning_wrap_tasks.ddp_fit_preempted, max_steps=40, term_at=22)
    assert [a.status for a in run.attempts] == ["preempted", "succeeded"], run.attempts[0].error
    assert "step 23 saved to flash" in (run.attempts[0].error or "") or "step 23 saved by" in (
        run.attempts[0].error or ""
    )
    ranks = [torch.load(stalwart_home / f"ddp-preempted-rank-{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, result in enumerate(ranks):
        assert result["resumed"] == ["flash", 23], f"rank {rank}"
        assert result["global_step"] == 40
        assert _equal(result["weights"], twin), f"rank {rank}"
