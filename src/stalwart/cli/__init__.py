"""The ``stalwart`` command: run a task from a script, list recent runs, inspect one run.

``stalwart run train.py train --epochs 3`` loads the script the way an attempt process does (as
``__mp_main__``, so its ``if __name__ == "__main__":`` block stays out of the way; see ``script``),
turns ``--name value`` options into typed inputs from the task's signature (``inputs``), and hands the
task to the local runner (``run``). ``stalwart runs`` and ``stalwart show`` read the run records
(``records``). The command tree is cyclopts' (``app``), with rich help and shell completion.

This package is imported on every invocation, so it imports nothing heavy (torch, fsspec, rich,
cyclopts) at module level; ``main`` builds the tree when it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from ..runtime.records import RunRecordsError
from .errors import CliError
from .inputs import parse_task_inputs, task_help

__all__ = ["main", "parse_task_inputs"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``stalwart`` command; return its exit code (0 ok, 1 run failed or not found, 2 usage)."""
    import cyclopts

    from .app import build, mark_task_inputs

    tokens = mark_task_inputs(list(sys.argv[1:] if argv is None else argv))
    app = build()
    try:
        try:
            command, bound, _ = app.parse_args(tokens, exit_on_error=False, print_error=False)
        except cyclopts.CycloptsError as exc:
            raise CliError(f"{exc}\nSee `stalwart {' '.join(_command_path(tokens))} --help`.") from None
        if getattr(command, "__name__", "") == "help_print" and not ({"--help", "-h"} & set(tokens)):
            with contextlib.redirect_stdout(sys.stderr):  # no command: the help, as a usage error
                command(*bound.args, **bound.kwargs)
            return 2
        with _runner_logging():
            code = command(*bound.args, **bound.kwargs)
        return code if isinstance(code, int) else 0
    except CliError as exc:
        show = task_help(exc)  # `stalwart run FILE.py TASK --help`
        if show is not None:
            show()
            return 0
        print(f"stalwart: error: {exc}", file=sys.stderr)
        return exc.code
    except RunRecordsError as exc:  # a damaged runs.db: which file, and what to do about it
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


def _command_path(tokens: list[str]) -> list[str]:
    """The command words at the start of ``tokens`` (for "see ... --help")."""
    words = []
    for token in tokens[:2]:
        if token.startswith("-") or token.endswith(".py"):
            break
        words.append(token)
    return words


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
