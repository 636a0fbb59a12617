"""A task's signature as a command line: ``--name value`` options parsed into typed inputs.

``parse_task_inputs`` builds an argparse parser from the task's parameters and type hints, so
``--help`` and usage errors read like any CLI's, and converts each string to the annotated type
(ints, floats, bools, paths, enums, literals, unions, lists, tuples, dicts, dataclasses). The run
options of ``stalwart run`` (``--run-id`` and friends) may be given among the inputs, so they live here.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import enum
import inspect
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..environment import Task

__all__ = ["add_run_options", "parse_task_inputs"]

_MISSING: Any = object()  # an input not given on the command line
_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})
_NONE = frozenset({"none", "null"})
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.MutableSequence)

_RUN_OPTIONS = {
    "run_id": (
        ("--run-id",),
        {
            "metavar": "ID",
            "help": "name the run; an existing id resumes that run (one that succeeded: its output)",
        },
    ),
    "checkpoint_store": (
        ("--checkpoint-store",),
        {"metavar": "URL", "help": "fsspec URL under which the run's checkpoints live"},
    ),
    "quiet": (
        ("--quiet", "-q"),
        {"action": "store_true", "help": "do not copy the attempts' output to this terminal"},
    ),
    "rerun": (
        ("--rerun",),
        {"action": "store_true", "help": "start a new attempt even if the run already succeeded"},
    ),
}

_FLAGS = frozenset({"quiet", "rerun"})


def add_run_options(
    parser: argparse.ArgumentParser | Any, *, defaults: bool, taken: frozenset[str] = frozenset()
) -> None:
    """Add --run-id/--checkpoint-store/--quiet/--rerun, skipping option strings a task input already uses."""
    for name, (flags, kwargs) in _RUN_OPTIONS.items():
        free = [flag for flag in flags if flag not in taken]
        if not free:
            continue
        default = (False if name in _FLAGS else None) if defaults else argparse.SUPPRESS
        parser.add_argument(*free, dest=f"run:{name}", default=default, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Input:
    name: str
    kind: Any  # inspect.Parameter kind
    annotation: Any
    type_name: str
    convert: Callable[[str], Any] | None  # None: the type cannot be given on the command line
    default: Any
    flag: bool  # bool input: a bare --name means true

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def dest(self) -> str:
        return f"input:{self.name}"

    @property
    def option(self) -> str:
        spelled = self.name.replace("_", "-")
        return f"--{self.name if spelled.startswith('-') else spelled}"


def parse_task_inputs(
    task: Task, argv: Sequence[str], *, prog: str | None = None
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Turn ``--name value`` options into the task's inputs, typed by its annotations.

    Returns (positional-only inputs, keyword inputs, run options given among them). Only inputs
    given on the command line are returned, so the function's own defaults apply to the rest.
    Usage errors exit through argparse (SystemExit 2) with a message naming the input and its type.
    """
    parser, inputs = _task_parser(task, prog or f"stalwart run FILE.py {task.name}")
    namespace = parser.parse_args(list(argv))
    values = vars(namespace)
    unsupported = [i for i in inputs if i.required and i.convert is None]
    missing = [
        f"{i.option} ({i.type_name})"
        for i in inputs
        if i.required and values.get(i.dest, _MISSING) is _MISSING
    ]
    if unsupported:
        names = ", ".join(f"{i.name!r} ({i.type_name})" for i in unsupported)
        parser.error(f"task {task.name!r} needs inputs whose type the command line cannot give: {names}")
    if missing:
        parser.error(f"missing required input{'s' * (len(missing) != 1)}: {', '.join(missing)}")
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for item in inputs:
        value = values.get(item.dest, _MISSING)
        if item.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(item.default if value is _MISSING else value)
        elif value is not _MISSING:
            keywords[item.name] = value
    run_options = {key[len("run:") :]: value for key, value in values.items() if key.startswith("run:")}
    return positional, keywords, run_options


