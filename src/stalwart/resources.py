"""``Resources``: what one training process needs from the machine it runs on.

The shape matches Flyte 2's ``Resources`` so declarations port unchanged. Values are validated on
construction, because a wrong quantity found at submission time (or worse, a Pod pending forever)
costs far more than a ``ValueError`` at import time of the task module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stalwart.accelerators import TPU_TOPOLOGIES, Device, _validate, lookup
from stalwart.quantities import format_millicores, normalize_bytes, parse_bytes, parse_millicores

if TYPE_CHECKING:
    from stalwart.kubernetes.container_resources import KubernetesResources

__all__ = ["ByteQuantity", "CPUQuantity", "Resources", "parse_accelerator"]

CPUQuantity = int | float | str
"""Cores as a number (``2``, ``0.5``) or a Kubernetes string (``"500m"``, ``"2"``)."""

ByteQuantity = str | int
"""A Kubernetes byte quantity (``"32Gi"``, ``"512Mi"``, ``"1G"``) or an int number of bytes."""

_EXAMPLE_DEVICES = "T4, L4, A100, H100, H200, Trn1, Inf2, MI300X, Gaudi1"
_GPU_COUNTS = range(1, 9)


def parse_accelerator(spec: str, field: str = "gpu") -> Device:
    """Turn ``"DEVICE:QUANTITY"`` (``"A100:8"``, ``"A100 80G:2"``, ``"trn1:16"``) into a ``Device``.

    The device is looked up across the NVIDIA, Neuron, AMD and Habana catalogues, ignoring case, and
    the canonical name is kept. TPUs are sized by topology rather than count, so they need ``TPU()``.
    """
    name, sep, count = spec.rpartition(":")
    if not sep or not name.strip():
        raise ValueError(f"{field}={spec!r} must look like 'DEVICE:QUANTITY', e.g. 'A100:8' or 'Trn1:16'")
    entry = lookup(name)
    if entry is None:
        raise ValueError(
            f"{field}={spec!r}: unknown device {name.strip()!r}; accepted e.g. {_EXAMPLE_DEVICES} "
            f"(all: stalwart.accelerators.ACCELERATORS)"
        )
    if entry.device_class == "TPU":
        raise ValueError(
            f"{field}={spec!r}: TPUs are sized by slice topology, not a count; use "
            f"TPU(device={entry.name!r}, partition={TPU_TOPOLOGIES[entry.name][0]!r})"
        )
    if not count.strip().isdigit():
        raise ValueError(f"{field}={spec!r}: quantity {count!r} is not a whole number, e.g. '{entry.name}:1'")
    quantity = int(count)
    try:
        device, _ = _validate(entry.device_class, entry.name, quantity, None)
    except ValueError as error:
        raise ValueError(f"{field}={spec!r}: {error}") from None
    return Device(quantity, entry.device_class, device)


def _pair(field: str, value: object) -> tuple[Any, Any] | None:
    """Split a ``(request, limit)`` pair; ``None`` for a scalar."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{field}={value!r} must be one value or a (request, limit) pair")
        return value[0], value[1]
    return None


def _check_range(field: str, value: object, parse: Callable[[object, str], int]) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = _pair(field, value)
    if pair is None:
        amount = parse(value, field)
        return amount, amount
    request, limit = parse(pair[0], field), parse(pair[1], field)
    if request > limit:
        raise ValueError(
            f"{field}={value!r}: request {pair[0]!r} is larger than limit {pair[1]!r}; "
            f"use (request, limit) with request <= limit"
        )
    return request, limit


