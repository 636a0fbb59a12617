"""The accelerator catalogue and the ``Device`` that names one accelerator request.

The shapes follow Flyte 2's SDK (``Device``, ``GPU``, ``TPU``, ``Neuron``, ``AMD_GPU``, ``HABANA_GAUDI``) so
task declarations read the same in both. Everything is validated against a closed catalogue because a
misspelt device or an impossible MIG profile otherwise surfaces as a Pod stuck in ``Pending`` forever.

Choices the catalogue encodes:

* NVIDIA, AMD and Habana: 1-8 devices per Pod (the largest common node has 8).
* NVIDIA MIG profiles per model, as published by NVIDIA; a MIG ``quantity`` counts slices (1-8).
* TPU slices (GKE): the topology decides the chips per Pod, the way GKE sizes ``google.com/tpu``. Every
  v5p VM (``ct5p-hightpu-4t``) has 4 chips, so a v5p Pod asks for 4 and ``2x2x1`` is one host. v5e/v6e
  slices of up to 8 chips are single-host (``1x1`` -> 1, ``2x2`` -> 4, ``2x4`` -> 8, the ``-1t``/``-4t``/
  ``-8t`` machine types); larger slices are multi-host with 4 chips per VM, which is what GKE provisions.
* Neuron: ``aws.amazon.com/neuron`` counts Neuron devices. Inferentia devices are independent, so any
  count up to the largest instance is valid (inf1.24xlarge: 16, inf2.48xlarge: 12). Trainium devices are
  linked in a ring/torus and collectives want power-of-two groups, so Trn1/Trn1n/Trn2/Trn2u take
  1, 2, 4, 8 or 16 (trn1.2xlarge has 1; trn1.32xlarge, trn1n.32xlarge, trn2.48xlarge and trn2u.48xlarge 16).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = [
    "ACCELERATORS",
    "AMD_GPU",
    "AMD_GPUS",
    "GPU",
    "HABANA_DEVICES",
    "HABANA_GAUDI",
    "MIG_PARTITIONS",
    "NEURON_DEVICES",
    "NEURON_QUANTITIES",
    "NVIDIA_GPUS",
    "TPU",
    "TPUS",
    "TPU_TOPOLOGIES",
    "Accelerator",
    "Device",
    "DeviceClass",
    "Neuron",
    "TPUSlice",
    "lookup",
    "tpu_slice",
]

DeviceClass = Literal["GPU", "TPU", "NEURON", "AMD_GPU", "HABANA_GAUDI"]
"""Accelerator vendor/kind; ``"GPU"`` means NVIDIA, as in Flyte."""

_CLASS_NAMES: dict[str, str] = {
    "GPU": "an NVIDIA GPU",
    "TPU": "a TPU",
    "NEURON": "an AWS Neuron device",
    "AMD_GPU": "an AMD GPU",
    "HABANA_GAUDI": "a Habana Gaudi device",
}
_HELPERS: dict[str, str] = {
    "GPU": "GPU",
    "TPU": "TPU",
    "NEURON": "Neuron",
    "AMD_GPU": "AMD_GPU",
    "HABANA_GAUDI": "HABANA_GAUDI",
}

_ONE_TO_EIGHT = tuple(range(1, 9))
_TRAINIUM = (1, 2, 4, 8, 16)

NVIDIA_GPUS: tuple[str, ...] = (
    "T4", "L4", "L40s", "A10", "A10G", "A100", "A100 80G", "H100", "H200", "B200", "V100",
)  # fmt: skip

MIG_PARTITIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "A100": ("1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
        "A100 80G": ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
        "H100": ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
        "H200": ("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
    }
)
"""MIG profiles per NVIDIA model; models not listed have no MIG."""

TPUS: tuple[str, ...] = ("V5P", "V5E", "V6E")

_V5P_TOPOLOGIES = (
    "2x2x1", "2x2x2", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
    "8x8x8", "8x8x16", "8x16x16", "16x16x16", "16x16x24",
)  # fmt: skip
_2D_TOPOLOGIES = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")

TPU_TOPOLOGIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"V5P": _V5P_TOPOLOGIES, "V5E": _2D_TOPOLOGIES, "V6E": _2D_TOPOLOGIES}
)
"""Slice topologies per TPU generation (the ones Google documents for GKE); the first is the default."""

NEURON_DEVICES: tuple[str, ...] = ("Inf1", "Inf2", "Trn1", "Trn1n", "Trn2", "Trn2u")

NEURON_QUANTITIES: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "Inf1": tuple(range(1, 17)),
        "Inf2": tuple(range(1, 13)),
        "Trn1": _TRAINIUM,
        "Trn1n": _TRAINIUM,
        "Trn2": _TRAINIUM,
        "Trn2u": _TRAINIUM,
    }
)
"""Valid ``aws.amazon.com/neuron`` counts per Pod for each Neuron device (see the module docstring)."""

AMD_GPUS: tuple[str, ...] = (
    "MI100", "MI210", "MI250", "MI250X", "MI300A", "MI300X", "MI325X", "MI350X", "MI355X",
)  # fmt: skip

HABANA_DEVICES: tuple[str, ...] = ("Gaudi1",)

# Quantities when the class is known but the model is not (e.g. ``gpu=4``).
_UNTYPED_QUANTITIES: dict[str, tuple[int, ...]] = {
    "GPU": _ONE_TO_EIGHT,
    "NEURON": tuple(range(1, 17)),
    "AMD_GPU": _ONE_TO_EIGHT,
    "HABANA_GAUDI": _ONE_TO_EIGHT,
}


@dataclass(frozen=True)
class Accelerator:
    """One catalogue entry: what a device is called and which requests of it make sense."""

    name: str
    device_class: DeviceClass
    quantities: tuple[int, ...]
    partitions: tuple[str, ...] = ()
    """MIG profiles (NVIDIA) or slice topologies (TPU)."""


def _build_catalogue() -> dict[str, Accelerator]:
    entries = [Accelerator(n, "GPU", _ONE_TO_EIGHT, MIG_PARTITIONS.get(n, ())) for n in NVIDIA_GPUS]
    entries += [Accelerator(n, "TPU", (), TPU_TOPOLOGIES[n]) for n in TPUS]
    entries += [Accelerator(n, "NEURON", NEURON_QUANTITIES[n]) for n in NEURON_DEVICES]
    entries += [Accelerator(n, "AMD_GPU", _ONE_TO_EIGHT) for n in AMD_GPUS]
    entries += [Accelerator(n, "HABANA_GAUDI", _ONE_TO_EIGHT) for n in HABANA_DEVICES]
    return {entry.name: entry for entry in entries}


ACCELERATORS: Mapping[str, Accelerator] = MappingProxyType(_build_catalogue())
"""Every accepted device, keyed by canonical name."""

_BY_FOLDED_NAME = {" ".join(name.lower().split()): entry for name, entry in ACCELERATORS.items()}


def lookup(name: str) -> Accelerator | None:
    """Find a catalogue entry by name, tolerating case and extra spaces (``"a100  80g"`` -> ``A100 80G``)."""
    return _BY_FOLDED_NAME.get(" ".join(name.lower().split()))


@dataclass(frozen=True)
class TPUSlice:
    """How a TPU topology lands on Kubernetes nodes."""

    topology: str
    chips: int
    hosts: int

    @property
    def chips_per_host(self) -> int:
        """The ``google.com/tpu`` count each Pod of the slice requests."""
        return self.chips // self.hosts


def tpu_slice(device: str, topology: str) -> TPUSlice:
    """Chips and hosts of a TPU slice, sized as GKE provisions it (see the module docstring)."""
    entry = lookup(device)
    if entry is None or entry.device_class != "TPU":
        raise ValueError(f"device={device!r} is not a TPU; accepted: {', '.join(TPUS)}")
    if topology not in entry.partitions:
        raise ValueError(
            f"partition={topology!r} is not a {entry.name} topology; accepted: {', '.join(entry.partitions)}"
        )
    chips = 1
    for side in topology.split("x"):
        chips *= int(side)
    per_host = 4 if entry.name == "V5P" or chips > 8 else chips
    return TPUSlice(topology=topology, chips=chips, hosts=chips // per_host)


def _describe(quantities: tuple[int, ...]) -> str:
    if quantities == tuple(range(quantities[0], quantities[-1] + 1)):
        return f"{quantities[0]}-{quantities[-1]}"
    return ", ".join(str(q) for q in quantities)


def _check_quantity(quantity: object, name: str, accepted: tuple[int, ...]) -> None:
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise TypeError(f"quantity={quantity!r} must be an int; accepted for {name}: {_describe(accepted)}")
    if quantity not in accepted:
        raise ValueError(f"quantity {quantity} is out of range for {name}; accepted: {_describe(accepted)}")


def _check_partition(entry: Accelerator, partition: str) -> str:
    folded = partition.strip().lower()
    for candidate in entry.partitions:
        if candidate.lower() == folded:
            return candidate
    if entry.device_class == "TPU":
        raise ValueError(
            f"partition={partition!r} is not a {entry.name} topology; accepted: {', '.join(entry.partitions)}"
        )
    if not entry.partitions:
        raise ValueError(
            f"partition={partition!r}: {entry.name} has no MIG partitions; "
            f"MIG models: {', '.join(MIG_PARTITIONS)}"
        )
    owners = [model for model, parts in MIG_PARTITIONS.items() if folded in parts]
    hint = f" ({partition!r} is a partition of {', '.join(owners)})" if owners else ""
    raise ValueError(
        f"partition={partition!r} is not a MIG partition of {entry.name}; "
        f"accepted: {', '.join(entry.partitions)}{hint}"
    )


def _validate(
    device_class: object, device: object, quantity: object, partition: object
) -> tuple[str | None, str | None]:
    """Check one request against the catalogue; return the canonical device name and partition.

    Messages name the offending argument and what is accepted, but not the call: callers prefix the
    spelling the user actually wrote (``GPU(...)``, ``gpu='A100:9'``).
    """
    if device_class not in _CLASS_NAMES:
        raise ValueError(f"device_class={device_class!r} is not known; accepted: {', '.join(_CLASS_NAMES)}")
    if partition is not None and not isinstance(partition, str):
        raise TypeError(f"partition={partition!r} must be a string such as '1g.5gb' or '2x2x1'")
    if device is None:
        if device_class == "TPU":
            raise ValueError(f"a TPU needs a device; accepted: {', '.join(TPUS)}")
        if partition is not None:
            raise ValueError(f"partition={partition!r} needs a device model, e.g. GPU('A100', 1, '1g.5gb')")
        kind = _CLASS_NAMES[device_class].split(" ", 1)[1]
        _check_quantity(quantity, kind, _UNTYPED_QUANTITIES[device_class])
        return None, None
    if not isinstance(device, str):
        raise TypeError(f"device={device!r} must be a string such as 'A100'")
    entry = lookup(device)
    if entry is None or entry.device_class != device_class:
        names = [e.name for e in ACCELERATORS.values() if e.device_class == device_class]
        message = f"device={device!r} is not {_CLASS_NAMES[device_class]}; accepted: {', '.join(names)}"
        if entry is not None:
            helper = _HELPERS[entry.device_class]
            kind = _CLASS_NAMES[entry.device_class]
            message += f" ({entry.name} is {kind}: use {helper}(device={entry.name!r}))"
        raise ValueError(message)
    canonical_partition = None if partition is None else _check_partition(entry, partition)
    if device_class == "TPU":
        topology = canonical_partition or entry.partitions[0]
        expected = tpu_slice(entry.name, topology).chips_per_host
        if quantity != expected or isinstance(quantity, bool):
            raise ValueError(
                f"quantity={quantity!r} does not match {entry.name} topology {topology} "
                f"({expected} chips per host); use TPU(device={entry.name!r}, partition={topology!r})"
            )
        return entry.name, topology
    _check_quantity(quantity, entry.name, entry.quantities)
    return entry.name, canonical_partition


@dataclass(frozen=True)
class Device:
    """One accelerator request: which device, how many per Pod, and an optional partition.

    ``partition`` is a MIG profile (``"1g.5gb"``) for NVIDIA or a slice topology (``"2x2x1"``) for TPUs.
    Prefer the helpers (``GPU``, ``TPU``, ``Neuron``, ``AMD_GPU``, ``HABANA_GAUDI``); constructing a
    ``Device`` directly is validated the same way and the device name is stored in canonical spelling.
    """

    quantity: int
    device_class: DeviceClass
    device: str | None = None
    partition: str | None = None

    def __post_init__(self) -> None:
        try:
            device, partition = _validate(self.device_class, self.device, self.quantity, self.partition)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"Device(quantity={self.quantity!r}, device_class={self.device_class!r}, "
                f"device={self.device!r}, partition={self.partition!r}): {error}"
            ) from None
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "partition", partition)

    @property
    def hosts(self) -> int:
        """Nodes the request spans: the TPU slice's host count, otherwise 1."""
        if self.device_class == "TPU" and self.device and self.partition:
            return tpu_slice(self.device, self.partition).hosts
        return 1

    def __str__(self) -> str:
        name = self.device or _CLASS_NAMES[self.device_class].split(" ", 1)[1]
        if self.device_class == "TPU":
            return f"{name} {self.partition}"
        text = f"{name}:{self.quantity}"
        return f"{text} ({self.partition})" if self.partition else text


