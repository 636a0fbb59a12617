"""Map ``Resources`` onto a Kubernetes Pod: container resources, node selector, tolerations, volumes.

Everything is a plain dict so manifests can be built, diffed and validated without the ``kubernetes``
client installed.

Label keys (node selectors) and why:

* TPU: GKE's own ``cloud.google.com/gke-tpu-accelerator`` (``tpu-v5p-slice``, ``tpu-v5-lite-podslice``,
  ``tpu-v6e-slice``) and ``cloud.google.com/gke-tpu-topology``. TPUs only exist on GKE, which sets and
  requires both, so these are not configurable.
* NVIDIA: ``cloud.google.com/gke-accelerator`` with GKE's values (``nvidia-tesla-a100``,
  ``nvidia-h100-80gb``...). GKE sets it on every GPU node, tools that target GKE (e.g. Kubeflow
  Pipelines) select on it, and self-managed clusters often copy the convention. Models GKE does not
  offer (A10, A10G, L40s) follow the same ``nvidia-<model>`` naming.
* Neuron and Habana: ``karpenter.k8s.aws/instance-family`` (``trn1``, ``inf2``, ``dl1``...), which
  Karpenter sets automatically on EKS; Gaudi1 only exists as the ``dl1`` family.
* AMD: no provider sets a model label with stable values, so the generic
  ``k8s.amazonaws.com/accelerator`` (Flyte's default GPU node label) with ``amd-<model>`` values.

``to_kubernetes(accelerator_label_key=...)`` overrides the key for NVIDIA/AMD/Neuron/Habana (the values
stay the same), or drops the model selector with ``None``. A request without a model (``gpu=2``) gets no
model selector: the resource request alone finds a node with GPUs.

MIG slices use the GPU operator's "mixed" strategy resource names (``nvidia.com/mig-1g.5gb``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from stalwart.accelerators import ACCELERATORS, Device

if TYPE_CHECKING:
    from stalwart.resources import Resources

__all__ = [
    "ACCELERATOR_LABEL_VALUES",
    "ACCELERATOR_RESOURCE_NAMES",
    "DEFAULT_ACCELERATOR_LABEL_KEYS",
    "SHM_MOUNT_PATH",
    "SHM_VOLUME_NAME",
    "TPU_ACCELERATOR_LABEL",
    "TPU_ACCELERATOR_VALUES",
    "TPU_TOPOLOGY_LABEL",
    "KubernetesResources",
    "to_kubernetes",
]

ACCELERATOR_RESOURCE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "GPU": "nvidia.com/gpu",
        "TPU": "google.com/tpu",
        "NEURON": "aws.amazon.com/neuron",
        "AMD_GPU": "amd.com/gpu",
        "HABANA_GAUDI": "habana.ai/gaudi",
    }
)
"""Extended resource advertised by each vendor's device plugin."""

TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
TPU_ACCELERATOR_VALUES: Mapping[str, str] = MappingProxyType(
    {"V5P": "tpu-v5p-slice", "V5E": "tpu-v5-lite-podslice", "V6E": "tpu-v6e-slice"}
)

DEFAULT_ACCELERATOR_LABEL_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "GPU": "cloud.google.com/gke-accelerator",
        "NEURON": "karpenter.k8s.aws/instance-family",
        "HABANA_GAUDI": "karpenter.k8s.aws/instance-family",
        "AMD_GPU": "k8s.amazonaws.com/accelerator",
    }
)
"""Node label key per vendor used when ``accelerator_label_key="auto"`` (see the module docstring)."""

_NVIDIA_VALUES = {
    "T4": "nvidia-tesla-t4",
    "L4": "nvidia-l4",
    "L40s": "nvidia-l40s",
    "A10": "nvidia-a10",
    "A10G": "nvidia-a10g",
    "A100": "nvidia-tesla-a100",
    "A100 80G": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
    "H200": "nvidia-h200-141gb",
    "B200": "nvidia-b200",
    "V100": "nvidia-tesla-v100",
}