@dataclass(frozen=True)
class Resources:
    """CPU, memory, accelerators, ephemeral disk and shared memory for one task process.

    Examples::

        Resources(cpu=8, memory="32Gi", gpu="A100:8", shm="16Gi")
        Resources(cpu=(1, 4), memory=("2Gi", "8Gi"), disk="100Gi")
        Resources(gpu=GPU(device="A100", quantity=1, partition="1g.5gb"))
        Resources(gpu=TPU(device="V5P", partition="2x2x1"))

    Args:
        cpu: cores as ``int``/``float`` (> 0), a string (``"500m"``, ``"2"``), or a ``(request, limit)``
            pair with request <= limit.
        memory: a Kubernetes byte quantity (``"32Gi"``, ``"512Mi"``, ``"1G"``, ``"1.5Gi"``) or int bytes,
            or a ``(request, limit)`` pair.
        gpu: an ``int`` (that many NVIDIA GPUs of any type, 1-8), ``"DEVICE:QUANTITY"`` (``"T4:1"``,
            ``"A100 80G:2"``, ``"Trn1:16"``, ``"MI300X:8"``), or a ``Device`` from ``GPU()``, ``TPU()``,
            ``Neuron()``, ``AMD_GPU()``, ``HABANA_GAUDI()``.
        disk: ephemeral storage, same forms as ``memory``.
        shm: size of ``/dev/shm`` (a byte quantity), or ``"auto"`` for a memory-backed ``/dev/shm``
            without a size limit (bounded by the container's memory limit). PyTorch DataLoader workers
            pass batches through ``/dev/shm``, and the container default of 64Mi is too small for them.
    """

    cpu: CPUQuantity | tuple[CPUQuantity, CPUQuantity] | None = None
    memory: ByteQuantity | tuple[ByteQuantity, ByteQuantity] | None = None
    gpu: str | int | Device | None = None
    disk: ByteQuantity | tuple[ByteQuantity, ByteQuantity] | None = None
    shm: ByteQuantity | None = None

    def __post_init__(self) -> None:
        for name in ("cpu", "memory", "disk"):
            value = getattr(self, name)
            if isinstance(value, list):  # keep the frozen dataclass hashable
                object.__setattr__(self, name, tuple(value))
        _check_range("cpu", self.cpu, parse_millicores)  # type: ignore[arg-type]
        _check_range("memory", self.memory, parse_bytes)  # type: ignore[arg-type]
        _check_range("disk", self.disk, parse_bytes)  # type: ignore[arg-type]
        self.get_device()
        if self.shm is not None and self.shm != "auto":
            if isinstance(self.shm, (tuple, list)):
                raise TypeError(f"shm={self.shm!r} must be one size such as '16Gi' or 'auto', not a pair")
            if isinstance(self.shm, str) and self.shm.strip().lower() == "auto":
                object.__setattr__(self, "shm", "auto")
            else:
                parse_bytes(self.shm, "shm")

    def get_device(self) -> Device | None:
        """The accelerator request as a ``Device`` (``None`` without one); raises if ``gpu`` is invalid."""
        gpu = self.gpu
        if gpu is None or isinstance(gpu, Device):
            return gpu
        if isinstance(gpu, str):
            return parse_accelerator(gpu)
        if isinstance(gpu, bool) or not isinstance(gpu, int):
            raise TypeError(
                f"gpu={gpu!r} must be an int count (1-8), a string like 'A100:8', or a Device from "
                f"GPU()/TPU()/Neuron()/AMD_GPU()/HABANA_GAUDI(), not {type(gpu).__name__}"
            )
        if gpu not in _GPU_COUNTS:
            hint = "; use gpu=None for no accelerator" if gpu == 0 else ""
            raise ValueError(
                f"gpu={gpu!r} is out of range; accepted: 1-8 NVIDIA GPUs of any type, or 'DEVICE:QUANTITY' "
                f"such as 'A100:8'{hint}"
            )
        return Device(gpu, "GPU")

    def get_cpu(self) -> tuple[str, str] | None:
        """``(request, limit)`` in Kubernetes spelling (``0.5`` -> ``"500m"``), or ``None`` if unset."""
        amounts = _check_range("cpu", self.cpu, parse_millicores)  # type: ignore[arg-type]
        return None if amounts is None else (format_millicores(amounts[0]), format_millicores(amounts[1]))

    def get_memory(self) -> tuple[str, str] | None:
        """``(request, limit)`` byte quantities as written (ints become ``"512Mi"`` style), or ``None``."""
        return self._bytes("memory", self.memory)

    def get_disk(self) -> tuple[str, str] | None:
        """``(request, limit)`` ephemeral storage, like ``get_memory``."""
        return self._bytes("disk", self.disk)

    def get_shared_memory(self) -> str | None:
        """``/dev/shm`` size as a quantity string, ``"auto"``, or ``None`` to leave the runtime default."""
        if self.shm is None or self.shm == "auto":
            return self.shm
        return normalize_bytes(self.shm, "shm")

    @staticmethod
    def _bytes(field: str, value: Any) -> tuple[str, str] | None:
        if value is None:
            return None
        pair = _pair(field, value)
        if pair is None:
            return normalize_bytes(value, field), normalize_bytes(value, field)
        return normalize_bytes(pair[0], field), normalize_bytes(pair[1], field)

    def to_kubernetes(
        self, *, accelerator_label_key: str | None = "auto", partition_label_key: str | None = None
    ) -> KubernetesResources:
        """Map to container resources, node selector, tolerations and volumes (plain dicts).

        See ``stalwart.kubernetes.container_resources.to_kubernetes`` for the label keys and their defaults.
        """
        from stalwart.kubernetes.container_resources import to_kubernetes

        return to_kubernetes(
            self, accelerator_label_key=accelerator_label_key, partition_label_key=partition_label_key
        )
