"""``stalwart.run``: each attempt of a task in a fresh process, retried, recorded.

A fresh process per attempt is what makes a segfault, ``kill -9`` or an OOM kill retryable like an
exception (DESIGN decision 6). The runner passes the inputs in a spec file, the run's identity in
environment variables, and reads the output or the exception back from a result file.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import pickle
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from .. import config
from ..atomic import write_atomic
from ..environment import Task
from ..errors import (
    DeadlineExceededError,
    MaxRuntimeExceededError,
    OOMError,
    RunFailedError,
    RuntimeSystemError,
    RuntimeUserError,
)
from ..flash.preemption import Preempted
from ..retry import NonRetryableError, RetryStrategy
from . import events
from .outcome import Outcome, load_output, oom_kill_count, read_outcome
from .processes import kill_tree
from .protocol import RESULT_FILE, SPEC_FILE, STDERR_FILE, STDOUT_FILE, AttemptSpec, loads
from .records import AttemptRecord, RunRecord, RunRecords

__all__ = ["Run", "RunFailedError", "RunOptions", "new_run_id", "run", "with_runcontext"]

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Run:
    """A finished run: its id, output and attempts."""

    id: str
    task: str
    status: str
    output: Any
    attempts: tuple[AttemptRecord, ...]
    checkpoint_uri: str
    home: Path


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in an attempt process."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RunOptions:
    """Per-run settings; ``with_runcontext(...).run(task, ...)`` uses them.

    - ``run_id``: name the run; an existing run id resumes that run (its checkpoints, next attempt number),
      and one that already succeeded is not run again: its recorded output comes back.
    - ``checkpoint_store``: fsspec URL under which the run's task checkpoints live.
    - ``storage_options``: fsspec options for that store (e.g. ``{"endpoint_url": ...}`` for S3).
    - ``home``: directory of run records and logs (default ``$STALWART_HOME`` or ``~/.stalwart``).
    - ``echo``: copy each attempt's stdout/stderr to this process's while it runs.
    - ``rerun``: start a new attempt even if the run already succeeded.
    """

    run_id: str | None = None
    checkpoint_store: str | None = None
    storage_options: dict | None = None
    home: str | os.PathLike | None = None
    echo: bool = True
    rerun: bool = False

    def __post_init__(self) -> None:
        if self.run_id is not None and (not isinstance(self.run_id, str) or not _RUN_ID.match(self.run_id)):
            raise ValueError(
                f"run_id={self.run_id!r} is not accepted; use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        if self.checkpoint_store is not None:
            config.check_store_url(self.checkpoint_store)
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options={self.storage_options!r} is not accepted; use a dict or None")
        if not isinstance(self.rerun, bool):
            raise ValueError(f"rerun={self.rerun!r} is not accepted; use True or False")

    def run(self, task: Task, /, *args: Any, **inputs: Any) -> Run:
        """Run ``task`` with these inputs; return the Run or raise RunFailedError."""
        return _Runner(self, task, args, inputs).run()


def with_runcontext(
    *,
    run_id: str | None = None,
    checkpoint_store: str | None = None,
    storage_options: dict | None = None,
    home: str | os.PathLike | None = None,
    echo: bool = True,
    rerun: bool = False,
) -> RunOptions:
    """Settings for the next run: ``stalwart.with_runcontext(run_id="exp-1").run(train, epochs=5)``."""
    return RunOptions(run_id, checkpoint_store, storage_options, home, echo, rerun)


def run(task: Task, /, *args: Any, **inputs: Any) -> Run:
    """Run ``task`` locally: each attempt in a fresh process, retried as the task declares.

    Returns the Run (``run.output`` is the task's return value); raises RunFailedError, with the
    task's traceback, when the retries are spent.
    """
    return RunOptions().run(task, *args, **inputs)


def new_run_id(task_name: str) -> str:
    """A fresh run id: the task's name as a slug plus 8 random hex digits (a valid Kubernetes name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", task_name.lower()).strip("-")[:40].strip("-") or "run"
    return f"{slug}-{secrets.token_hex(4)}"


class _Tail(threading.Thread):
    """Copies what an attempt writes to its log file to our stream, as it is written."""

    def __init__(self, path: Path, stream: TextIO, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.path, self.stream, self.done = path, stream, done

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(self.path, "rb") as fh:
            while True:
                finished = self.done.is_set()
                chunk = fh.read(65536)
                if chunk:
                    self._write(decoder.decode(chunk))
                elif finished:
                    self._write(decoder.decode(b"", final=True))
                    return
                else:
                    self.done.wait(0.05)

    def _write(self, text: str) -> None:
        if text:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # our own stream closed: the log file still has everything


class _Runner:
    def __init__(self, options: RunOptions, task: Task, args: tuple, inputs: dict) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"stalwart.run needs a task declared with @env.task; got {task!r}")
        if config.importing_task():
            raise NonRetryableError(
                "stalwart.run() was called while an attempt process imported the task's module; "
                'put the call under `if __name__ == "__main__":` so it runs only in the launching process'
            )
        try:
            task.signature.bind(*args, **inputs)
        except TypeError as exc:
            raise TypeError(
                f"inputs of task {task.name!r} do not fit {task.name}{task.signature}: {exc}"
            ) from None
        try:
            self.inputs_payload = pickle.dumps((args, inputs))
        except Exception as exc:
            raise ValueError(f"the inputs of task {task.name!r} cannot be pickled: {exc}") from exc
        self.options, self.task, self.args, self.inputs = options, task, args, inputs
        self.module, self.qualname, self.file = task.reference()
        self.home = Path(options.home).expanduser() if options.home else config.home()
        self.records = RunRecords(self.home / "runs.db")
        self.records.check()  # a damaged file is reported before any attempt, never worked around
        self._stopping = False  # SIGTERM came: no further attempt here

    def _stop(self) -> None:
        self._stopping = True

    def run(self) -> Run:
        retries = self.task.retries
        existing = self.records.get_run(self.options.run_id) if self.options.run_id else None
        if existing is not None and existing.task != self.task.name:
            raise ValueError(
                f"run {existing.id!r} belongs to task {existing.task!r}, not {self.task.name!r}; "
                "choose another run_id"
            )
        if existing is not None and existing.status == "succeeded" and not self.options.rerun:
            return self._already_succeeded(existing)
        if existing is not None and existing.checkpoint_uri:
            config.check_store_url(
                existing.checkpoint_uri, f"the checkpoint store of run {existing.id}", load=True
            )
        else:
            config.check_store_url(*self._store_base(), load=True)  # no attempt for a store no retry can fix
        run_id, checkpoint_uri, first = self._open_run(existing, retries)
        last = first + retries.max_attempts - 1  # attempt numbers as recorded, from 0
        timeout = self.task.timeout
        runtime = timeout.runtime_seconds if timeout else None
        deadline = timeout.deadline_seconds if timeout else None
        ends = time.monotonic() + deadline if deadline else None  # the run's deadline, if any
        outcome: Outcome | None = None
        ran = first  # the number of the newest attempt that ran
        for number in range(first, last + 1):
            if outcome is not None:
                delay = retries.delay(number - first)
                if ends is not None and time.monotonic() + delay >= ends:
                    outcome = _past_deadline(outcome, deadline)
                    break
                log.warning(
                    "run %s: attempt %d %s; retrying as attempt %d%s (the last allowed is attempt %d)",
                    run_id,
                    number - 1,
                    outcome.description,
                    number,
                    f" in {delay:.1f} s" if delay else "",
                    last,
                )
                if delay:
                    self.records.add_event(run_id, number, "backoff", f"{delay:.3f} s")
                    time.sleep(delay)
            limits = [(runtime, "max_runtime")] if runtime else []
            if ends is not None:
                limits.append((ends - time.monotonic(), "deadline"))
            outcome = self._attempt(run_id, number, checkpoint_uri, last + 1, min(limits, default=None))
            ran = number
            if self._stopping and not outcome.ok:  # this machine is going away: the next one resumes
                why = f"preempted (SIGTERM) during attempt {number}, which {outcome.description}"
                self.records.finish_run(run_id, "preempted", why)
                log.warning("run %s: %s; run it again (same run id) to resume", run_id, why)
                raise Preempted(f"run {run_id} was {why}")
            if outcome.ok:
                self.records.finish_run(run_id, "succeeded")
                return self._record(run_id, "succeeded", outcome.output)
            if not outcome.retryable:
                log.warning("run %s: attempt %d cannot succeed on a retry; not retrying", run_id, number)
                break
        assert outcome is not None
        self.records.finish_run(run_id, "failed", f"attempt {ran} {outcome.description}")
        raise self._failure(run_id, ran, outcome)

    def _shown_inputs(self) -> dict[str, str]:
        """The inputs as recorded (reprs, defaults included), to show and to compare runs by."""
        bound = self.task.signature.bind(*self.args, **self.inputs)
        bound.apply_defaults()
        return {name: repr(value)[:200] for name, value in bound.arguments.items()}

    def _bound_inputs(self, args: tuple, inputs: dict) -> bytes:
        """The inputs bound to the task's parameters, defaults included, pickled: equal bytes, equal call
        (``train(5)`` and ``train(epochs=5)`` alike)."""
        bound = self.task.signature.bind(*args, **inputs)
        bound.apply_defaults()
        return pickle.dumps(dict(bound.arguments), protocol=pickle.HIGHEST_PROTOCOL)

    def _same_inputs(self, existing: RunRecord, attempt_dir: Path) -> bool:
        """Whether this call's inputs are those of the succeeded attempt: compared in full from its spec
        file (the recorded reprs are cut at 200 characters), else by the recorded reprs."""
        try:
            spec: AttemptSpec = pickle.loads((attempt_dir / SPEC_FILE).read_bytes())
            then = self._bound_inputs(*loads(spec.inputs))
        except Exception:  # an old or unreadable spec: the recorded reprs are all there is
            return existing.inputs == self._shown_inputs()
        return then == self._bound_inputs(self.args, self.inputs)

    def _already_succeeded(self, existing: RunRecord) -> Run:
        """A run that succeeded is not run again: its recorded output comes back (rerun=True forces)."""
        run_id = existing.id
        attempts = self.records.attempts(run_id)
        winner = next((a for a in reversed(attempts) if a.status == "succeeded"), None)
        if winner is None or not winner.log_dir:
            raise FileNotFoundError(
                f"run {run_id} is recorded as succeeded but no attempt of it is; rerun=True (--rerun) "
                "runs the task again"
            )
        if not self._same_inputs(existing, Path(winner.log_dir)):
            raise ValueError(
                f"run {run_id!r} already succeeded with other inputs ({_inputs_text(existing.inputs)}; "
                f"now {_inputs_text(self._shown_inputs())}); choose another run_id, or pass rerun=True "
                "(--rerun) to run it again with these"
            )
        result = Path(winner.log_dir) / RESULT_FILE
        if not result.exists():
            raise FileNotFoundError(
                f"run {run_id} already succeeded (attempt {winner.number}), but its output is no longer "
                f"available: {result} is missing; rerun=True (--rerun) runs the task again"
            )
        output = load_output(winner.log_dir)
        log.warning(
            "run %s already succeeded (attempt %d); not running it again (rerun=True, or --rerun on the "
            "command line, starts a new attempt)",
            run_id,
            winner.number,
        )
        self.records.add_event(run_id, None, "run_already_succeeded", f"output of attempt {winner.number}")
        return self._record(run_id, "succeeded", output)

    def _open_run(self, existing: RunRecord | None, retries: RetryStrategy) -> tuple[str, str, int]:
        if existing is not None:
            run_id = existing.id
            if existing.status == "running":
                log.warning("run %s is marked running; resuming it (its runner is presumed dead)", run_id)
            previous = self.records.attempts(run_id)
            first = previous[-1].number + 1 if previous else 0
            inputs = self._shown_inputs() if self.options.rerun else None
            self.records.reopen_run(run_id, retries.max_attempts, inputs)
            return run_id, existing.checkpoint_uri or self._checkpoint_uri(run_id), first
        run_id = self.options.run_id or new_run_id(self.task.name)
        checkpoint_uri = self._checkpoint_uri(run_id)
        self.records.create_run(
            run_id, self.task.name, retries.max_attempts, checkpoint_uri, self._shown_inputs()
        )
        # A named run new to this machine (a replacement pod, a new host) continues after the attempts
        # its checkpoint store has seen, so their checkpoints count as earlier attempts'.
        first = self._attempts_in_store(checkpoint_uri) if self.options.run_id else 0
        if first:
            self.records.add_event(
                run_id, None, "run_continued", f"attempt {first}: earlier attempts ran elsewhere"
            )
        return run_id, checkpoint_uri, first

    def _attempts_in_store(self, checkpoint_uri: str) -> int:
        from ..checkpoint.durable_store import DurableStore

        try:
            names = DurableStore(checkpoint_uri, self.options.storage_options).children()
        except Exception as exc:  # an unreachable store: the first attempt will say so when it saves
            log.warning("could not list the checkpoint store %s: %s", checkpoint_uri, exc)
            return 0
        attempts = [int(m.group(1)) for name in names if (m := re.match(r"^a(\d{5})\.s\d{6}$", name))]
        return max(attempts) + 1 if attempts else 0

    def _store_base(self) -> tuple[str, str]:
        """The store this run's checkpoints go under, and where it was named (for error messages)."""
        local = config.local_checkpoint_store(self.home)
        return config.checkpoint_store(self.options.checkpoint_store, self.task.checkpoint_store, local)

    def _checkpoint_uri(self, run_id: str) -> str:
        return f"{self._store_base()[0].rstrip('/')}/{run_id}"

    def _environment(
        self, run_id: str, number: int, checkpoint_uri: str, attempt_dir: Path, max_attempts: int
    ) -> dict[str, str]:
        """The attempt's environment: the task's env_vars, plus the run's identity for ctx()."""
        env = {**os.environ, **self.task.env_vars}
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                config.HOME_ENV: str(self.home),
                config.RUN_ID_ENV: run_id,
                config.ATTEMPT_ENV: str(number),
                config.MAX_ATTEMPTS_ENV: str(max_attempts),
                config.TASK_ENV: self.task.name,
                config.CHECKPOINT_URI_ENV: checkpoint_uri,
                config.CHECKPOINT_PATH_ENV: str(attempt_dir / "checkpoint"),
                config.ATTEMPT_DIR_ENV: str(attempt_dir),
            }
        )
        if self.options.storage_options is not None:
            import json

            env[config.STORAGE_OPTIONS_ENV] = json.dumps(self.options.storage_options)
        return env

    def _attempt(
        self,
        run_id: str,
        number: int,
        checkpoint_uri: str,
        attempt_limit: int,
        limit: tuple[float, str] | None = None,
    ) -> Outcome:
        """Run attempt ``number``; with ``limit`` (seconds, and which ``Timeout`` bound it is), stop it
        when that time has passed."""
        attempt_dir = self.home / "runs" / run_id / f"attempt-{number}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        spec = AttemptSpec(
            self.module, self.qualname, self.file, list(sys.path), self.inputs_payload, self.task.elastic
        )
        write_atomic(attempt_dir / SPEC_FILE, pickle.dumps(spec), fsync=True)
        env = self._environment(run_id, number, checkpoint_uri, attempt_dir, attempt_limit)
        done = threading.Event()
        oom_before = oom_kill_count()  # evidence, not a guess, for an attempt killed by SIGKILL
        with open(attempt_dir / STDOUT_FILE, "wb") as out, open(attempt_dir / STDERR_FILE, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stalwart.runtime.worker", str(attempt_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        tails = []
        forwarding = _forward_sigterm(proc, self._stop)
        try:
            self.records.start_attempt(run_id, number, proc.pid, str(attempt_dir))
            if self.options.echo:
                tails = [
                    _Tail(attempt_dir / STDOUT_FILE, sys.stdout, done),
                    _Tail(attempt_dir / STDERR_FILE, sys.stderr, done),
                ]
                for tail in tails:
                    tail.start()
            stopped = _wait_or_stop(proc, limit)
            code = proc.returncode
        except BaseException:
            _kill_group(proc)
            with contextlib.suppress(Exception):  # the records themselves may be what failed
                self.records.finish_attempt(run_id, number, "aborted", None, "the runner was interrupted")
                self.records.finish_run(run_id, "aborted", "the runner was interrupted")
            raise
        finally:
            forwarding.close()
            done.set()
            for tail in tails:
                tail.join(timeout=5)
        _kill_group(proc)  # workers the attempt started must not outlive it
        outcome = read_outcome(attempt_dir, code, (oom_before, oom_kill_count()))
        if stopped is not None:
            outcome = _timed_out(outcome, stopped, limit)
        self.records.add_events(
            run_id, number, [(e.time, e.kind, _event_message(e)) for e in events.read(attempt_dir)]
        )
        self.records.finish_attempt(run_id, number, outcome.status, code, outcome.description)
        return outcome

    def _record(self, run_id: str, status: str, output: Any) -> Run:
        record = self.records.get_run(run_id)
        return Run(
            id=run_id,
            task=self.task.name,
            status=status,
            output=output,
            attempts=tuple(self.records.attempts(run_id)),
            checkpoint_uri=record.checkpoint_uri if record and record.checkpoint_uri else "",
            home=self.home,
        )

    def _failure(self, run_id: str, number: int, outcome: Outcome) -> RunFailedError:
        run = self._record(run_id, "failed", None)
        count = len(run.attempts)
        message = (
            f"run {run_id} of task {self.task.name!r} failed after {count} attempt{'s' * (count != 1)}: "
            f"attempt {number} {outcome.description}"
        )
        result = outcome.result
        if result is not None and result.traceback:
            where = "that worker" if result.description else "its attempt process"
            message += f"\n\nTraceback of the task in {where}:\n{result.traceback.rstrip()}"
        logs = run.attempts[-1].log_dir if run.attempts else None
        if logs:
            message += f"\n(attempt logs: {logs})"
        error = _error_class(outcome)(message, run, result.traceback if result else None)
        if result is not None and result.exception is not None:
            try:
                cause = loads(result.exception)
            except Exception:
                cause = None
            if isinstance(cause, BaseException):
                cause.__cause__ = RemoteTraceback(result.traceback)
                error.__cause__ = cause
        return error


class _Forwarding:
    """SIGTERM to the runner goes to the attempt's process group while the attempt runs: it saves its
    newest step and stops (a flash checkpointer answers SIGTERM), where dying with the runner would
    lose the steps since the last save."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _forward_sigterm(proc: subprocess.Popen, stopped: Callable[[], None]) -> _Forwarding:
    if threading.current_thread() is not threading.main_thread():
        return _Forwarding(None)  # only the main thread may set handlers: the runner dies as before

    def forward(signum: int, frame: Any) -> None:
        stopped()
        log.warning(
            "stalwart: SIGTERM: passing it to attempt process %d and waiting for it to stop", proc.pid
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    return _Forwarding(signal.signal(signal.SIGTERM, forward))


STOP_GRACE = 30.0  # seconds between SIGTERM and SIGKILL for an attempt past its time, as Kubernetes gives


def _wait_or_stop(proc: subprocess.Popen, limit: tuple[float, str] | None) -> str | None:
    """Wait for the attempt; past ``limit``, tell its process group to stop (SIGTERM: a flash
    checkpointer saves its step), then kill it after ``STOP_GRACE``. Returns the bound that stopped
    it, or None."""
    if limit is None:
        proc.wait()
        return None
    try:
        proc.wait(timeout=max(0.0, limit[0]))
        return None
    except subprocess.TimeoutExpired:
        pass
    log.warning("stalwart: attempt process %d ran past its %s; stopping it", proc.pid, limit[1])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
    return limit[1]


def _timed_out(outcome: Outcome, bound: str, limit: tuple[float, str] | None) -> Outcome:
    """The outcome of an attempt the runner stopped at ``bound``: retried past ``max_runtime``, not past
    the run's ``deadline``."""
    if bound == "deadline":
        description = "was stopped at the run's deadline (Timeout.deadline)"
    else:
        seconds = limit[0] if limit else 0.0
        description = f"ran longer than its {seconds:g} s limit (Timeout.max_runtime) and was stopped"
    return replace(
        outcome,
        ok=False,
        status="timed_out",
        description=description,
        retryable=bound != "deadline",
        timed_out=bound,
        output=None,
    )


def _past_deadline(outcome: Outcome, deadline: float | None) -> Outcome:
    """No time is left for another attempt before the run's deadline."""
    return replace(
        outcome,
        status="timed_out",
        description=f"{outcome.description}, and the run's deadline ({deadline:g} s) leaves no time for "
        "another attempt",
        retryable=False,
        timed_out="deadline",
    )


def _error_class(outcome: Outcome) -> type[RunFailedError]:
    """The class of the error a failed run raises, by how its last attempt ended (``errors``)."""
    if outcome.timed_out == "deadline":
        return DeadlineExceededError
    if outcome.timed_out == "max_runtime":
        return MaxRuntimeExceededError
    if outcome.oom:
        return OOMError
    if outcome.result is not None and outcome.result.exception is not None:
        return RuntimeUserError  # the task raised (in an elastic attempt: the worker that failed first)
    return RuntimeSystemError


def _event_message(event: events.Event) -> str:
    """An attempt's event as the run's records keep it: its fields, rank and restart round, as JSON."""
    return json.dumps({"rank": event.rank, "restart": event.restart, **event.fields}, separators=(",", ":"))


def _inputs_text(inputs: dict[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in inputs.items()) or "no inputs"


def _kill_group(proc: subprocess.Popen) -> None:
    kill_tree(proc.pid)
    if proc.poll() is None:
        proc.wait()