def _task_parser(task: Task, prog: str) -> tuple[argparse.ArgumentParser, list[_Input]]:
    """An argparse parser of one task's signature, so --help and errors read like any CLI's."""
    doc = inspect.getdoc(task.func) or ""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc or None,
        add_help=False,
        allow_abbrev=False,  # a new input must never change what an abbreviation meant
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = _signature_inputs(task)
    taken: set[str] = set()
    group = parser.add_argument_group(f"inputs of task {task.name}")
    hidden: list[_Input] = []
    for item in inputs:
        if item.convert is None:
            hidden.append(item)
            continue
        primary = item.option
        aliases = [f"--{item.name}"] if f"--{item.name}" != primary else []
        default = "required" if item.required else f"default: {item.default!r}"
        help_text = f"{item.type_name}; {default}".replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": item.dest,
            "default": _MISSING,
            "type": _argument_type(item.convert, item.type_name),
        }
        if item.flag:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
            help_text += " (a bare flag means true)"
        else:
            kwargs["metavar"] = _metavar(item.annotation)
        group.add_argument(primary, help=help_text, **kwargs)
        taken.add(primary)
        for alias in aliases:  # --num_epochs as well as --num-epochs, kept out of --help
            group.add_argument(alias, help=argparse.SUPPRESS, **kwargs)
            taken.add(alias)
    for item in inputs:
        negative = f"--no-{item.option[2:]}"
        if item.flag and item.convert is not None and negative not in taken:
            group.add_argument(
                negative, dest=item.dest, action="store_const", const=False, help=argparse.SUPPRESS
            )
            taken.add(negative)
    options = parser.add_argument_group("run options")
    add_run_options(options, defaults=False, taken=frozenset(taken))
    help_flags = [flag for flag in ("-h", "--help") if flag not in taken]
    if help_flags:
        options.add_argument(*help_flags, action="help", help="show this message and exit")
    epilog = []
    if hidden:
        names = ", ".join(f"{i.name} ({i.type_name})" for i in hidden)
        epilog.append(f"Inputs the command line cannot set (their defaults apply): {names}.")
    epilog.append(
        "Lists take 1,2,3 or JSON [1, 2, 3]; dicts take JSON; optional inputs take 'none'. Run options "
        "whose names a task input uses go before FILE.py."
    )
    parser.epilog = "\n".join(epilog)
    return parser, inputs


