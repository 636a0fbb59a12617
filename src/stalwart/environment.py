"""``TaskEnvironment`` and the ``@env.task`` decorator: what a task needs, declared next to its code."""

from __future__ import annotations

import inspect
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypedDict, TypeVar

from . import config
from .elastic import Elastic
from .resources import Resources
from .retry import RetryStrategy, as_retry_strategy
from .timeout import Timeout, as_timeout

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

__all__ = ["Task", "TaskEnvironment", "TaskSettings"]

P = ParamSpec("P")
R = TypeVar("R")


class TaskSettings(TypedDict, total=False):
    """What ``env.task(...)`` and ``task.override(...)`` may set for one task (None: as it is)."""

    retries: int | RetryStrategy | None
    resources: Resources | None
    env_vars: Mapping[str, str] | None
    checkpoint_store: str | None
    elastic: Elastic | None
    timeout: Timeout | int | float | timedelta | None


def _check_settings(method: str, settings: Mapping[str, Any]) -> None:
    unknown = sorted(set(settings) - set(TaskSettings.__annotations__))
    if unknown:
        accepted = ", ".join(TaskSettings.__annotations__)
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}; it takes {accepted}")


_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$", re.IGNORECASE)


def _check_name(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{field_name}={value!r} is not accepted; use 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit, e.g. 'train'"
        )
    return value


def _check_env_vars(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"env_vars={value!r} is not accepted; use a dict of str to str")
    for key, val in value.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(
                f"env_vars key {key!r} is not accepted; use a variable name like 'OMP_NUM_THREADS'"
            )
        if not isinstance(val, str):
            raise ValueError(f"env_vars[{key!r}]={val!r} is not accepted; values must be strings")
    return dict(value)


def _check_resources(value: object) -> Resources | None:
    if value is not None and not isinstance(value, Resources):
        raise ValueError(f"resources={value!r} is not accepted; use stalwart.Resources(...) or None")
    return value


def _check_elastic(value: object) -> Elastic | None:
    if value is not None and not isinstance(value, Elastic):
        raise ValueError(
            f"elastic={value!r} is not accepted; use stalwart.Elastic(nnodes=..., nproc_per_node=...) or None"
        )
    return value


def _check_store(value: object) -> str | None:
    """A store URL fsspec can open here, checked once where it is declared rather than in each attempt."""
    return None if value is None else config.check_store_url(value)


@dataclass(frozen=True)
class TaskEnvironment:
    """Settings shared by a group of tasks: name, resources, environment variables, checkpoint store.

    A task inherits them and can override each one in ``env.task(...)`` or ``task.override(...)``.

    Args:
        name: the environment's name (letters, digits, ``-``, ``_``, ``.``); tasks are named after it.
        resources: what each task process needs (``Resources``); None: no requests.
        env_vars: environment variables set in every attempt process (and pod).
        retries: retries after a failed attempt: an int, or ``RetryStrategy(count, backoff=...)``.
        checkpoint_store: fsspec URL under which runs keep their checkpoints; None: ``$STALWART_HOME``.
        image: the container image for Kubernetes manifests.
        elastic: run the tasks as torch elastic jobs (``Elastic``); None: one process.
    """

    name: str
    resources: Resources | None = None
    env_vars: Mapping[str, str] | None = None  # a dict after __post_init__
    retries: int | RetryStrategy = 0  # a RetryStrategy after __post_init__
    checkpoint_store: str | None = None
    image: str | None = None
    elastic: Elastic | None = None

    def __post_init__(self) -> None:
        _check_name("TaskEnvironment.name", self.name)
        _check_resources(self.resources)
        _check_elastic(self.elastic)
        object.__setattr__(self, "env_vars", _check_env_vars(self.env_vars))
        object.__setattr__(self, "retries", as_retry_strategy(self.retries))
        _check_store(self.checkpoint_store)
        if self.image is not None and (not isinstance(self.image, str) or not self.image):
            raise ValueError(f"image={self.image!r} is not accepted; use a container image name or None")

    def task(
        self, func: Callable[P, R] | None = None, *, name: str | None = None, **settings: Unpack[TaskSettings]
    ) -> Any:
        """Declare a task; usable as ``@env.task`` or ``@env.task(retries=3, ...)``.

        ``settings`` (``TaskSettings``: retries, resources, env_vars, checkpoint_store, elastic,
        timeout) override the environment's for this task, as ``Task.override`` does (env_vars are
        merged). ``timeout``: seconds or a ``timedelta`` per attempt, or ``Timeout(max_runtime=,
        deadline=)`` (``stalwart.timeout``).
        """
        _check_settings("task", settings)

        def wrap(fn: Callable[P, R]) -> Task[P, R]:
            if not callable(fn) or not inspect.isfunction(fn):
                raise TypeError(f"@env.task decorates a function; got {fn!r}")
            inherited: Task[P, R] = Task(
                func=fn,
                environment=self,
                name=_check_name("task name", name or fn.__name__.strip("_") or "task"),
                retries=as_retry_strategy(self.retries),
                resources=self.resources,
                env_vars=_check_env_vars(self.env_vars),
                checkpoint_store=self.checkpoint_store,
                elastic=self.elastic,
                timeout=as_timeout(None),
            )
            return inherited.override(**settings)

        return wrap(func) if func is not None else wrap


