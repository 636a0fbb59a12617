"""The local runner: fresh process per attempt, retries, backoff, ctx(), logs and run records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import runner_tasks as tasks

import stalwart as sw
from stalwart.runtime.records import RunRecords


def store(home: Path) -> RunRecords:
    return RunRecords(home / "runs.db")


def test_success_returns_output_and_records_one_attempt(stalwart_home: Path) -> None:
    run = sw.run(tasks.add, 2, b=3)
    assert run.output == 5
    assert run.status == "succeeded"
    assert [a.status for a in run.attempts] == ["succeeded"]
    record = store(stalwart_home).get_run(run.id)
    assert record is not None and record.status == "succeeded" and record.task == "add"
    assert record.inputs == {"a": "2", "b": "3"}


def test_inputs_and_outputs_cross_processes(stalwart_home: Path) -> None:
    run = sw.run(tasks.scale, point=tasks.Point(2, 3), factor=4)
    assert run.output == tasks.Point(8, 12)


def test_each_attempt_is_a_fresh_process(stalwart_home: Path) -> None:
    pids = set()
    for _ in range(2):
        run = sw.run(tasks.add, 1)
        pids.add(run.attempts[0].pid)
    assert os.getpid() not in pids and len(pids) == 2


def test_exception_is_retried_then_surfaces_with_the_task_traceback(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError) as info:
        sw.run(tasks.always_fails, message="boom")
    error = info.value
    assert len(error.run.attempts) == 3  # retries=2
    assert all(a.status == "failed" for a in error.run.attempts)
    assert "ValueError: boom on attempt 2" in str(error)
    assert "always_fails" in str(error) and "runner_tasks.py" in str(error)  # the task's own frames
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "boom on attempt 2"
    assert "Traceback" in str(error.__cause__.__cause__)


def test_non_retryable_error_stops_retries(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError) as info:
        sw.run(tasks.refuses, message="bad config")
    assert len(info.value.run.attempts) == 1
    assert isinstance(info.value.__cause__, sw.NonRetryableError)


def test_sigkill_is_retried_and_ctx_shows_attempt_and_run(stalwart_home: Path) -> None:
    run = sw.run(tasks.killed_first, value=7)
    assert run.output == {"value": 7, "attempt": 1, "run_id": run.id, "task": "killed_first"}
    first, second = run.attempts
    assert first.status == "killed" and first.exit_code == -signal.SIGKILL
    assert "SIGKILL" in (first.error or "")
    assert second.status == "succeeded" and second.exit_code == 0
    # stdout and stderr of each attempt are kept
    for attempt in run.attempts:
        logs = Path(attempt.log_dir)
        assert f"stdout of attempt {attempt.number}" in (logs / "stdout.log").read_text()
        assert f"stderr of attempt {attempt.number}" in (logs / "stderr.log").read_text()
    kinds = [e.kind for e in store(stalwart_home).events(run.id)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_succeeded"
    assert kinds.count("attempt_started") == 2 and "attempt_killed" in kinds


def test_attempt_output_is_echoed(stalwart_home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sw.run(tasks.killed_first, value=1)
    out, err = capfd.readouterr()
    assert "stdout of attempt 0" in out and "stdout of attempt 1" in out
    assert "stderr of attempt 1" in err
    quiet = sw.with_runcontext(echo=False).run(tasks.killed_first, value=1)
    out, _ = capfd.readouterr()
    assert quiet.output["value"] == 1 and "stdout of attempt" not in out


def test_nonzero_exit_and_sys_exit_fail_the_attempt(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError, match="exited with code 3") as info:
        sw.run(tasks.exits_badly)
    assert [a.exit_code for a in info.value.run.attempts] == [3, 3]
    with pytest.raises(sw.RunFailedError, match=r"sys.exit\(0\)"):
        sw.run(tasks.exits_cleanly)


def test_backoff_is_honoured(stalwart_home: Path) -> None:
    run = sw.run(tasks.fails_twice)
    assert run.output == 2
    events = store(stalwart_home).events(run.id)
    assert [e.message for e in events if e.kind == "backoff"] == ["0.400 s", "0.600 s"]
    starts = [e.time for e in events if e.kind == "attempt_started"]
    ends = [e.time for e in events if e.kind == "attempt_failed"]
    assert starts[1] - ends[0] >= 0.4 and starts[2] - ends[1] >= 0.6


def test_env_vars_from_environment_task_and_override(stalwart_home: Path) -> None:
    assert sw.run(tasks.environment).output == {
        "FROM_ENV": "environment",
        "FROM_TASK": "task",
        "FROM_OVERRIDE": None,
    }
    overridden = tasks.environment.override(env_vars={"FROM_OVERRIDE": "yes"}, retries=2)
    assert overridden.retries.count == 2 and tasks.environment.retries.count == 0
    assert sw.run(overridden).output["FROM_OVERRIDE"] == "yes"


def test_calling_tasks_directly_just_runs_them(stalwart_home: Path) -> None:
    assert tasks.add(1, b=2) == 3
    assert tasks.calls_another(1) == 22
    assert sw.run(tasks.calls_another, 2).output == 24


def test_checkpoint_carries_state_across_attempts_and_resumed_runs(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError):  # 2 attempts count to 2 of 3
        sw.with_runcontext(run_id="count-to-three").run(tasks.resumable, total=3)
    run = sw.with_runcontext(run_id="count-to-three").run(tasks.resumable, total=3)
    assert run.output == 3
    assert [a.number for a in run.attempts] == [0, 1, 2]
    assert store(stalwart_home).get_run("count-to-three").status == "succeeded"
    with pytest.raises(ValueError, match="belongs to task 'resumable'"):
        sw.with_runcontext(run_id="count-to-three").run(tasks.add, 1)


def test_processes_started_by_a_dead_attempt_are_stopped(stalwart_home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    with pytest.raises(sw.RunFailedError, match="SIGKILL"):
        sw.run(tasks.leaves_a_child, marker=str(marker))
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_attempt_dies_with_its_runner(stalwart_home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "attempt.pid"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "support")!r})
        import stalwart, runner_tasks
        stalwart.run(runner_tasks.sleeps, marker={str(marker)!r})
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        attempt = int(marker.read_text())
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(attempt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(attempt)
    finally:
        runner.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its entry remains
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_unpicklable_output_fails_without_retry(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError, match="cannot be pickled") as info:
        sw.run(tasks.returns_unpicklable.override(retries=3))
    assert len(info.value.run.attempts) == 1


def test_bad_arguments_are_refused_clearly(stalwart_home: Path) -> None:
    with pytest.raises(TypeError, match=r"needs a task declared with @env\.task"):
        sw.run(lambda: 1)
    with pytest.raises(TypeError, match=r"inputs of task 'add' do not fit add\(a: int, b: int = 1\)"):
        sw.run(tasks.add, c=1)
    with pytest.raises(ValueError, match="cannot be pickled"):
        sw.run(tasks.scale, point=tasks.Unpicklable(), factor=1)
    with pytest.raises(ValueError, match="run_id='Bad Id'"):
        sw.with_runcontext(run_id="Bad Id")

    env = sw.TaskEnvironment(name="local")

    def outer() -> sw.Task:
        @env.task
        def inner() -> int:
            return 1

        return inner

    with pytest.raises(ValueError, match="defined inside a function"):
        sw.run(outer())


def test_run_at_import_time_is_refused_in_attempts(stalwart_home: Path, tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import stalwart as sw
            env = sw.TaskEnvironment(name="unguarded")

            @env.task(retries=3)
            def hello() -> str:
                return "hi"

            print("result:", sw.run(hello).output)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr
    assert "failed after 1 attempt" in proc.stderr  # not retried: it cannot succeed


def test_a_named_run_new_to_this_machine_continues_after_the_attempts_of_its_store(
    stalwart_home: Path, tmp_path: Path
) -> None:
    store = (tmp_path / "shared-store").as_uri()
    with pytest.raises(sw.RunFailedError):  # counts to 2 on "another machine" (its own home)
        sw.with_runcontext(run_id="moved", checkpoint_store=store, home=tmp_path / "pod-1").run(
            tasks.resumable, total=3
        )
    # a replacement pod: a fresh home, the same run id and store
    run = sw.with_runcontext(run_id="moved", checkpoint_store=store, home=tmp_path / "pod-2").run(
        tasks.resumable, total=3
    )
    assert run.output == 3 and [a.number for a in run.attempts] == [2]


def test_a_run_that_succeeded_returns_its_output_instead_of_running_again(
    stalwart_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "executions"
    first = sw.with_runcontext(run_id="done-once").run(tasks.touches, marker=str(marker))
    again = sw.with_runcontext(run_id="done-once").run(tasks.touches, marker=str(marker))
    assert marker.read_text().splitlines() == ["attempt 0"]  # the task body ran once
    assert again.status == "succeeded" and again.output == first.output == str(marker)
    assert [a.number for a in again.attempts] == [0]
    kinds = [e.kind for e in store(stalwart_home).events("done-once")]
    assert kinds.count("attempt_started") == 1 and kinds[-1] == "run_already_succeeded"

    forced = sw.with_runcontext(run_id="done-once", rerun=True).run(tasks.touches, marker=str(marker))
    assert marker.read_text().splitlines() == ["attempt 0", "attempt 1"]
    assert forced.status == "succeeded" and [a.number for a in forced.attempts] == [0, 1]


def test_the_output_of_a_succeeded_run_comes_back_as_the_object_it_was(stalwart_home: Path) -> None:
    first = sw.with_runcontext(run_id="point-once").run(tasks.scale, point=tasks.Point(1, 2), factor=3)
    again = sw.with_runcontext(run_id="point-once").run(tasks.scale, point=tasks.Point(1, 2), factor=3)
    assert again.output == first.output == tasks.Point(3, 6)
    with pytest.raises(ValueError, match=r"already succeeded with other inputs.*rerun=True"):
        sw.with_runcontext(run_id="point-once").run(tasks.scale, point=tasks.Point(1, 2), factor=4)


def test_inputs_that_differ_past_their_shown_part_are_other_inputs(stalwart_home: Path) -> None:
    """Run records show inputs cut at 200 characters; whether a rerun has the same inputs is decided on
    all of them (and a keyword or positional spelling of the same call is the same)."""
    long = "x" * 300
    first = sw.with_runcontext(run_id="long-inputs").run(tasks.echo, long + "a")
    assert (
        sw.with_runcontext(run_id="long-inputs").run(tasks.echo, text=long + "a", times=1).output
        == first.output
    )
    with pytest.raises(ValueError, match=r"already succeeded with other inputs"):
        sw.with_runcontext(run_id="long-inputs").run(tasks.echo, long + "b")


def test_a_succeeded_run_whose_output_file_is_gone_says_so(stalwart_home: Path, tmp_path: Path) -> None:
    first = sw.with_runcontext(run_id="gone-output").run(tasks.add, 1)
    result = Path(first.attempts[0].log_dir) / "result.pkl"
    result.unlink()
    with pytest.raises(FileNotFoundError, match=f"its output is no longer available: {result} is missing"):
        sw.with_runcontext(run_id="gone-output").run(tasks.add, 1)
    assert sw.with_runcontext(run_id="gone-output", rerun=True).run(tasks.add, 1).output == 2


def test_retry_messages_number_attempts_as_recorded_and_blame_no_oom_without_evidence(
    stalwart_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="stalwart"):
        run = sw.with_runcontext(echo=False).run(tasks.killed_first, value=1)
    first = run.attempts[0]
    assert first.error == "was killed by SIGKILL"  # a deliberate kill: no guess about the OOM killer
    retry = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    expected = "attempt 0 was killed by SIGKILL; retrying as attempt 1 (the last allowed is attempt 3)"
    assert retry == [f"run {run.id}: {expected}"]
    assert "OOM" not in caplog.text and " of 4" not in caplog.text
