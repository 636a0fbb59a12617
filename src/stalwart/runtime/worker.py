"""The attempt process: ``python -m stalwart.runtime.worker ATTEMPT_DIR``.

It imports the task's module the way multiprocessing's spawn does (a script as ``__mp_main__``, so its
``if __name__ == "__main__":`` block does not run again), calls the function, and writes the result
or the exception with its traceback. Exit code 0 means success, 1 an exception in the task; anything
else (a signal, an OOM kill) the runner sees from the exit status alone. A task that cannot even be
loaded (its script fails to import, the function is not where it was, the inputs do not unpickle)
fails with ``TaskLoadError``, which is not retried: the next attempt would load the same files.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..flash.preemption import Preempted
from ..retry import NonRetryableError
from .elastic_failures import WorkerFailedError
from .processes import die_with_parent
from .protocol import (
    RESULT_FILE,
    SPEC_FILE,
    AttemptResult,
    AttemptSpec,
    TaskLoadError,
    dumps_output,
    write_atomic,
)

IMPORTING_ENV = "STALWART_IMPORTING_TASK_MODULE"


def _import_main(file: str) -> types.ModuleType:
    loaded = sys.modules.get("__mp_main__")
    if loaded is not None and getattr(loaded, "__file__", None) == file:
        return loaded  # a spawned elastic worker: multiprocessing already ran the script as __mp_main__
    spec = importlib.util.spec_from_file_location("__mp_main__", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the task's script {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = module
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)
    return module


def resolve(spec: AttemptSpec) -> Any:
    """The task's function, imported the way a fresh process must."""
    os.environ[IMPORTING_ENV] = "1"  # stalwart.run() at import time would start runs recursively
    try:
        if spec.module == "__main__":
            if not spec.file:
                raise ImportError("the task was defined in __main__ without a file (interactive session?)")
            module = _import_main(spec.file)
        else:
            try:
                module = importlib.import_module(spec.module)
            except ImportError:
                if not spec.file:
                    raise
                loader_spec = importlib.util.spec_from_file_location(spec.module, spec.file)
                if loader_spec is None or loader_spec.loader is None:
                    raise
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[spec.module] = module
                loader_spec.loader.exec_module(module)
    finally:
        os.environ.pop(IMPORTING_ENV, None)
    target: Any = module
    for part in spec.qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "func", target)  # a Task, or the plain function it wraps


def load(spec: AttemptSpec) -> tuple[Callable[..., Any], tuple, dict]:
    """The task's function and inputs, or TaskLoadError saying why they could not be loaded."""
    where = spec.file if spec.module == "__main__" else spec.module
    try:
        func = resolve(spec)
        args, kwargs = pickle.loads(spec.inputs)
    except (Exception, SystemExit) as exc:
        hint = ""
        if isinstance(exc, AttributeError) and spec.qualname.split(".")[-1] in str(exc):
            hint = (
                "; define the task at the top level of its module, not under "
                '`if __name__ == "__main__":`, so a fresh process finds it'
            )
        if isinstance(exc, SystemExit):
            exc_text = f"it called sys.exit({exc.code!r}) while being imported"
        else:
            exc_text = f"{type(exc).__name__}: {exc}"
        raise TaskLoadError(f"could not load task {spec.qualname} from {where}: {exc_text}{hint}") from exc
    return func, args, kwargs


def failure_result(exc: BaseException) -> AttemptResult:
    """An exception as the runner reads it: type, message, traceback, the pickle if it round-trips."""
    try:
        pickled: bytes | None = pickle.dumps(exc)
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


def leave_process_group() -> None:
    """Destroy the default process group a task that returned left behind, as torch advises and
    torchtitan does on success: gloo threads still alive at interpreter exit abort the process now and
    then ("terminate called without an active exception", pytorch#190489), which the agent reports as
    a failed worker. Not after a failure: a peer still inside a collective would hang the call."""
    if "torch.distributed" not in sys.modules:  # a task that never imported it has no group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stalwart.runtime.worker ATTEMPT_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    attempt_dir = Path(argv[0])
    spec: AttemptSpec = pickle.loads((attempt_dir / SPEC_FILE).read_bytes())
    for entry in reversed(spec.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        if spec.elastic is not None:
            from .elastic_launch import launch

            output_pickle = launch(spec, attempt_dir)  # rank 0's value, pickled where it was made
        else:
            func, args, kwargs = load(spec)
            output = func(*args, **kwargs)
            if inspect.iscoroutine(output):
                output = asyncio.run(output)
            output_pickle = dumps_output(output)
            leave_process_group()
        result = AttemptResult(ok=True, output_pickle=output_pickle)
        payload = pickle.dumps(result)
    except BaseException as exc:  # every failure, SystemExit included, is reported to the runner
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            exc = RuntimeError("the task called sys.exit(0) instead of returning")
        if isinstance(exc, WorkerFailedError):  # the workers printed their own tracebacks
            result = exc.result
            print(f"stalwart: {result.description}", file=sys.stderr)
        elif isinstance(exc, Preempted):  # a clean stop, said in one line
            result = failure_result(exc)
            print(f"stalwart: {exc}", file=sys.stderr)
        else:
            result = failure_result(exc)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        payload = pickle.dumps(result)
    sys.stdout.flush()
    sys.stderr.flush()
    write_atomic(attempt_dir / RESULT_FILE, payload)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