def _signature_inputs(task: Task) -> list[_Input]:
    hints = _type_hints(task.func)
    inputs = []
    for param in task.signature.parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = _infer_type(param.default)
        convert = _converter(annotation)
        inputs.append(
            _Input(
                name=param.name,
                kind=param.kind,
                annotation=annotation,
                type_name=_type_name(annotation),
                convert=convert,
                default=param.default,
                flag=_is_bool(annotation),
            )
        )
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
    if default is inspect.Parameter.empty or default is None:
        return Any
    if isinstance(default, (bool, int, float, str, PurePath)):
        return type(default)
    if isinstance(default, (list, tuple)):
        return type(default)
    if isinstance(default, dict):
        return dict
    return Any


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if _is_union(typing.get_origin(annotation)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [bool]
    return False


def _argument_type(convert: Callable[[str], Any], type_name: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise argparse.ArgumentTypeError(f"expected {type_name}, got {raw!r}{detail}") from None

    parse.__name__ = type_name
    return parse


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if _is_union(origin):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _metavar(args[0])
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        return "A,B,..."
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return "JSON"
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "{" + ",".join(m.name for m in annotation) + "}"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "PATH"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return "JSON"
    return "VALUE" if annotation is Any else _type_name(annotation).upper()


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


def _converter(annotation: Any) -> Callable[[str], Any] | None:
    """A function from one command-line string to a value of ``annotation``; None if unsupported."""
    if annotation is Any or annotation is object:
        return _parse_any
    if isinstance(annotation, _Unresolved):
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return _union_converter(args)
    if origin is typing.Literal:
        return _literal_converter(args)
    if annotation is bool:
        return _parse_bool
    if annotation is int:
        return _parse_int
    if annotation is float:
        return _parse_float
    if annotation is str:
        return str
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        return _sequence_converter(origin or annotation, args)
    if annotation is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return _dict_converter(args)
    if isinstance(annotation, type):
        if issubclass(annotation, PurePath):
            return _path_converter(annotation)
        if issubclass(annotation, enum.Enum):
            return _enum_converter(annotation)
        if dataclasses.is_dataclass(annotation):
            return _dataclass_converter(annotation)
    return None


def _parse_any(raw: str) -> Any:
    """An unannotated input: a JSON literal (3, 0.1, true, [1, 2]) when it is one, else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("use true/false, 1/0 or yes/no")


def _parse_int(raw: str) -> int:
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)  # 1e5 steps is common; accept it when it is whole
    except ValueError:
        raise ValueError("") from None
    if number.is_integer():
        return int(number)
    raise ValueError("not a whole number")


def _parse_float(raw: str) -> float:
    return float(raw.strip())


def _path_converter(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        if not raw:
            raise ValueError("empty path")
        return kind(raw)

    return parse


def _union_converter(args: tuple[Any, ...]) -> Callable[[str], Any] | None:
    optional = type(None) in args
    converters = [_converter(a) for a in args if a is not type(None)]
    if any(c is None for c in converters):
        return None

    def parse(raw: str) -> Any:
        if optional and raw.strip().lower() in _NONE:
            return None
        for convert in converters:
            try:
                return convert(raw)  # type: ignore[misc]
            except (ValueError, TypeError):
                continue
        raise ValueError("")

    return parse


def _literal_converter(choices: tuple[Any, ...]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        for choice in choices:
            if isinstance(choice, str) and raw == choice:
                return choice
        for choice in choices:
            convert = _converter(type(choice))
            if convert is None or isinstance(choice, str):
                continue
            with contextlib.suppress(ValueError, TypeError):
                if convert(raw) == choice:
                    return choice
        raise ValueError("")

    return parse


def _enum_converter(kind: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        for member in kind:
            if raw == member.name or raw == str(member.value):
                return member
        for member in kind:
            if raw.lower() == member.name.lower():
                return member
        raise ValueError("one of " + ", ".join(m.name for m in kind))

    return parse


def _from_json(value: Any, convert: Callable[[str], Any]) -> Any:
    """Convert one JSON item with a string converter (it sees JSON text for non-strings)."""
    return convert(value if isinstance(value, str) else json.dumps(value))


def _sequence_converter(origin: Any, args: tuple[Any, ...]) -> Callable[[str], Any] | None:
    fixed: list[Callable[[str], Any]] | None = None
    if origin is tuple and args and args[-1] is not Ellipsis:
        converters = [_converter(a) for a in args]
        if any(c is None for c in converters):
            return None
        fixed = converters  # type: ignore[assignment]
        item_convert: Callable[[str], Any] | None = None
    else:
        item_convert = _converter(args[0]) if args else _parse_any
        if item_convert is None:
            return None
    build: Callable[[list[Any]], Any] = {tuple: tuple, set: set, frozenset: frozenset}.get(origin, list)

    def parse(raw: str) -> Any:
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"invalid JSON: {exc}") from None
            if not isinstance(items, list):
                raise ValueError("not a JSON list")
            raw_items: list[Any] = items
        else:
            raw_items = [part.strip() for part in text.split(",")] if text else []
        if fixed is not None:
            if len(raw_items) != len(fixed):
                raise ValueError(f"needs {len(fixed)} items, got {len(raw_items)}")
            pairs = list(zip(fixed, raw_items, strict=True))
        else:
            pairs = [(item_convert, item) for item in raw_items]  # type: ignore[misc]
        values = []
        for index, (convert, item) in enumerate(pairs):
            try:
                values.append(_from_json(item, convert))
            except (ValueError, TypeError):
                raise ValueError(f"item {index} is {item!r}") from None
        return build(values)

    return parse


def _json_object(raw: str, what: str) -> dict:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object{what}")
    return value


def _dict_converter(args: tuple[Any, ...]) -> Callable[[str], Any] | None:
    key_convert = _converter(args[0]) if args else None
    value_convert = _converter(args[1]) if len(args) > 1 else None
    if args and (key_convert is None or value_convert is None):
        return None

    def parse(raw: str) -> Any:
        value = _json_object(raw, "")
        if key_convert is None or value_convert is None:
            return value
        try:
            return {key_convert(k): _from_json(v, value_convert) for k, v in value.items()}
        except (ValueError, TypeError):
            raise ValueError("a key or value has the wrong type") from None

    return parse


def _dataclass_converter(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = _json_object(raw, " of its fields")
        hints = _type_hints(kind)
        fields = {}
        for key, item in value.items():
            convert = _converter(hints.get(key, Any))
            fields[key] = item if convert is None else _from_json(item, convert)
        return kind(**fields)

    return parse
