"""A user's task in a fresh process: import its script or module, find the task, call it, finish.

One home for what ``stalwart run`` (the CLI), the attempt process (``worker``) and the torch elastic
worker (``elastic_launch``) all do:

- a script is imported as ``__mp_main__`` aliased to ``__main__``, as multiprocessing's spawn does, so
  its ``if __name__ == "__main__":`` block does not run again and pickles of its classes resolve in
  both the runner and the attempt (``import_as_main``);
- while a task's module is imported, ``stalwart.run()`` there is refused (``config.importing``);
- a task that returns a coroutine is run to its end (``call``);
- a task that returned leaves no process group to the interpreter's exit (``leave_process_group``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import config
from .protocol import SPEC_FILE, AttemptSpec, TaskLoadError

__all__ = ["call", "import_as_main", "leave_process_group", "load", "read_spec", "resolve"]


def import_as_main(file: str | Path) -> types.ModuleType:
    """Import the script ``file`` as ``__mp_main__`` aliased to ``__main__`` and return it (the one
    multiprocessing already imported so in a spawned process). Raises what the script raises."""
    file = str(file)
    loaded = sys.modules.get("__mp_main__")
    if loaded is not None and getattr(loaded, "__file__", None) == file:
        return loaded  # a spawned elastic worker: multiprocessing already ran the script as __mp_main__
    spec = importlib.util.spec_from_file_location("__mp_main__", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the task's script {file}")
    module = importlib.util.module_from_spec(spec)
    module.__file__ = file
    sys.modules["__mp_main__"] = module
    sys.modules["__main__"] = module
    with config.importing():  # stalwart.run() at import time would start runs recursively
        spec.loader.exec_module(module)
    return module


def read_spec(attempt_dir: str | Path) -> AttemptSpec:
    """The attempt's spec, with the runner's ``sys.path`` entries this process lacks put first."""
    spec: AttemptSpec = pickle.loads((Path(attempt_dir) / SPEC_FILE).read_bytes())
    for entry in reversed(spec.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    return spec


def resolve(spec: AttemptSpec) -> Any:
    """The task's function, imported the way a fresh process must."""
    if spec.module == "__main__":
        if not spec.file:
            raise ImportError("the task was defined in __main__ without a file (interactive session?)")
        module = import_as_main(spec.file)
    else:
        with config.importing():
            module = _import_module(spec)
    target: Any = module
    for part in spec.qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "func", target)  # a Task, or the plain function it wraps


def _import_module(spec: AttemptSpec) -> types.ModuleType:
    try:
        return importlib.import_module(spec.module)
    except ImportError:
        if not spec.file:
            raise
        loader_spec = importlib.util.spec_from_file_location(spec.module, spec.file)
        if loader_spec is None or loader_spec.loader is None:
            raise
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[spec.module] = module
        loader_spec.loader.exec_module(module)
        return module


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


def call(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The task's value: ``func(*args, **kwargs)``, a coroutine it returns run to its end. A task that
    calls ``sys.exit(0)`` fails: exiting is not returning a value."""
    try:
        output = func(*args, **kwargs)
        if inspect.iscoroutine(output):
            output = asyncio.run(output)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise RuntimeError("the task called sys.exit(0) instead of returning") from None
        raise
    return output


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
