"""The ``stalwart`` command: run a task from a script, list recent runs, inspect one run.

``stalwart run train.py train --epochs 3`` loads the script the way an attempt process does (as
``__mp_main__``, so its ``if __name__ == "__main__":`` block stays out of the way; see ``script``),
turns ``--name value`` options into typed inputs from the task's signature (``inputs``), and hands the
task to the local runner. ``stalwart runs`` and ``stalwart show`` read the run records (``records``).

This package is imported on every invocation, so it imports nothing heavy (torch, fsspec, rich) at
module level; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..runtime.store import RunStoreError
from .errors import CliError
from .inputs import add_run_options, parse_task_inputs
from .k8s import add_k8s_parser
from .records import LOG_TAIL_LINES, cmd_runs, cmd_show, open_store
from .script import script_task

if TYPE_CHECKING:
    from ..environment import Task

__all__ = ["main", "parse_task_inputs"]

_OUTPUT_REPR_LIMIT = 4000


def main(argv: list[str] | None = None) -> int:
    """Run the ``stalwart`` command; return its exit code (0 ok, 1 run failed or not found, 2 usage)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        with _runner_logging():
            return args.handler(args)
    except SystemExit as exc:  # argparse: --help, --version and usage errors
        return _exit_code(exc)
    except CliError as exc:
        print(f"stalwart: error: {exc}", file=sys.stderr)
        return exc.code
    except RunStoreError as exc:  # a damaged runs.db: which file, and what to do about it
        print(f"stalwart: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stalwart: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `stalwart runs | head`
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stalwart",
        description="Run PyTorch training as durable tasks: each attempt in a fresh process, retried, "
        "resumed from the newest checkpoint that survived.",
    )
    parser.add_argument("--version", action="version", version=f"stalwart {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a task defined in a Python file",
        description="Run TASK from FILE.py with retries; its inputs are given as --name value. "
        "`stalwart run FILE.py TASK --help` lists them.",
        usage="stalwart run FILE.py TASK [--input value ...] [--run-id ID] [--checkpoint-store URL] "
        "[--quiet] [--rerun]",
    )
    add_run_options(run, defaults=True)
    run.add_argument("file", metavar="FILE.py", help="the Python file that defines the task")
    run.add_argument("task", metavar="TASK", nargs="?", help="the task's name in that file")
    run.add_argument("inputs", nargs=argparse.REMAINDER, help="the task's inputs, as --name value")
    run.set_defaults(handler=_cmd_run)

    runs = commands.add_parser("runs", help="list recent runs, newest first")
    runs.add_argument("--limit", "-n", type=_positive_int, default=20, help="how many runs (default 20)")
    runs.set_defaults(handler=cmd_runs)

    show = commands.add_parser(
        "show",
        help="show one run: output, attempts and where each resumed from, goodput, checkpoints, events",
    )
    show.add_argument("run_id", metavar="RUN_ID", help="a run id, or a prefix that matches one run")
    show.add_argument(
        "--logs", action="store_true", help=f"print the last {LOG_TAIL_LINES} lines of each attempt's logs"
    )
    show.add_argument("--json", action="store_true", help="print the same as one JSON object")
    show.add_argument(
        "--timeline",
        metavar="FILE",
        help="draw the run as a timeline into FILE (.png, .svg or .html; needs stalwart[timeline])",
    )
    show.add_argument(
        "--trace", metavar="FILE", help="write the run as a Chrome/Perfetto trace (JSON) into FILE"
    )
    show.set_defaults(handler=cmd_show)

    add_k8s_parser(commands)
    return parser


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {raw!r}")
    return value


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, so a replaced stderr (tests) is honoured."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def _runner_logging() -> Iterator[None]:
    """Show the runner's warnings (retries, resumed runs) as ``stalwart: ...`` lines on stderr."""
    logger = logging.getLogger("stalwart")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("stalwart: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    propagate = logger.propagate
    logger.propagate = False  # a script's logging.basicConfig() would print each warning twice
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


def _cmd_run(args: argparse.Namespace) -> int:
    with script_task(args.file, args.task, "stalwart run {file} TASK [--input value ...]") as task:
        positional, inputs, run_options = parse_task_inputs(
            task, args.inputs, prog=f"stalwart run {args.file} {args.task}"
        )
        given = vars(args)  # run options before FILE.py; those after TASK win
        run_id = run_options.get("run_id", given["run:run_id"])
        store_url = run_options.get("checkpoint_store", given["run:checkpoint_store"])
        quiet = bool(run_options.get("quiet", False) or given["run:quiet"])
        rerun = bool(run_options.get("rerun", False) or given["run:rerun"])
        return _execute(task, positional, inputs, run_id, store_url, quiet, rerun)


def _execute(
    task: Task,
    positional: list[Any],
    inputs: dict[str, Any],
    run_id: str | None,
    store: str | None,
    quiet: bool,
    rerun: bool = False,
) -> int:
    from ..flash.preemption import Preempted
    from ..runtime.runner import RunFailedError, new_run_id, with_runcontext

    try:
        # Name the run up front (as the runner would) so it can be announced before the first attempt.
        options = with_runcontext(
            run_id=run_id or new_run_id(task.name), checkpoint_store=store, echo=not quiet, rerun=rerun
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
    store = open_store()
    record = store.get_run(run_id) if store is not None else None
    return record.status if record is not None else None


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _OUTPUT_REPR_LIMIT:
        text = f"{text[:_OUTPUT_REPR_LIMIT]}... ({len(text)} characters in all)"
    return text
