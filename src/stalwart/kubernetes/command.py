"""The command a pod runs: ``stalwart run`` of the task's file, with the run's id, store and inputs."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stalwart.environment import Task

__all__ = ["default_command", "input_args", "script_of"]


def default_command(
    script: str | os.PathLike,
    task_ref: str,
    inputs: Sequence[str] = (),
    *,
    run_id: str,
    checkpoint_store: str,
) -> list[str]:
    """``stalwart run --run-id ID --checkpoint-store URL FILE TASK --name value ...``.

    The run options go before FILE so a task input called ``run_id`` cannot take them.
    """
    return [
        "stalwart",
        "run",
        "--run-id",
        run_id,
        "--checkpoint-store",
        checkpoint_store,
        os.fspath(script),
        task_ref,
        *inputs,
    ]


def input_args(inputs: Mapping[str, Any]) -> list[str]:
    """``--name value`` options that ``stalwart run`` parses back into the same values."""
    args: list[str] = []
    for name, value in inputs.items():
        args += [f"--{name.replace('_', '-')}", _format_input(value)]
    return args


def _format_input(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (str, int, float, PurePath)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.dumps(dataclasses.asdict(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return json.dumps(list(value))
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    raise ValueError(f"input {value!r} cannot be written on a command line; pass command= instead")


def script_of(task: Task) -> str:
    """The task's file as the container should see it: relative to the current directory if inside it."""
    file = task.reference()[2]
    if file is None:
        raise ValueError(f"task {task.name!r} has no source file; pass script= or command=")
    path = Path(file).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()
