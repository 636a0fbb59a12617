"""A preemption notice (SIGTERM) is answered by a flash save at the next step boundary and a clean stop;
the run records the attempt as preempted and the retry resumes from that step (issue 11)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flash_tasks
import pytest

import stalwart as sw
from stalwart.runtime.records import RunRecords

HERE = Path(__file__).resolve().parents[1] / "support"


def _steps_done(progress: Path) -> int:
    """The step a slow task wrote last; read once: the task truncates the file before each write."""
    text = progress.read_text().strip() if progress.exists() else ""
    return int(text) if text else 0


def _weights_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.equal(y) for x, y in zip(a, b, strict=True))


def test_sigterm_mid_step_saves_that_step_and_the_retry_resumes_from_it(stalwart_home: Path) -> None:
    twin = sw.run(flash_tasks.train, steps=10).output
    run = sw.run(flash_tasks.train, steps=10, term_in=7)  # every_n_steps=2: step 7 is not a regular save
    assert [a.status for a in run.attempts] == ["preempted", "succeeded"]
    assert "preempted by SIGTERM: step 7 saved to flash, its replicas and durable" in (
        run.attempts[0].error or ""
    )
    assert run.output["start"] == 7 and run.output["restored_from"] == "flash"
    assert _weights_equal(run.output["weights"], twin["weights"])  # bit-exact: nothing lost, nothing redone


def test_sigterm_to_the_runner_reaches_the_attempt_and_the_same_run_id_resumes(
    stalwart_home: Path, tmp_path: Path
) -> None:
    """What Kubernetes does to a pod: SIGTERM to its main process, `stalwart run`."""
    progress = tmp_path / "progress"
    command = [sys.executable, "-m", "stalwart.cli", "run", str(HERE / "flash_tasks.py"), "slow_train"]
    command += ["--steps", "400", "--progress", str(progress), "--run-id", "preempted-run"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _steps_done(progress) < 5:
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 143, err
    assert "was preempted (SIGTERM) during attempt 0" in err
    records = RunRecords(stalwart_home / "runs.db")
    assert records.get_run("preempted-run").status == "preempted"
    (attempt,) = records.attempts("preempted-run")
    assert attempt.status == "preempted"
    saved = int(attempt.error.split("step ")[1].split(" ")[0])
    assert saved >= 5

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert records.get_run("preempted-run").status == "succeeded"
    assert [a.status for a in records.attempts("preempted-run")] == ["preempted", "succeeded"]
    # resumed from the preemption save, and every step done exactly once
    assert f"'start': {saved}, 'restored_from': 'flash', 'w': 400.0" in again.stdout, again.stdout


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        import stalwart as sw
        root = {str(tmp_path / "flash")!r}
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_outside_a_task_the_loop_needs_no_code_and_the_process_exits_143(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        """
        flash = sw.FlashCheckpointer("job", root=root, every_n_steps=100, async_save=False)
        state = {"w": torch.zeros(8)}
        for step in range(1, 1000):
            state["w"] += 1
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            flash.maybe_save(step, state)
        print("never reached")
        """,
    )
    assert done.returncode == 143, done.stderr
    assert "never reached" not in done.stdout
    flash = sw.FlashCheckpointer("job", root=tmp_path / "flash", save_on_preemption=False)
    assert flash.steps() == {"flash": [3]}  # the step boundary right after the notice, not a multiple of 100
    flash.close()


def test_opting_out_leaves_sigterm_as_it_was(tmp_path: Path) -> None:
    done = _script(
        tmp_path,
        """
        flash = sw.FlashCheckpointer("job", root=root, save_on_preemption=False)
        flash.save(1, {"w": torch.zeros(8)})
        flash.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived")
        """,
    )
    assert done.returncode == -signal.SIGTERM and "survived" not in done.stdout


def test_a_grace_period_shorter_than_one_save_is_said_at_the_first_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    flash = sw.FlashCheckpointer("job", root=tmp_path, grace_period=1e-9, async_save=False)
    with caplog.at_level("WARNING", logger="stalwart.flash"):
        flash.save(1, {"w": torch.zeros(1 << 16)})
        flash.save(2, {"w": torch.zeros(1 << 16)})
    said = [r.getMessage() for r in caplog.records if "grace_period" in r.getMessage()]
    assert len(said) == 1 and "longer than grace_period=0 s" in said[0], said
    flash.close()


@pytest.mark.parametrize("bad", [0, -1.0, True, "30"])
def test_bad_grace_periods_say_what_is_accepted(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match=r"grace_period=.* is not accepted; use the seconds"):
        sw.FlashCheckpointer("job", root=tmp_path, grace_period=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="save_on_preemption='yes'"):
        sw.FlashCheckpointer("job", root=tmp_path, save_on_preemption="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grace_period=.* is not accepted; use the seconds"):
        sw.FlashStorageWriter("job", root=tmp_path, grace_period=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="save_on_preemption='yes'"):
        sw.FlashStorageWriter("job", root=tmp_path, save_on_preemption="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"step=-1 is not accepted"):
        sw.FlashStorageWriter("job", root=tmp_path).preempted(-1)


def test_a_forked_child_is_stopped_by_sigterm_as_before(tmp_path: Path) -> None:
    """DataLoader workers are forked from the training process: they must not inherit the handler,
    or their parent could not stop them."""
    done = _script(
        tmp_path,
        """
        import time
        flash = sw.FlashCheckpointer("job", root=root)
        ready, tell = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker started at once, as DataLoader's are; it is stopped much later
            os.write(tell, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print("child", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
        """,
    )
    assert "child True" in done.stdout, done.stderr


def _two_ranks_one_preempted(worker_name: str, tmp_path: Path) -> list[dict]:
    """Run ``preemption_workers.<worker_name>`` as two spawned gloo ranks (rank 1 gets SIGTERM); both
    must stop with 143. Their reports."""
    import multiprocessing

    import preemption_workers
    from processes import run_all

    from stalwart.testing.cluster import free_port

    root, out = tmp_path / "flash", tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    target = getattr(preemption_workers, worker_name)
    args = (2, free_port(), str(root), str(out))
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(2)]
    run_all(procs, 180, "ranks")
    assert [p.exitcode for p in procs] == [143, 143]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_a_node_preempted_alone_stops_every_rank_at_one_saved_step(tmp_path: Path) -> None:
    """Only rank 1 gets SIGTERM (its node is reclaimed, the other is not): the ranks agree on the step
    after its notice through the job's store, both save it (a whole step) and stop with code 143,
    instead of rank 0 failing in its next collective with nothing saved."""
    from stalwart.flash.layout import FlashLayout

    reports = _two_ranks_one_preempted("one_rank_gets_sigterm", tmp_path)
    assert reports[0]["stopped"] == reports[1]["stopped"] == 6, reports  # the step after rank 1's notice
    assert 6 in FlashLayout(tmp_path / "flash", "job").complete_steps(2)  # every rank saved it: whole


@pytest.mark.parametrize("worker", ["dcp_rank_gets_sigterm", "dcp_rank_gets_sigterm_at_a_regular_save"])
def test_the_dcp_writer_saves_the_step_after_a_notice_on_one_rank_and_stops_every_rank(
    tmp_path: Path, worker: str
) -> None:
    """The DCP path: a loop that asks ``writer.preempted(step)`` at each boundary saves the agreed step
    through ``dcp.save`` on every rank (with its durable copy, though its regular interval is 100; a
    step the loop saved anyway is not saved twice but copied to the durable store), and every rank
    stops with 143; a new reader loads that step bit-exactly."""
    from stalwart.flash.durable import DurableTier

    reports = _two_ranks_one_preempted(worker, tmp_path)
    assert reports[0]["stopped"] == reports[1]["stopped"] == 6, reports
    assert all(r["loaded"] == r["saved"] for r in reports), reports
    assert DurableTier((tmp_path / "durable").as_uri()).complete_steps(2) == [6]


def test_sigterm_to_a_torch_elastic_agent_is_a_preemption_and_the_retry_resumes(
    stalwart_home: Path, tmp_path: Path
) -> None:
    """What Kubernetes does to a pod whose main process is the torch elastic agent: SIGTERM to the agent
    alone. It passes the signal to its workers, which save one step and stop; the attempt is recorded as
    preempted (not as the agent's SignalException) and the retry resumes from that step."""
    import psutil

    progress = tmp_path / "progress"
    command = [sys.executable, "-m", "stalwart.cli", "run", str(HERE / "elastic_tasks.py"), "slow_ddp"]
    command += ["--steps", "300", "--progress", str(progress), "--run-id", "agent-preempted"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _steps_done(progress) < 5:
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.05)
    (agent,) = psutil.Process(runner.pid).children()  # the attempt process runs the agent
    assert len(agent.children()) == 2  # its two workers
    agent.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=180)
    assert runner.returncode == 0, err
    assert "SignalException" not in err, err
    records = RunRecords(stalwart_home / "runs.db")
    first, second = records.attempts("agent-preempted")
    assert (first.status, second.status) == ("preempted", "succeeded")
    assert "the torch elastic agent got SIGTERM and passed it to its workers" in (first.error or "")
    saved = int(first.error.split("step ")[1].split(" ")[0])
    assert saved >= 5
    # resumed from the preemption save; each step adds 2 (an all_reduce over 2 ranks): none lost or redone
    assert f"'start': {saved}, 'restored_from': 'flash', 'w': 600.0" in out, out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, "step=-1 is not accepted; use an int >= 0"),
        ({"step": True}, "step=True is not accepted"),
        ({"step": 3, "world_size": 0}, r"world_size=0 is not accepted; use an int >= 1 or None"),
        ({"step": 3, "world_size": "2"}, "world_size='2' is not accepted"),
    ],
)
def test_asking_whether_to_stop_with_bad_values_says_what_is_accepted(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    flash = sw.FlashCheckpointer("asks", root=tmp_path)
    with pytest.raises(ValueError, match=message):
        flash.preempted(**kwargs)
    assert flash.preempted(3, world_size=1) is False  # no SIGTERM in this process
    flash.close()
