"""A task's signature as a command line, parsed by cyclopts: ``--name value`` options into typed inputs.

``parse_task_inputs`` gives cyclopts a keyword-only copy of the task's signature, its resolved type
hints, and the command's own options (``--run-id`` and friends) in a group of their own; cyclopts
converts each value (ints, floats, bools, paths, enums, literals, unions, lists, dicts, dataclasses)
and renders ``--help`` from the task's docstring. Three converters keep the spellings ``stalwart run``
always took and Kubernetes manifests write: lists and tuples as ``1,2,3`` or JSON ``[1, 2, 3]``, ints as
``1e5``, enum members by value as well as by name, and unannotated inputs as JSON literals; ``--flag
false`` works as ``--flag=false`` does, and ``on``/``off`` as ``true``/``false``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import CliError

if TYPE_CHECKING:
    from ..environment import Task

__all__ = ["RUN_OPTIONS", "Option", "parse_task_inputs", "task_help"]

_MISSING: Any = object()  # an input not given on the command line
_ON_OFF = {"on": "true", "off": "false"}  # bool spellings stalwart run took and cyclopts does not
_OWN = "_stalwart_option_"  # the command's own options, as parameters no task input is named
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.MutableSequence)
SYNTAX = (
    "Lists take 1,2,3, JSON [1, 2, 3] or a repeated option; dicts and dataclasses take JSON; optional "
    "inputs take 'none'; booleans take --name, --no-name or --name false. Options whose names a task "
    "input uses go before FILE.py."
)


class Option(NamedTuple):
    """One option of the command itself, accepted among a task's inputs."""

    annotation: Any
    flags: tuple[str, ...]
    help: str
    metavar: str | None = None


RUN_OPTIONS: dict[str, Option] = {
    "run_id": Option(
        str,
        ("--run-id",),
        "name the run; an existing id resumes that run (one that succeeded: its output)",
        "ID",
    ),
    "checkpoint_store": Option(
        str, ("--checkpoint-store",), "fsspec URL under which the run's checkpoints live", "URL"
    ),
    "quiet": Option(bool, ("--quiet", "-q"), "do not copy the attempts' output to this terminal"),
    "rerun": Option(bool, ("--rerun",), "start a new attempt even if the run already succeeded"),
}


@dataclasses.dataclass(frozen=True)
class _Input:
    name: str
    kind: Any  # inspect.Parameter kind
    annotation: Any
    default: Any

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def option(self) -> str:
        return f"--{self.name.replace('_', '-')}" if not self.name.startswith("_") else f"--{self.name}"

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)