def _make(
    label: str, quantity: object, device_class: DeviceClass, device: object, partition: object
) -> Device:
    try:
        canonical, canonical_partition = _validate(device_class, device, quantity, partition)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{label}: {error}") from None
    return Device(quantity, device_class, canonical, canonical_partition)  # type: ignore[arg-type]


def GPU(device: str, quantity: int, partition: str | None = None) -> Device:
    """An NVIDIA GPU, optionally a MIG slice of it: ``GPU("A100", 1, partition="1g.5gb")``."""
    label = f"GPU(device={device!r}, quantity={quantity!r}, partition={partition!r})"
    return _make(label, quantity, "GPU", device, partition)


def TPU(device: str, partition: str | None = None) -> Device:
    """A TPU slice on GKE: ``TPU("V5P", partition="2x2x1")``.

    Without a partition the smallest single-host slice (``2x2x1`` / ``1x1``) is used, since GKE needs a
    topology to place the Pod. The per-Pod chip count is derived from the topology.
    """
    label = f"TPU(device={device!r}, partition={partition!r})"
    entry = lookup(device) if isinstance(device, str) else None
    quantity: object = None
    if entry is not None and entry.device_class == "TPU":
        topology = partition if partition is not None else entry.partitions[0]
        try:
            quantity = tpu_slice(entry.name, _check_partition(entry, topology)).chips_per_host
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        partition = topology
    return _make(label, quantity, "TPU", device, partition)


def Neuron(device: str, quantity: int = 1) -> Device:
    """AWS Inferentia/Trainium devices: ``Neuron("Trn1", 16)``; valid counts in ``NEURON_QUANTITIES``."""
    return _make(f"Neuron(device={device!r}, quantity={quantity!r})", quantity, "NEURON", device, None)


def AMD_GPU(device: str, quantity: int = 1) -> Device:
    """AMD Instinct GPUs: ``AMD_GPU("MI300X", 8)``."""
    return _make(f"AMD_GPU(device={device!r}, quantity={quantity!r})", quantity, "AMD_GPU", device, None)


def HABANA_GAUDI(device: str, quantity: int = 1) -> Device:
    """Habana Gaudi accelerators: ``HABANA_GAUDI("Gaudi1", 8)``."""
    label = f"HABANA_GAUDI(device={device!r}, quantity={quantity!r})"
    return _make(label, quantity, "HABANA_GAUDI", device, None)
