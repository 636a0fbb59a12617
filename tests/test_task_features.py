"""Task features that real Flyte SDK programs use: ``Timeout`` per attempt and for the whole run, the
errors a failed run raises (``RuntimeUserError``, ``RuntimeSystemError``, ``OOMError``,
``NonRecoverableError``), ``ctx()`` of an elastic worker, ``timedelta`` backoffs, and a nested task
that keeps its own retries."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from pathlib import Path

import pytest
import runner_tasks as tasks

import stalwart as sw
from stalwart.runtime import runner


def _run(task: sw.Task, *args: object) -> sw.Run:
    return sw.with_runcontext(echo=False).run(task, *args)


def test_an_attempt_past_its_limit_is_stopped_and_retried(stalwart_home: Path) -> None:
    started = time.monotonic()
    with pytest.raises(sw.errors.MaxRuntimeExceededError, match="ran longer than its 1 s limit") as info:
        _run(tasks.sleeps_past_its_limit)
    assert time.monotonic() - started < 30  # not the task's 60 s sleep, twice
    assert [a.status for a in info.value.run.attempts] == ["timed_out", "timed_out"]
    assert isinstance(info.value, sw.RuntimeUserError) and info.value.kind == "user"
    assert info.value.code == "MaxRuntimeExceededError"


def test_the_retry_after_a_timeout_can_succeed(stalwart_home: Path) -> None:
    run = _run(tasks.slow_first_attempt)
    assert run.output == 1  # ctx().attempt_number of the attempt that returned
    assert [a.status for a in run.attempts] == ["timed_out", "succeeded"]


def test_the_deadline_stops_the_run_and_no_retry_follows(stalwart_home: Path) -> None:
    started = time.monotonic()
    with pytest.raises(sw.errors.DeadlineExceededError, match="deadline") as info:
        _run(tasks.sleeps_past_the_deadline)
    assert 3 <= time.monotonic() - started < 30
    assert [a.status for a in info.value.run.attempts] == ["timed_out"]  # 20 retries allowed, none ran


def test_a_training_stopped_at_its_limit_saves_its_step_and_the_retry_resumes_there(
    stalwart_home: Path,
) -> None:
    """The runner tells an attempt past its limit to stop with SIGTERM, as Kubernetes would: the flash
    checkpointer saves the step it reached (not a multiple of its interval of 1000), so the retry
    loses nothing."""
    run = _run(tasks.trains_past_its_limit, 300)
    assert [a.status for a in run.attempts] == ["timed_out", "succeeded"]
    assert run.output["attempt"] == 1 and 0 < run.output["resumed_at"] < 300, run.output
    assert run.output["w"] == [300.0] * 4  # every step counted once


def test_an_attempt_the_oom_killer_killed_raises_oom_error(
    stalwart_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = itertools.count()  # the cgroup's OOM kill count goes up across every attempt
    monkeypatch.setattr(runner, "oom_kill_count", lambda: next(counted))
    with pytest.raises(sw.OOMError, match="OOM killer") as info:
        _run(tasks.oom_killed)
    assert len(info.value.run.attempts) == 3 and isinstance(info.value, sw.RuntimeUserError)


def test_a_process_that_died_without_a_result_is_a_system_error(stalwart_home: Path) -> None:
    with pytest.raises(sw.RuntimeSystemError, match="exited with code 3") as info:
        _run(tasks.exits_badly)
    assert info.value.kind == "system" and not isinstance(info.value, sw.RuntimeUserError)


def test_an_exception_is_a_user_error_carrying_it(stalwart_home: Path) -> None:
    with pytest.raises(sw.RuntimeUserError) as info:
        _run(tasks.always_fails, "boom")
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(info.value, sw.RunFailedError)  # what callers caught before still catches it


def test_non_recoverable_error_is_the_non_retryable_error(stalwart_home: Path) -> None:
    assert sw.NonRecoverableError is sw.NonRetryableError is sw.errors.NonRecoverableError
    with pytest.raises(sw.RuntimeUserError, match="the input is wrong") as info:
        _run(tasks.raises_recoverable_no_more)
    assert len(info.value.run.attempts) == 1


def test_a_nested_task_keeps_its_own_retries(stalwart_home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "calls"
    assert _run(tasks.calls_a_flaky_task, str(marker)).output == 3  # failed twice, retried in place
    with pytest.raises(sw.RuntimeUserError, match="no retry helps") as info:
        _run(tasks.calls_a_refusing_task)
    assert len(info.value.run.attempts) == 1  # NonRetryableError: neither the nested nor the outer retries
    with pytest.raises(ConnectionError):  # outside a run a task is a plain function: no retries
        tasks.flaky_nested(str(tmp_path / "direct"))


def test_ctx_of_an_elastic_worker(stalwart_home: Path) -> None:
    assert _run(tasks.where_am_i).output == {
        "node_rank": 0,
        "nnodes": 1,
        "local_world_size": 2,
        "restart_attempt": 0,
        "attempt_number": 0,
        "world_size": 2,
    }


def test_timeouts_and_backoffs_take_timedelta_and_bad_values_say_what_is_accepted() -> None:
    assert sw.Backoff(base=timedelta(seconds=2), cap=timedelta(minutes=1)).delay(1) == 2.0
    assert tasks.add.override(timeout=5).timeout == sw.Timeout(max_runtime=5)
    assert tasks.add.timeout is None and tasks.slow_first_attempt.timeout.runtime_seconds == 6.0
    assert sw.Timeout(max_runtime=0).runtime_seconds is None  # 0 is no bound, as in the Flyte SDK
    sw.Timeout(max_queued_time=timedelta(minutes=5))  # accepted: a local run never queues
    with pytest.raises(ValueError, match=r"Timeout.max_runtime=-1 is not accepted; use seconds"):
        sw.Timeout(max_runtime=-1)

    def train() -> None: ...

    with pytest.raises(ValueError, match=r"timeout='1h' is not accepted; use seconds, a datetime.timedelta"):
        tasks.env.task(timeout="1h")(train)
    with pytest.raises(ValueError, match=r"Backoff.base=.* is not accepted; use a finite number of seconds"):
        sw.Backoff(base=float("nan"))


def test_a_misspelt_task_setting_is_refused_naming_what_is_accepted() -> None:
    env = sw.TaskEnvironment(name="settings")

    def work() -> int:
        return 1

    with pytest.raises(
        TypeError, match="task\\(\\) got an unexpected keyword argument 'retry'; it takes retries"
    ):
        env.task(retry=3)(work)  # type: ignore[call-arg]
    declared = env.task(retries=2, env_vars={"A": "1"})(work)
    with pytest.raises(TypeError, match="override\\(\\) got an unexpected keyword argument 'image'"):
        declared.override(image="x")  # type: ignore[call-arg]
    assert declared.override(retries=None).retries.count == 2  # None leaves it as it is
    assert dict(declared.override(env_vars={"B": "2"}).env_vars) == {"A": "1", "B": "2"}