def parse_task_inputs(
    task: Task,
    argv: Sequence[str],
    *,
    prog: str | None = None,
    options: Mapping[str, Option] = RUN_OPTIONS,
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Turn ``--name value`` options into the task's inputs, typed by its annotations.

    Returns (positional-only inputs, keyword inputs, the command's ``options`` given among them). Only
    inputs given on the command line are returned, so the function's own defaults apply to the rest.
    A bad value, an unknown option or a missing input raises ``CliError`` naming it.
    """
    import cyclopts

    prog = prog or f"stalwart run FILE.py {task.name}"
    app, inputs, bools = _task_app(task, prog, options)
    unsupported = [i for i in inputs if i.required and not _settable(i.annotation)]
    if unsupported:
        names = ", ".join(f"{i.name!r} ({i.type_name})" for i in unsupported)
        raise CliError(f"task {task.name!r} needs inputs whose type the command line cannot give: {names}")
    try:
        command, bound, _ = app.parse_args(
            _join_bool_values(argv, bools), exit_on_error=False, print_error=False
        )
    except cyclopts.MissingArgumentError:  # cyclopts names the first; say every one
        named = {token.split("=", 1)[0] for token in argv}
        missing = [
            f"{i.option} ({i.type_name})"
            for i in inputs
            if i.required and _settable(i.annotation) and not {i.option, f"--{i.name}"} & named
        ]
        plural = "s" * (len(missing) != 1)
        raise CliError(
            f"missing required input{plural}: {', '.join(missing)}\nSee `{prog} --help`."
        ) from None
    except cyclopts.CycloptsError as exc:
        raise CliError(f"{exc}\nSee `{prog} --help`.") from None
    if command != app.default_command:  # --help
        raise _Help(lambda: command(*bound.args, **bound.kwargs))
    values = dict(bound.arguments)
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for item in inputs:
        value = values.get(item.name, _MISSING)
        if item.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(item.default if value is _MISSING else value)
        elif value is not _MISSING:
            keywords[item.name] = value
    given = {name: values[f"{_OWN}{name}"] for name in options if f"{_OWN}{name}" in values}
    return positional, keywords, given


class _Help(CliError):
    """``--help`` among a task's inputs: the caller prints it (``show()``) and exits 0."""

    def __init__(self, show: Callable[[], Any]) -> None:
        super().__init__("--help", code=0)
        self.show = show


def task_help(error: BaseException) -> Callable[[], Any] | None:
    """The printer of a task's ``--help``, if ``error`` is the request for it."""
    return error.show if isinstance(error, _Help) else None


def _task_app(task: Task, prog: str, options: Mapping[str, Option]) -> tuple[Any, list[_Input], set[str]]:
    """A cyclopts App of one task's signature (keyword-only), with the command's free options."""
    from cyclopts import App, Group, Parameter

    inputs = _signature_inputs(task)
    group = Group(f"Inputs of task {task.name}", sort_key=0)
    parameters: list[inspect.Parameter] = []
    taken: set[str] = set()
    bools: set[str] = set()
    hidden: list[_Input] = []
    for item in inputs:
        if not _settable(item.annotation):
            hidden.append(item)
            continue
        names = [item.option] + ([f"--{item.name}"] if f"--{item.name}" != item.option else [])
        described = item.type_name if item.required else f"{item.type_name}; default: {item.default!r}"
        settings: dict[str, Any] = {"name": names, "group": group, "help": described}
        _add_conversion(settings, item.annotation)
        if _is_bool(item.annotation):
            bools.update(names)
        taken.update(names + [f"--no-{n[2:]}" for n in names if _is_bool(item.annotation)])
        annotation = item.annotation
        if item.default is None and not _is_union(typing.get_origin(annotation)) and annotation is not Any:
            annotation = annotation | None  # `x: int = None`: cyclopts validates the default
        parameter = Parameter(show_default=False, **settings)
        parameters.append(_keyword(item.name, annotation, parameter, item.default))
    own = Group("Options", sort_key=1)
    for name, option in options.items():
        free = [flag for flag in option.flags if flag not in taken]
        if not free:
            continue
        if option.annotation is bool:
            bools.update(free)
        annotation = option.annotation if option.annotation is bool else option.annotation | None
        settings = {
            "name": free,
            "group": own,
            "help": option.help,
            "negative": "",
            "metavar": option.metavar,
        }
        default = False if option.annotation is bool else None
        parameters.append(
            _keyword(f"{_OWN}{name}", annotation, Parameter(show_default=False, **settings), default)
        )

    def inputs_of(**given: Any) -> dict[str, Any]:
        return given

    inputs_of.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    epilogue = [SYNTAX]
    if hidden:
        listed = ", ".join(f"{i.name} ({i.type_name})" for i in hidden)
        epilogue.insert(0, f"Inputs the command line cannot set (their defaults apply): {listed}.")
    app = App(
        name=prog,
        help=inspect.getdoc(task.func) or f"Task {task.name}.",
        help_flags=[flag for flag in ("--help", "-h") if flag not in taken],
        version_flags=[],
        help_format="plaintext",  # a docstring is the user's text, not rich markup
        help_epilogue=" ".join(epilogue),
    )
    app.default(inputs_of)
    return app, inputs, bools


def _keyword(name: str, annotation: Any, parameter: Any, default: Any) -> inspect.Parameter:
    """Keyword-only: every input is given as ``--name value``, positional-only ones included. Only
    what was given comes back, so the task's own defaults apply to the rest."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=typing.Annotated[annotation, parameter],
    )


def _join_bool_values(argv: Sequence[str], bools: set[str]) -> list[str]:
    """``--flag false`` as ``--flag=false``: cyclopts' flags take no separate value, our users did.
    (Every task input is an option, so a word after a flag can only be its value.)"""
    tokens = list(argv)
    joined: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token in bools and following is not None and not following.startswith("-"):
            joined.append(f"{token}={_ON_OFF.get(following.strip().lower(), following)}")
            index += 2
            continue
        name, equals, value = token.partition("=")
        if equals and name in bools and value.strip().lower() in _ON_OFF:
            token = f"{name}={_ON_OFF[value.strip().lower()]}"
        joined.append(token)
        index += 1
    return joined


def _add_conversion(settings: dict[str, Any], annotation: Any) -> None:
    """The converters that keep ``stalwart run``'s spellings where cyclopts' own differ."""
    core = _without_none(annotation)
    origin = typing.get_origin(core)
    if core is Any or core is object:
        settings["converter"] = _any_converter
    elif isinstance(core, type) and issubclass(core, enum.Enum):
        settings["converter"] = functools.partial(_enum_converter, annotation)
    elif core is int:
        settings["converter"] = functools.partial(_int_converter, annotation)
    elif core in _SEQUENCES or origin in _SEQUENCES:
        converter = functools.partial(_sequence_converter, annotation)
        settings.update(converter=converter, n_tokens=1, accepts_keys=False, negative="")
        settings["metavar"] = "A,B,..."
    elif dataclasses.is_dataclass(core) or core is dict or origin in (dict, collections.abc.Mapping):
        settings["metavar"] = "JSON"


def _none_spelled(type_: Any, raw: str) -> bool:
    return type(None) in typing.get_args(type_) and raw.strip().lower() in ("none", "null")


def _any_converter(type_: Any, tokens: Sequence[Any]) -> Any:
    """An unannotated input: a JSON literal (3, 0.1, true, [1, 2]) when it is one, else the string."""
    raw = tokens[0].value
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _enum_converter(annotation: Any, type_: Any, tokens: Sequence[Any]) -> Any:
    """A member by name (any case) or by value, as ``stalwart run`` always took it."""
    raw = tokens[0].value
    if _none_spelled(annotation, raw):
        return None
    kind = _without_none(annotation)
    for member in kind:
        if raw == member.name or raw == str(member.value):
            return member
    for member in kind:
        if raw.lower() == member.name.lower():
            return member
    raise ValueError(f'"{raw}" is not one of {", ".join(m.name for m in kind)}')


def _int_converter(annotation: Any, type_: Any, tokens: Sequence[Any]) -> int | None:
    """An int, also written as a whole float: 1e5 steps is common (``annotation``: the input's own
    type, as cyclopts hands a converter one member of a union)."""
    raw = tokens[0].value
    if _none_spelled(annotation, raw):
        return None
    try:
        return int(raw.strip())
    except ValueError:
        pass
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f'"{raw}" is not an int') from None
    if not number.is_integer():
        raise ValueError(f'"{raw}" is not a whole number')
    return int(number)


def _sequence_converter(annotation: Any, type_: Any, tokens: Sequence[Any]) -> Any:
    """Items given as ``1,2,3``, as JSON ``[1, 2, 3]``, or one per repeated option; each converted by
    cyclopts to the item type."""
    raws = [token.value for token in tokens]
    if len(raws) == 1 and _none_spelled(annotation, raws[0]):
        return None
    core = _without_none(annotation)
    items: list[str] = []
    for raw in raws:
        text = raw.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{raw!r} is not valid JSON ({exc})") from None
            if not isinstance(parsed, list):
                raise ValueError(f"{raw!r} is not a JSON list")
            items += [item if isinstance(item, str) else json.dumps(item) for item in parsed]
        elif text:
            items += [part.strip() for part in text.split(",")]
    origin = typing.get_origin(core) or core
    args = typing.get_args(core)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise ValueError(f"{_type_name(core)} needs {len(args)} items, got {len(items)}")
        return tuple(
            _item(kind, item, index) for index, (kind, item) in enumerate(zip(args, items, strict=True))
        )
    kind = args[0] if args else str
    values = [_item(kind, item, index) for index, item in enumerate(items)]
    build: Callable[[list[Any]], Any] = {tuple: tuple, set: set, frozenset: frozenset}.get(origin, list)
    return build(values)


def _item(kind: Any, raw: str, index: int) -> Any:
    """One item of a list, converted by cyclopts; its error names the item (cyclopts then the input)."""
    import cyclopts

    try:
        return cyclopts.convert(kind, [raw])
    except cyclopts.CycloptsError:
        raise ValueError(f"item {index} is {raw!r}, not {_type_name(kind)}") from None


def _signature_inputs(task: Task) -> list[_Input]:
    hints = _type_hints(task.func)
    inputs = []
    for param in task.signature.parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = _infer_type(param.default)
        inputs.append(_Input(param.name, param.kind, annotation, param.default))
    return inputs


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations; one unresolvable name (a TYPE_CHECKING import) spoils only its input."""
    try:
        return typing.get_type_hints(func)
    except Exception:
        pass
    hints: dict[str, Any] = {}
    namespace = getattr(func, "__globals__", {})
    for name, annotation in getattr(func, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # what get_type_hints does, per name
            except Exception:
                annotation = _Unresolved(annotation)
        hints[name] = annotation
    return hints


class _Unresolved:
    """An annotation that could not be evaluated; shown by name, not settable."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _infer_type(default: Any) -> Any:
    if isinstance(default, (bool, int, float, str, PurePath, list, tuple)):
        return type(default)
    return dict if isinstance(default, dict) else Any


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _without_none(annotation: Any) -> Any:
    """``X`` of ``X | None``; the annotation itself otherwise."""
    if _is_union(typing.get_origin(annotation)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_bool(annotation: Any) -> bool:
    return _without_none(annotation) is bool


def _settable(annotation: Any) -> bool:
    """Whether a command-line string can become a value of ``annotation``."""
    if annotation in (Any, object, bool, int, float, str, type(None)):
        return True
    if isinstance(annotation, _Unresolved):
        return False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return all(_settable(a) for a in args)
    if origin is typing.Literal:
        return True
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        return all(_settable(a) for a in args if a is not Ellipsis)
    if annotation is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return all(_settable(a) for a in args)
    return isinstance(annotation, type) and (
        issubclass(annotation, (PurePath, enum.Enum)) or dataclasses.is_dataclass(annotation)
    )


def _type_name(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, _Unresolved):
        return annotation.text
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)
