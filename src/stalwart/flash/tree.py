"""A state dict as a tree: its tensors taken out in order and a skeleton left with a ``TensorRef`` in
each tensor's place (``flatten``), that skeleton unpickled with an allow-list so a flash object can
never run code when loaded (``safe_loads``), and a saved skeleton laid back over the caller's state,
filling its tensors in place (``check_shapes``, ``merge_into``).

The byte format the skeleton travels in is ``objects``'; this module knows nothing of bytes.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import MutableMapping
from typing import Any

__all__ = ["DTYPE_NAMES", "TensorRef", "check_shapes", "dtype_name", "flatten", "merge_into", "safe_loads"]

DTYPE_NAMES: dict[Any, str] = {}  # torch dtype -> "float32": a cache, read on every save


class TensorRef(int):
    """Stands for the tensor at this index of the tensor table inside a pickled skeleton."""

    __slots__ = ()

    @property
    def index(self) -> int:
        return int(self)

    def __reduce__(self) -> tuple:
        return (TensorRef, (int(self),))

    def __repr__(self) -> str:
        return f"TensorRef({int(self)})"


def dtype_name(tensor: Any) -> str:
    return DTYPE_NAMES.get(tensor.dtype) or str(tensor.dtype).removeprefix("torch.")


def flatten(state: Any) -> tuple[Any, list]:
    """Split a nested state (dicts, lists, tuples) into a skeleton and its tensors, in order.

    A tensor that appears twice (tied weights) is stored once.
    """
    import torch

    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                raise ValueError(f"flash checkpoints store dense tensors; got a {value.layout} tensor")
            key = id(value)
            if key not in seen:
                seen[key] = len(tensors)
                tensors.append(value)
            return TensorRef(seen[key])
        if isinstance(value, collections.OrderedDict):
            return collections.OrderedDict((k, walk(v)) for k, v in value.items())
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(walk(v) for v in value)
        return value

    return walk(state), tensors


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("builtins", "bytearray"),
    (__name__, "TensorRef"),
    ("stalwart.flash.objects", "TensorRef"),  # where objects saved before 2026-12 name it
    ("torch", "Size"),
    ("torch", "device"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "TensorRef" and (module, name) in _SAFE_GLOBALS:
            return TensorRef
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a flash checkpoint; state values must be tensors, numbers, "
            "strings, bytes, None, or dicts/lists/tuples/sets of them"
        )


def _is_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def safe_loads(data: bytes | memoryview) -> Any:
    """Unpickle a skeleton: containers, plain values, ``TensorRef``, torch sizes, devices and dtypes."""
    return _SafeUnpickler(io.BytesIO(data)).load()


def _mismatch(entry: Any, current: Any, path: str) -> ValueError | None:
    """The error for a tensor of the caller's state whose shape or dtype is not the saved one."""
    if tuple(current.shape) == entry.shape and dtype_name(current) == entry.dtype:
        return None
    return ValueError(
        f"{path}: the checkpoint holds a {entry.dtype} tensor of shape {list(entry.shape)}, "
        f"the state a {dtype_name(current)} tensor of shape {list(current.shape)}"
    )


def check_shapes(skeleton: Any, current: Any, entries: list, path: str) -> None:
    """Raise if a tensor of the caller's state has another shape or dtype than the saved one."""
    import torch

    if isinstance(skeleton, TensorRef):
        entry = entries[skeleton.index]
        if isinstance(current, torch.Tensor) and (error := _mismatch(entry, current, path)):
            raise error
    elif isinstance(skeleton, dict) and isinstance(current, MutableMapping):
        for key, value in skeleton.items():
            check_shapes(value, current.get(key), entries, f"{path}[{key!r}]")
    elif (
        isinstance(skeleton, (list, tuple))
        and isinstance(current, (list, tuple))
        and len(current) == len(skeleton)
    ):
        for i, (value, old) in enumerate(zip(skeleton, current, strict=True)):
            check_shapes(value, old, entries, f"{path}[{i}]")


def merge_into(
    skeleton: Any, current: Any, entries: list, pairs: list, created: dict, path: str, *, write: bool = True
) -> Any:
    """Lay the saved skeleton over the caller's state: tensors are filled in place where the caller has
    one of the same shape and dtype, made where it has none (kept in ``created``, by index, and reused
    from it); plain values are replaced. ``write`` False: only find the (entry, tensor) ``pairs``,
    leaving the state's containers as they are."""
    import torch

    if isinstance(skeleton, TensorRef):
        entry = entries[skeleton.index]
        if isinstance(current, torch.Tensor):
            if error := _mismatch(entry, current, path):
                raise error
            pairs.append((entry, current))
            return current
        if skeleton.index not in created:
            created[skeleton.index] = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
            pairs.append((entry, created[skeleton.index]))
        return created[skeleton.index]
    if isinstance(skeleton, dict):
        target = current if isinstance(current, MutableMapping) else type(skeleton)()
        for key, value in skeleton.items():
            merged = merge_into(
                value, target.get(key), entries, pairs, created, f"{path}[{key!r}]", write=write
            )
            if write:
                target[key] = merged
        return target
    if isinstance(skeleton, list):
        items = (
            current if isinstance(current, list) and len(current) == len(skeleton) else [None] * len(skeleton)
        )
        for i, value in enumerate(skeleton):
            merged = merge_into(value, items[i], entries, pairs, created, f"{path}[{i}]", write=write)
            if write:
                items[i] = merged
        return items
    if isinstance(skeleton, tuple):
        old = (
            current
            if isinstance(current, tuple) and len(current) == len(skeleton)
            else (None,) * len(skeleton)
        )
        return tuple(
            merge_into(v, c, entries, pairs, created, f"{path}[{i}]", write=write)
            for i, (v, c) in enumerate(zip(skeleton, old, strict=True))
        )
    return skeleton
