"""A framework's checkpoint dict as a flash state, and the RNG states a resume needs to be exact.

The flash tier stores tensors and plain values (numbers, strings, bytes, None, containers) and refuses
anything else, because its metadata is unpickled with an allow-list and so never runs code. Framework
checkpoints hold a few other objects (hyper-parameter containers, numpy scalars, a precision plugin's
state): ``encode_checkpoint`` pickles those apart, with ``torch.save``, into one uint8 tensor, and
``decode_checkpoint`` unpickles them under the ``weights_only`` rule the framework applies to its own files.
"""

from __future__ import annotations

import io
import random
import sys
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["decode_checkpoint", "encode_checkpoint", "get_rng_state", "set_rng_state"]

PICKLED = "__stalwart_pickled__"
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)


def encode_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Tensors and plain values as they are; each other value becomes ``{PICKLED: i}``, the i-th object
    of a list saved with ``torch.save`` into the uint8 tensor at ``state[PICKLED]``."""
    objects: list[Any] = []

    def walk(value: Any) -> Any:
        kind = type(value)
        if isinstance(value, torch.Tensor):
            dense = kind in (torch.Tensor, torch.nn.Parameter) and value.layout == torch.strided
            if dense and not value.is_quantized:
                return value
        elif kind in _LEAVES:
            return value
        elif kind in (dict, OrderedDict) and all(type(k) in (str, int) for k in value):
            return kind((k, walk(v)) for k, v in value.items())
        elif kind in (list, tuple):
            return kind(walk(v) for v in value)
        objects.append(value)
        return {PICKLED: len(objects) - 1}

    state = walk(checkpoint)
    if objects:
        buffer = io.BytesIO()
        torch.save(objects, buffer)
        state[PICKLED] = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
    return state


def decode_checkpoint(state: dict[str, Any], *, weights_only: bool | None = None) -> dict[str, Any]:
    """The inverse of ``encode_checkpoint``; ``weights_only`` as in ``torch.load`` (None: torch's default)."""
    blob = state.pop(PICKLED, None)
    if blob is None:
        return state
    try:
        objects = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=weights_only)
    except Exception as exc:
        raise RuntimeError(
            f"this flash checkpoint holds objects that torch.load(weights_only={weights_only}) refuses "
            f"({exc}); if you trust it (your own job's state), load it with weights_only=False, as a .ckpt"
        ) from exc

    def walk(value: Any) -> Any:
        kind = type(value)
        if kind in (dict, OrderedDict):
            if len(value) == 1 and PICKLED in value:
                return objects[value[PICKLED]]
            return kind((k, walk(v)) for k, v in value.items())
        if kind in (list, tuple):
            return kind(walk(v) for v in value)
        return value

    return walk(state)


def get_rng_state() -> dict[str, Any]:
    """torch (and CUDA, once initialised), Python and, if imported, numpy RNG states, as a flash state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if (np := sys.modules.get("numpy")) is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (
            name,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(gauss),
        )
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and (np := sys.modules.get("numpy")) is not None:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
