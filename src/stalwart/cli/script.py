"""Loading the FILE.py of ``stalwart run`` the way an attempt process does, and finding its tasks."""

from __future__ import annotations

import contextlib
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CliError

if TYPE_CHECKING:
    from ..environment import Task

__all__ = ["find_task", "script_as_main", "task_listing"]


@contextlib.contextmanager
def script_as_main(file: str) -> Iterator[types.ModuleType]:
    """Import FILE the way the attempt process will (``runtime.loader.import_as_main``: as
    ``__mp_main__`` aliased to ``__main__``), so its ``if __name__ == "__main__":`` block runs in
    neither and pickles that name ``__main__`` or ``__mp_main__`` resolve on both sides. The previous
    modules and ``sys.path`` come back afterwards, which keeps ``main()`` usable in-process.
    """
    from ..runtime.loader import import_as_main

    path = Path(file).expanduser()
    if not path.exists():
        raise CliError(f"no such file: {file}")
    if not path.is_file():
        raise CliError(f"not a file: {file}")
    if path.suffix != ".py":
        raise CliError(f"{file} is not a .py file; stalwart run needs a Python source file")
    path = path.resolve()
    saved = {name: sys.modules.pop(name, None) for name in ("__main__", "__mp_main__")}
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.parent))  # like `python FILE.py`: its sibling modules import
    try:
        try:
            module = import_as_main(path)
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            raise CliError(
                f"{file} called sys.exit({exc.code!r}) while being imported; put command-line handling "
                'under `if __name__ == "__main__":`'
            ) from None
        except BaseException as exc:
            raise CliError(f"could not import {file}:\n{_import_error(exc)}") from None
        yield module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        sys.path[:] = saved_path


_OURS = (Path(__file__), Path(__file__).parents[1] / "runtime" / "loader.py")


def _import_error(exc: BaseException) -> str:
    """The exception with only the script's own frames: importlib's and ours tell the user nothing."""
    error = traceback.TracebackException.from_exception(exc)
    frames = [
        frame
        for frame in error.stack
        if not frame.filename.startswith("<frozen") and Path(frame.filename) not in _OURS
    ]
    error.stack = traceback.StackSummary.from_list(frames)
    return "".join(error.format()).rstrip()


def _module_tasks(module: types.ModuleType) -> dict[str, Task]:
    from ..environment import Task

    return {name: value for name, value in vars(module).items() if isinstance(value, Task)}


def task_listing(module: types.ModuleType) -> str:
    """The tasks a script defines, with their signatures, for an error message."""
    tasks = _module_tasks(module)
    if not tasks:
        return "No tasks are defined there; declare one with @env.task."
    lines = ["Tasks defined there:"]
    for name, task in sorted(tasks.items()):
        alias = f"  (task name {task.name!r})" if task.name != name else ""
        lines.append(f"  {name}{task.signature}{alias}")
    return "\n".join(lines)


def find_task(module: types.ModuleType, name: str, file: str) -> Task:
    """The task named ``name`` (attribute or declared name) in the script ``file``."""
    tasks = _module_tasks(module)
    task = tasks.get(name)
    if task is None:
        named = [t for t in tasks.values() if t.name == name]
        task = named[0] if len(named) == 1 else None
    if task is None:
        if name not in vars(module):
            problem = f"no task {name!r} in {file}"
        else:
            kind = type(vars(module)[name]).__name__
            problem = f"{name!r} in {file} is not a task but of type {kind} (declare it with @env.task)"
        raise CliError(f"{problem}.\n{task_listing(module)}")
    return task


@contextlib.contextmanager
def script_task(file: str, name: str | None, usage: str) -> Iterator[Task]:
    """The task ``name`` of script ``file``, loaded as ``__main__`` while the block runs.

    ``usage`` is the command line to show (``{file}`` filled in) when no task is named.
    """
    with script_as_main(file) as module:
        if name is None:
            raise CliError(f"name the task: {usage.format(file=file)}\n{task_listing(module)}")
        yield find_task(module, name, file)
