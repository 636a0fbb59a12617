"""What the runner and an attempt process exchange: a spec file in, a result file out.

Both are pickles written atomically (temporary file, then rename), so a reader sees a whole file or
none, even when the attempt dies by SIGKILL in the middle of writing its result. The task's output and
exception travel as pickles of their own inside the result: they may be instances of classes of the
task's script, which only the runner (where the script is ``__main__``) can resolve, so only the
runner unpickles them, with ``loads``. The result file is kept: it is how a run that succeeded gives
its output again.
"""

from __future__ import annotations

import io
import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..elastic import Elastic
from ..flash.preemption import Preempted
from ..retry import NonRetryableError

SPEC_FILE = "spec.pkl"
RESULT_FILE = "result.pkl"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"

# A script run as ``python train.py`` is ``__main__`` in the runner and ``__mp_main__`` in the attempt
# process (the name multiprocessing uses), so both names must resolve to the same module.
MAIN_ALIASES = {"__mp_main__": "__main__"}


class TaskLoadError(NonRetryableError):
    """An attempt could not load its task (module, function or inputs): every retry would fail alike.

    Defined here, not in the worker module that runs as ``__main__``, so it unpickles in the runner.
    """


@dataclass(frozen=True)
class AttemptSpec:
    module: str
    qualname: str
    file: str | None
    sys_path: list[str]
    inputs: bytes  # pickled (args, kwargs), unpickled after the task's module is imported
    elastic: Elastic | None = None  # run through torch elastic (stalwart.runtime.elastic_launch)


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    output_pickle: bytes | None = None  # the task's return value, pickled where it was made
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    exception: bytes | None = None  # the pickled exception, when it round-trips
    retryable: bool = True
    description: str | None = None  # how the attempt failed, when more than "raised <type>: <message>"
    extra: dict = field(default_factory=dict)
    preempted: bool = False  # stopped by SIGTERM after saving its newest step (flash.preemption)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MAIN_ALIASES.get(module, module), name)


def loads(data: bytes) -> Any:
    """``pickle.loads`` that maps the attempt's ``__mp_main__`` back to the runner's ``__main__``."""
    return _Unpickler(io.BytesIO(data)).load()


def dumps_output(output: Any) -> bytes:
    """Pickle a task's return value; one that cannot be pickled fails the run at once (no retry helps)."""
    try:
        return pickle.dumps(output)
    except Exception as exc:
        raise NonRetryableError(
            f"the task returned a {type(output).__name__} that cannot be pickled: {exc}"
        ) from exc


def failure_result(exc: BaseException) -> AttemptResult:
    """An exception as the runner reads it: type, message, traceback, the pickle if it round-trips."""
    pickled: bytes | None
    try:
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)
    except Exception:
        pickled = None
    return AttemptResult(
        ok=False,
        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        error_message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        exception=pickled,
        retryable=not isinstance(exc, NonRetryableError),
        preempted=isinstance(exc, Preempted),
    )