@dataclass(frozen=True)
class Task(Generic[P, R]):
    """A function plus what it needs to run durably. Calling it runs the function here and now.

    ``stalwart.run(task, ...)`` runs it instead as attempts in fresh processes, with retries.
    """

    func: Callable[P, R]
    environment: TaskEnvironment
    name: str
    retries: RetryStrategy
    resources: Resources | None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    checkpoint_store: str | None = None
    elastic: Elastic | None = None
    """torch elastic settings; None runs the task as one process."""
    timeout: Timeout | None = None
    """wall-clock bounds per attempt and for the whole run (``stalwart.timeout``); None: none."""

    def __post_init__(self) -> None:
        # Look like the function (name, docs, module) to help(), IDEs and pickling by reference.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            object.__setattr__(self, attr, getattr(self.func, attr, None))
        object.__setattr__(self, "__wrapped__", self.func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now. Called inside a running task (a nested task), it keeps its own
        retries: an exception other than ``NonRetryableError`` is retried in this process, up to
        ``retries`` times with its backoff. (A crash of the process fails the calling attempt, whose
        own retries then apply; ``timeout`` bounds runs, not nested calls.)"""
        from .context import ctx

        if not ctx().in_task or self.retries.count == 0:
            return self.func(*args, **kwargs)
        if inspect.iscoroutinefunction(self.func):
            return _retried_async(self, args, kwargs)  # type: ignore[return-value]
        for retry in range(self.retries.count + 1):
            _wait_before(self, retry)
            try:
                return self.func(*args, **kwargs)
            except Exception as exc:
                _give_up_or_log(self, retry, exc)
        raise AssertionError("unreachable")  # the last retry returned or raised

    def override(self, **settings: Unpack[TaskSettings]) -> Task[P, R]:
        """A copy of this task with some settings replaced (``TaskSettings``; env_vars are merged;
        None leaves a setting as it is)."""
        _check_settings("override", settings)
        given: dict[str, Any] = {key: value for key, value in settings.items() if value is not None}
        changes: dict[str, Any] = {}
        if "retries" in given:
            changes["retries"] = as_retry_strategy(given["retries"])
        if "resources" in given:
            changes["resources"] = _check_resources(given["resources"])
        if "env_vars" in given:
            changes["env_vars"] = {**self.env_vars, **_check_env_vars(given["env_vars"])}
        if "checkpoint_store" in given:
            changes["checkpoint_store"] = _check_store(given["checkpoint_store"])
        if "elastic" in given:
            changes["elastic"] = _check_elastic(given["elastic"])
        if "timeout" in given:
            changes["timeout"] = as_timeout(given["timeout"])
        return replace(self, **changes)

    @property
    def signature(self) -> inspect.Signature:
        """The function's signature, string annotations resolved where possible."""
        try:
            return inspect.signature(self.func, eval_str=True)
        except Exception:
            return inspect.signature(self.func)

    def reference(self) -> tuple[str, str, str | None]:
        """(module, qualified name, file) by which a fresh process imports this task's function."""
        module = self.func.__module__
        if module == "__mp_main__":  # a script loaded the way multiprocessing's spawn (and our CLI) does
            module = "__main__"
        qualname = self.func.__qualname__
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(
                f"task {self.name!r} is defined inside a function ({qualname}); a fresh process can only "
                "import tasks defined at the top level of a module"
            )
        mod = sys.modules.get(module)
        file = getattr(mod, "__file__", None)
        return module, qualname, file


async def _retried_async(task: Task, args: tuple, kwargs: dict) -> Any:
    """``Task.__call__`` of a nested coroutine task: retried where it is awaited."""
    import asyncio

    for retry in range(task.retries.count + 1):
        if retry:
            await asyncio.sleep(task.retries.delay(retry))
        try:
            return await task.func(*args, **kwargs)
        except Exception as exc:
            _give_up_or_log(task, retry, exc)
    raise AssertionError("unreachable")


def _wait_before(task: Task, retry: int) -> None:
    if retry:
        import time

        time.sleep(task.retries.delay(retry))


def _give_up_or_log(task: Task, retry: int, exc: Exception) -> None:
    """Re-raise ``exc`` when a nested task's retries cannot help or are spent; else say it is retried."""
    from .retry import NonRetryableError

    if isinstance(exc, NonRetryableError) or retry >= task.retries.count:
        raise exc
    log.warning(
        "nested task %s raised %s: %s; retrying it (retry %d of %d)",
        task.name,
        type(exc).__name__,
        exc,
        retry + 1,
        task.retries.count,
    )
