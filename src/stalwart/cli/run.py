"""``stalwart run FILE.py TASK --input value``: load the script, parse the task's inputs, run it here."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .errors import CliError
from .inputs import parse_task_inputs
from .script import script_task
from .show import open_records

if TYPE_CHECKING:
    from ..environment import Task

__all__ = ["run_task"]

_OUTPUT_REPR_LIMIT = 4000


def run_task(file: str, name: str | None, argv: list[str], given: dict[str, Any]) -> int:
    """Run task ``name`` of ``file`` with the inputs in ``argv``; ``given``: the run options given
    before FILE.py (those among the inputs win)."""
    with script_task(file, name, "stalwart run {file} TASK [--input value ...]") as task:
        positional, inputs, options = parse_task_inputs(task, argv, prog=f"stalwart run {file} {name}")
        return _execute(
            task,
            positional,
            inputs,
            options.get("run_id", given["run_id"]),
            options.get("checkpoint_store", given["checkpoint_store"]),
            bool(options.get("quiet") or given["quiet"]),
            bool(options.get("rerun") or given["rerun"]),
        )


def _execute(
    task: Task,
    positional: list[Any],
    inputs: dict[str, Any],
    run_id: str | None,
    checkpoint_store: str | None,
    quiet: bool,
    rerun: bool = False,
) -> int:
    from ..flash.preemption import Preempted
    from ..runtime.runner import RunFailedError, new_run_id, with_runcontext

    try:
        # Name the run up front (as the runner would) so it can be announced before the first attempt.
        options = with_runcontext(
            run_id=run_id or new_run_id(task.name),
            checkpoint_store=checkpoint_store,
            echo=not quiet,
            rerun=rerun,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    assert options.run_id is not None
    status = _run_status(options.run_id)
    if not quiet and (status != "succeeded" or rerun):  # a run that succeeded: the runner says so
        verb = "starting" if status is None else "resuming"
        print(
            f"stalwart: {verb} run {options.run_id} of task {task.name} "
            f"(at most {task.retries.max_attempts} attempt{'s' * (task.retries.max_attempts != 1)})",
            file=sys.stderr,
            flush=True,
        )
    try:
        run = options.run(task, *positional, **inputs)
    except RunFailedError as exc:
        print(f"stalwart: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:  # SIGTERM: the attempt saved its newest step; the same run id resumes
        print(f"stalwart: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 143
    except (TypeError, ValueError) as exc:  # inputs that do not pickle, a run id of another task...
        raise CliError(str(exc)) from None
    except FileNotFoundError as exc:  # a run that succeeded, whose output file is gone
        raise CliError(str(exc), 1) from None
    except KeyboardInterrupt:
        print(f"stalwart: interrupted; run {options.run_id} is marked aborted", file=sys.stderr)
        return 130
    count = len(run.attempts)
    sys.stdout.flush()
    print(f"run {run.id} {run.status} after {count} attempt{'s' * (count != 1)}")
    print(f"output: {_short_repr(run.output)}")
    return 0


def _run_status(run_id: str) -> str | None:
    """The recorded status of a run, or None when there is no such run."""
    records = open_records()
    record = records.get_run(run_id) if records is not None else None
    return record.status if record is not None else None


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _OUTPUT_REPR_LIMIT:
        text = f"{text[:_OUTPUT_REPR_LIMIT]}... ({len(text)} characters in all)"
    return text
