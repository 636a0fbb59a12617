"""What an exact resume needs besides the caller's tensors: stateful objects and random number generators.

A resumed run equals an uninterrupted one only if everything that decides the next batch and the next
random draw comes back with the step. Two things ride in every flash object for that:

- **Stateful values.** A top-level value of the state with ``state_dict`` and ``load_state_dict`` (a
  module, an optimizer, an LR scheduler, torchdata's ``StatefulDataLoader``, a sampler) is saved as its
  ``state_dict()`` and given back through ``load_state_dict``, as PyTorch DCP does with ``Stateful``.
  A restore first fills the tensors of the object's current ``state_dict()`` in place.
- **Random number generators** of this rank (``rng=True``): Python's ``random``, NumPy's global
  generator (when NumPy is loaded) and torch's CPU and CUDA generators, under the key ``RESERVED``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["RESERVED", "capture_rng", "is_stateful", "restore_into", "restore_rng", "to_saved"]

RESERVED = "_stalwart"  # the saved state's key for what stalwart adds


def is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _check_keys(state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict (a state dict); got {type(state).__name__}")
    if RESERVED in state:
        raise ValueError(
            f"the state has a key {RESERVED!r}, which stalwart keeps for the random generators it saves; "
            "rename that key"
        )


def to_saved(state: Mapping[str, Any], *, rng: bool) -> dict[str, Any]:
    """The state as saved: stateful values as their ``state_dict()``, and this rank's generators."""
    _check_keys(state)
    saved = {key: value.state_dict() if is_stateful(value) else value for key, value in state.items()}
    if rng:
        saved[RESERVED] = {"rng": capture_rng()}
    return saved


def restore_into(
    state: MutableMapping[str, Any], load: Callable[[dict[str, Any]], int | None], *, rng: bool
) -> int | None:
    """Load a saved state (``load`` fills a dict in place and returns the step) into ``state``: plain
    values in place, stateful ones through ``load_state_dict``, then the generators (``rng``)."""
    _check_keys(state)
    if not isinstance(state, MutableMapping):
        raise TypeError(f"state must be a mutable dict; got {type(state).__name__}")
    stateful = {key: value for key, value in state.items() if is_stateful(value)}
    target = {key: value.state_dict() if key in stateful else value for key, value in state.items()}
    step = load(target)
    if step is None:
        return None
    added = target.pop(RESERVED, None)
    for key, value in target.items():
        if key in stateful:
            stateful[key].load_state_dict(value)
        else:
            state[key] = value
    if rng and isinstance(added, Mapping) and "rng" in added:
        restore_rng(added["rng"])
    return step


def capture_rng() -> dict[str, Any]:
    """This process's global random generator states, as plain values and tensors."""
    import torch

    version, internal, gauss = random.getstate()
    saved: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")  # only when the program loaded it: its generator may be in use
    if numpy is not None:  # its 624 keys as a tensor: as Python ints they cost 0.3 ms a save
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        keys = torch.from_numpy(keys.astype(numpy.int64))
        saved["numpy"] = [str(kind), keys, int(position), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # untested here: no GPU
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Set the generators ``capture_rng`` recorded (those this process has)."""
    import torch

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(saved["torch"])
    if "numpy" in saved:
        import numpy

        kind, keys, position, has_gauss, cached = saved["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), position, has_gauss, cached))
    if "cuda" in saved and torch.cuda.is_available():  # the devices both runs see (untested: no GPU)
        for device, state in enumerate(saved["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