def _label_value(name: str, device_class: str) -> str:
    if device_class == "GPU":
        return _NVIDIA_VALUES[name]
    if device_class == "AMD_GPU":
        return f"amd-{name.lower()}"
    if device_class == "HABANA_GAUDI":
        return "dl1"
    return name.lower()  # Neuron: the EC2 instance family, e.g. trn1n


ACCELERATOR_LABEL_VALUES: Mapping[str, str] = MappingProxyType(
    {
        name: _label_value(name, entry.device_class)
        for name, entry in ACCELERATORS.items()
        if entry.device_class != "TPU"
    }
)
"""Node label value per device model (NVIDIA, AMD, Neuron, Habana)."""

SHM_VOLUME_NAME = "stalwart-shm"
SHM_MOUNT_PATH = "/dev/shm"

_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class KubernetesResources:
    """The Pod fragments a ``Resources`` needs; ``apply`` merges them into a pod spec."""

    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    """The container ``resources`` dict: ``{"requests": {...}, "limits": {...}}`` (empty parts omitted)."""
    accelerator_resource: str | None = None
    """Extended resource name of the accelerator (``nvidia.com/gpu``, ``nvidia.com/mig-1g.5gb``...)."""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of every field, keyed like the attributes (for logging, YAML, templates)."""
        return copy.deepcopy(
            {
                "resources": self.resources,
                "accelerator_resource": self.accelerator_resource,
                "node_selector": self.node_selector,
                "tolerations": self.tolerations,
                "volumes": self.volumes,
                "volume_mounts": self.volume_mounts,
            }
        )

    def apply(self, pod_spec: dict[str, Any], container_name: str | None = None) -> dict[str, Any]:
        """Return a copy of ``pod_spec`` with these resources merged in; the input is not modified.

        ``pod_spec`` may also be a whole Pod (``{"kind": "Pod", "spec": {...}}``). The container is the
        one named ``container_name``, or the first. Values set here win for the keys they set; a
        conflicting node selector or a different volume of the same name raises ``ValueError`` rather
        than silently scheduling somewhere else.
        """
        result = copy.deepcopy(pod_spec)
        spec = result["spec"] if "spec" in result and "containers" not in result else result
        containers = spec.get("containers")
        if not containers:
            raise ValueError("pod_spec has no containers; add one before applying resources")
        if container_name is None:
            container = containers[0]
        else:
            matches = [c for c in containers if c.get("name") == container_name]
            if not matches:
                names = ", ".join(repr(c.get("name")) for c in containers)
                raise ValueError(f"container_name={container_name!r} not found; containers: {names}")
            container = matches[0]

        if self.resources:
            merged = container.setdefault("resources", {})
            for part, values in self.resources.items():
                merged.setdefault(part, {}).update(values)
        if self.node_selector:
            selector = spec.setdefault("nodeSelector", {})
            for key, value in self.node_selector.items():
                if selector.get(key, value) != value:
                    raise ValueError(
                        f"nodeSelector {key}={selector[key]!r} in the pod spec conflicts with {value!r} "
                        f"required by the resources"
                    )
                selector[key] = value
        _extend(spec, "tolerations", self.tolerations, key=None)
        _extend(spec, "volumes", self.volumes, key="name")
        _extend(container, "volumeMounts", self.volume_mounts, key="mountPath")
        return result


def _extend(target: dict[str, Any], name: str, items: list[dict[str, Any]], key: str | None) -> None:
    """Append ``items`` to ``target[name]``, skipping exact duplicates and refusing clashes on ``key``."""
    if not items:
        return
    existing = target.setdefault(name, [])
    for item in items:
        if item in existing:
            continue
        clash = [e for e in existing if key is not None and e.get(key) == item[key]]
        if clash:
            raise ValueError(f"{name} already has {clash[0]!r}; stalwart needs {item!r} with the same {key}")
        existing.append(copy.deepcopy(item))


def _accelerator(
    device: Device, label_key: str | None, partition_label_key: str | None
) -> tuple[str, int, dict[str, str], list[str]]:
    """Resource name, count, node selector and taint keys to tolerate for one device."""
    resource = ACCELERATOR_RESOURCE_NAMES[device.device_class]
    taints = [resource]
    selector: dict[str, str] = {}
    if device.device_class == "TPU":
        assert device.device is not None and device.partition is not None  # guaranteed by TPU validation
        selector[TPU_ACCELERATOR_LABEL] = TPU_ACCELERATOR_VALUES[device.device]
        selector[TPU_TOPOLOGY_LABEL] = device.partition
        return resource, device.quantity, selector, taints
    if device.device is not None:
        key = DEFAULT_ACCELERATOR_LABEL_KEYS[device.device_class] if label_key == "auto" else label_key
        if key is not None:
            selector[key] = ACCELERATOR_LABEL_VALUES[device.device]
    if device.partition is not None:  # NVIDIA MIG, "mixed" strategy
        resource = f"nvidia.com/mig-{device.partition}"
        taints.append(resource)
        if partition_label_key is not None:
            selector[partition_label_key] = device.partition
    return resource, device.quantity, selector, taints


def _check_label_key(name: str, key: str | None) -> None:
    if key is None or (name == "accelerator_label_key" and key == "auto"):
        return
    if not isinstance(key, str) or not _LABEL_KEY_RE.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise ValueError(
            f"{name}={key!r} is not a Kubernetes label key; use e.g. 'cloud.google.com/gke-accelerator'"
        )


def to_kubernetes(
    resources: Resources,
    *,
    accelerator_label_key: str | None = "auto",
    partition_label_key: str | None = None,
) -> KubernetesResources:
    """Build the Pod fragments for ``resources``.

    Args:
        resources: what to map.
        accelerator_label_key: node label key selecting the accelerator model for NVIDIA, AMD, Neuron
            and Habana; ``"auto"`` uses ``DEFAULT_ACCELERATOR_LABEL_KEYS``, ``None`` omits the selector.
            TPU labels are GKE's and not affected.
        partition_label_key: optional node label key for the MIG profile, e.g. GKE's
            ``cloud.google.com/gke-gpu-partition-size``; off by default because with the "mixed" MIG
            strategy the resource name already selects nodes with that profile.
    """
    _check_label_key("accelerator_label_key", accelerator_label_key)
    _check_label_key("partition_label_key", partition_label_key)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for name, pair in (
        ("cpu", resources.get_cpu()),
        ("memory", resources.get_memory()),
        ("ephemeral-storage", resources.get_disk()),
    ):
        if pair is not None:
            requests[name], limits[name] = pair

    accelerator_resource = None
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = []
    device = resources.get_device()
    if device is not None:
        accelerator_resource, count, node_selector, taints = _accelerator(
            device, accelerator_label_key, partition_label_key
        )
        # Extended resources cannot be overcommitted: Kubernetes requires request == limit.
        requests[accelerator_resource] = limits[accelerator_resource] = str(count)
        tolerations = [{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in taints]

    volumes: list[dict[str, Any]] = []
    volume_mounts: list[dict[str, Any]] = []
    shm = resources.get_shared_memory()
    if shm is not None:
        empty_dir: dict[str, str] = {"medium": "Memory"}
        if shm != "auto":
            empty_dir["sizeLimit"] = shm
        volumes.append({"name": SHM_VOLUME_NAME, "emptyDir": empty_dir})
        volume_mounts.append({"name": SHM_VOLUME_NAME, "mountPath": SHM_MOUNT_PATH})

    container_resources = {
        part: values for part, values in (("requests", requests), ("limits", limits)) if values
    }
    return KubernetesResources(
        resources=container_resources,
        accelerator_resource=accelerator_resource,
        node_selector=node_selector,
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=volume_mounts,
    )
