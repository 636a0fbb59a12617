"""What a failed run raises to its caller, named as the Flyte SDK names it.

Programs written for Flyte catch ``RuntimeUserError``, ``OOMError`` or ``NonRecoverableError``;
here they are the classes of ``RunFailedError`` that ``stalwart.run`` raises, chosen by how the
last attempt ended:

- ``RuntimeUserError``: the task's code raised (its exception is ``__cause__``);
- ``OOMError`` (a ``RuntimeUserError``): the kernel's OOM killer killed it;
- ``MaxRuntimeExceededError``/``DeadlineExceededError`` (``TaskTimeoutError``): it ran past its
  ``Timeout``;
- ``RuntimeSystemError``: the process died without a result (a signal, an interpreter crash).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .retry import NonRetryableError

if TYPE_CHECKING:
    from .runtime.runner import Run

__all__ = [
    "DeadlineExceededError",
    "MaxRuntimeExceededError",
    "NonRecoverableError",
    "NonRetryableError",
    "OOMError",
    "RunFailedError",
    "RuntimeSystemError",
    "RuntimeUserError",
    "TaskTimeoutError",
]

NonRecoverableError = NonRetryableError  # the Flyte SDK's name: raise it in a task to stop retrying


class RunFailedError(RuntimeError):
    """Every attempt of a run failed (or one failed with NonRetryableError).

    ``__cause__`` is the task's own exception when it could be carried over, with the task's
    traceback in the message; ``run`` holds the record of the failed run. ``code`` names the class
    and ``kind`` says whose failure it was ("user" or "system"), as in the Flyte SDK.
    """

    kind = "user"

    def __init__(self, message: str, run: Run, traceback: str | None = None) -> None:
        super().__init__(message)
        self.run = run
        self.traceback = traceback

    @property
    def code(self) -> str:
        return type(self).__name__


class RuntimeUserError(RunFailedError):
    """The task's own code failed: its last attempt raised, or used more than it may."""


class RuntimeSystemError(RunFailedError):
    """The last attempt's process died without reporting a result: killed by a signal (not the OOM
    killer), or the interpreter crashed."""

    kind = "system"


class OOMError(RuntimeUserError):
    """The kernel's OOM killer killed the last attempt (counted in its cgroup): ask for more memory,
    or use less."""


class TaskTimeoutError(RuntimeUserError):
    """The run went past one of its ``Timeout`` bounds."""


class MaxRuntimeExceededError(TaskTimeoutError):
    """Every attempt allowed ran longer than ``Timeout.max_runtime`` and was stopped."""


class DeadlineExceededError(TaskTimeoutError):
    """The run did not finish within ``Timeout.deadline``, counted across all attempts."""
