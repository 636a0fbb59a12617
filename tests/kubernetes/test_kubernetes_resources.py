"""Mapping ``Resources`` to Kubernetes Pod fragments, checked against the Pod schema."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest

from stalwart.accelerators import (
    AMD_GPU,
    GPU,
    HABANA_GAUDI,
    MIG_PARTITIONS,
    NEURON_DEVICES,
    NVIDIA_GPUS,
    TPU,
    TPU_TOPOLOGIES,
    Neuron,
)
from stalwart.kubernetes.container_resources import (
    ACCELERATOR_LABEL_VALUES,
    DEFAULT_ACCELERATOR_LABEL_KEYS,
    SHM_VOLUME_NAME,
    KubernetesResources,
    to_kubernetes,
)
from stalwart.resources import Resources

K8S_VERSION = kubernetes_validate.latest_version()
# apimachinery's quantity grammar; the JSON schema does not check quantity strings, so we do.
QUANTITY_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
GKE_GPU = "cloud.google.com/gke-accelerator"


def pod_for(resources: Resources, **kwargs: object) -> dict:
    spec = {"containers": [{"name": "main", "image": "python:3.11"}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stalwart-test"},
        "spec": resources.to_kubernetes(**kwargs).apply(spec),
    }


def assert_valid_pod(pod: dict) -> None:
    kubernetes_validate.validate(pod, desired_version=K8S_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    for part in container.get("resources", {}).values():
        for name, value in part.items():
            assert isinstance(value, str) and QUANTITY_RE.match(value), (name, value)
    for value in pod["spec"].get("nodeSelector", {}).values():
        assert len(value) <= 63 and LABEL_VALUE_RE.match(value), value


def test_validator_is_strict() -> None:
    pod = pod_for(Resources(cpu=1))
    pod["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, desired_version=K8S_VERSION, strict=True)


# --- acceptance -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resources",
    [
        Resources(gpu=GPU(device="A100", quantity=1, partition="1g.5gb")),
        Resources(gpu="H200:8"),
        Resources(cpu=8, memory="32Gi", shm="16Gi"),
        Resources(shm="auto"),
        Resources(cpu=(0.5, 4), memory=("1.5Gi", "4Gi"), disk="100Gi", gpu=TPU("V5P", "4x4x4"), shm=2**30),
        Resources(gpu="Trn1:16", memory=2**34),
        Resources(gpu=AMD_GPU("MI300X", 8)),
        Resources(gpu=HABANA_GAUDI("Gaudi1", 8)),
        Resources(gpu=4),
        Resources(),
    ],
)
def test_pods_validate_against_the_kubernetes_schema(resources: Resources) -> None:
    assert_valid_pod(pod_for(resources))


def test_acceptance_shapes() -> None:
    mig = Resources(gpu=GPU(device="A100", quantity=1, partition="1g.5gb")).to_kubernetes()
    assert mig.accelerator_resource == "nvidia.com/mig-1g.5gb"
    assert mig.resources == {
        "requests": {"nvidia.com/mig-1g.5gb": "1"},
        "limits": {"nvidia.com/mig-1g.5gb": "1"},
    }
    assert mig.node_selector == {GKE_GPU: "nvidia-tesla-a100"}

    h200 = Resources(gpu="H200:8").to_kubernetes()
    assert h200.resources["limits"] == {"nvidia.com/gpu": "8"}
    assert h200.node_selector == {GKE_GPU: "nvidia-h200-141gb"}
    assert h200.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    cpu = Resources(cpu=8, memory="32Gi", shm="16Gi").to_kubernetes()
    assert cpu.resources == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"cpu": "8", "memory": "32Gi"},
    }
    assert cpu.accelerator_resource is None and cpu.node_selector == {} and cpu.tolerations == []
    assert cpu.volumes == [{"name": SHM_VOLUME_NAME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert cpu.volume_mounts == [{"name": SHM_VOLUME_NAME, "mountPath": "/dev/shm"}]

    auto = Resources(shm="auto").to_kubernetes()
    assert auto.volumes == [{"name": "stalwart-shm", "emptyDir": {"medium": "Memory"}}]
    assert auto.resources == {}


# --- resources dict -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "requests", "limits"),
    [
        ({"cpu": 0.5}, {"cpu": "500m"}, {"cpu": "500m"}),
        ({"cpu": "500m"}, {"cpu": "500m"}, {"cpu": "500m"}),
        ({"cpu": (1, "2500m")}, {"cpu": "1"}, {"cpu": "2500m"}),
        ({"memory": ("512Mi", "1.5Gi")}, {"memory": "512Mi"}, {"memory": "1.5Gi"}),
        ({"memory": 2**31}, {"memory": "2Gi"}, {"memory": "2Gi"}),
        ({"disk": ("10Gi", "20Gi")}, {"ephemeral-storage": "10Gi"}, {"ephemeral-storage": "20Gi"}),
    ],
)
def test_scalars_set_both_and_pairs_set_request_and_limit(kwargs: dict, requests: dict, limits: dict) -> None:
    assert Resources(**kwargs).to_kubernetes().resources == {"requests": requests, "limits": limits}


@pytest.mark.parametrize(
    ("device", "resource"),
    [
        (GPU("T4", 2), "nvidia.com/gpu"),
        (TPU("V6E", "2x4"), "google.com/tpu"),
        (Neuron("Inf2", 6), "aws.amazon.com/neuron"),
        (AMD_GPU("MI250X", 4), "amd.com/gpu"),
        (HABANA_GAUDI("Gaudi1", 2), "habana.ai/gaudi"),
    ],
    ids=str,
)
def test_accelerator_resource_names(device, resource: str) -> None:
    mapped = Resources(gpu=device).to_kubernetes()
    assert mapped.accelerator_resource == resource
    assert (
        mapped.resources["requests"][resource] == mapped.resources["limits"][resource] == str(device.quantity)
    )
    assert {"key": resource, "operator": "Exists", "effect": "NoSchedule"} in mapped.tolerations


@pytest.mark.parametrize(("model", "partition"), [(m, p) for m, ps in MIG_PARTITIONS.items() for p in ps])
def test_every_mig_partition_maps_to_its_mixed_strategy_resource(model: str, partition: str) -> None:
    mapped = Resources(gpu=GPU(model, 2, partition)).to_kubernetes()
    assert mapped.accelerator_resource == f"nvidia.com/mig-{partition}"
    assert mapped.resources["limits"] == {f"nvidia.com/mig-{partition}": "2"}
    assert "nvidia.com/gpu" not in mapped.resources["limits"]
    assert {t["key"] for t in mapped.tolerations} == {"nvidia.com/gpu", f"nvidia.com/mig-{partition}"}


def test_mig_pod_validates_and_partition_label_is_optional() -> None:
    resources = Resources(gpu=GPU("H200", 1, "1g.18gb"))
    assert_valid_pod(pod_for(resources, partition_label_key="cloud.google.com/gke-gpu-partition-size"))
    mapped = resources.to_kubernetes(partition_label_key="cloud.google.com/gke-gpu-partition-size")
    assert mapped.node_selector["cloud.google.com/gke-gpu-partition-size"] == "1g.18gb"
    assert "cloud.google.com/gke-gpu-partition-size" not in resources.to_kubernetes().node_selector


# --- node selectors -------------------------------------------------------------------------------


def test_nvidia_node_selector_uses_gke_values() -> None:
    values = set()
    for model in NVIDIA_GPUS:
        selector = Resources(gpu=f"{model}:1").to_kubernetes().node_selector
        assert list(selector) == [GKE_GPU]
        assert selector[GKE_GPU].startswith("nvidia-")
        values.add(selector[GKE_GPU])
    assert len(values) == len(NVIDIA_GPUS)  # every model selects its own nodes


@pytest.mark.parametrize(
    ("model", "value"),
    [
        ("T4", "nvidia-tesla-t4"),
        ("A100 80G", "nvidia-a100-80gb"),
        ("H100", "nvidia-h100-80gb"),
        ("L4", "nvidia-l4"),
    ],
)
def test_gke_accelerator_values(model: str, value: str) -> None:
    assert ACCELERATOR_LABEL_VALUES[model] == value


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("Trn1:16", "karpenter.k8s.aws/instance-family", "trn1"),
        ("Trn1n:16", "karpenter.k8s.aws/instance-family", "trn1n"),
        ("Inf2:12", "karpenter.k8s.aws/instance-family", "inf2"),
        ("Gaudi1:8", "karpenter.k8s.aws/instance-family", "dl1"),
        ("MI300X:8", "k8s.amazonaws.com/accelerator", "amd-mi300x"),
    ],
)
def test_default_label_keys_per_vendor(spec: str, key: str, value: str) -> None:
    assert Resources(gpu=spec).to_kubernetes().node_selector == {key: value}


@pytest.mark.parametrize("spec", ["A100:2", "Trn2:4", "MI355X:1", "Gaudi1:1"])
def test_label_key_is_overridable_and_can_be_dropped(spec: str) -> None:
    resources = Resources(gpu=spec)
    default = resources.to_kubernetes().node_selector
    custom = resources.to_kubernetes(accelerator_label_key="example.com/accelerator").node_selector
    assert custom == {"example.com/accelerator": next(iter(default.values()))}
    assert resources.to_kubernetes(accelerator_label_key=None).node_selector == {}


@pytest.mark.parametrize("key", ["", "bad key", "-x/y", "a/b/c", "x" * 64])
def test_invalid_label_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match=r"accelerator_label_key=.* is not a Kubernetes label key"):
        Resources(gpu="T4:1").to_kubernetes(accelerator_label_key=key)


def test_untyped_gpu_has_no_model_selector() -> None:
    mapped = Resources(gpu=2).to_kubernetes()
    assert mapped.node_selector == {}
    assert mapped.resources["limits"] == {"nvidia.com/gpu": "2"}


@pytest.mark.parametrize(
    ("device", "topology", "accelerator", "chips"),
    [
        ("V5P", "2x2x1", "tpu-v5p-slice", "4"),
        ("V5P", "8x16x16", "tpu-v5p-slice", "4"),
        ("V5E", "1x1", "tpu-v5-lite-podslice", "1"),
        ("V5E", "2x4", "tpu-v5-lite-podslice", "8"),
        ("V6E", "2x2", "tpu-v6e-slice", "4"),
        ("V6E", "16x16", "tpu-v6e-slice", "4"),
    ],
)
def test_tpu_selectors_and_chip_counts(device: str, topology: str, accelerator: str, chips: str) -> None:
    mapped = Resources(gpu=TPU(device, topology)).to_kubernetes(accelerator_label_key="ignored.example/key")
    assert mapped.node_selector == {
        "cloud.google.com/gke-tpu-accelerator": accelerator,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    assert mapped.resources["limits"] == {"google.com/tpu": chips}


def test_every_catalogue_device_has_a_label_value() -> None:
    for model in (*NVIDIA_GPUS, *NEURON_DEVICES, "MI300X", "Gaudi1"):
        assert LABEL_VALUE_RE.match(ACCELERATOR_LABEL_VALUES[model])
    assert set(DEFAULT_ACCELERATOR_LABEL_KEYS) == {"GPU", "NEURON", "AMD_GPU", "HABANA_GAUDI"}
    assert set(TPU_TOPOLOGIES) == {"V5P", "V5E", "V6E"}


# --- apply / to_dict ----------------------------------------------------------------------------------------


def test_apply_returns_a_new_dict_and_leaves_input_alone() -> None:
    spec = {"containers": [{"name": "main", "image": "python:3.11"}]}
    before = copy.deepcopy(spec)
    result = Resources(gpu="A100:8", shm="8Gi").to_kubernetes().apply(spec)
    assert spec == before
    assert result is not spec
    assert result["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}


def test_apply_targets_the_named_container_and_accepts_a_whole_pod() -> None:
    pod = pod_for(Resources())
    pod["spec"]["containers"].insert(0, {"name": "sidecar", "image": "busybox"})
    result = Resources(cpu=2, shm="auto").to_kubernetes().apply(pod, container_name="main")
    sidecar, main = result["spec"]["containers"]
    assert "resources" not in sidecar and "volumeMounts" not in sidecar
    assert main["resources"]["requests"] == {"cpu": "2"}
    assert main["volumeMounts"] == [{"name": "stalwart-shm", "mountPath": "/dev/shm"}]
    assert_valid_pod(result)
    with pytest.raises(ValueError, match="container_name='trainer' not found; containers: 'sidecar', 'main'"):
        Resources().to_kubernetes().apply(pod, container_name="trainer")
    with pytest.raises(ValueError, match="no containers"):
        Resources().to_kubernetes().apply({"containers": []})


def test_apply_merges_with_existing_settings_and_is_idempotent() -> None:
    spec = {
        "containers": [
            {"name": "main", "image": "x", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
        ],
        "nodeSelector": {"team": "ml"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
    }
    mapped = Resources(cpu=4, gpu="T4:1", shm="1Gi").to_kubernetes()
    once = mapped.apply(spec)
    assert once == mapped.apply(once)
    container = once["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "1Gi", "nvidia.com/gpu": "1"}
    assert once["nodeSelector"] == {"team": "ml", GKE_GPU: "nvidia-tesla-t4"}
    assert len(once["tolerations"]) == 2


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"nodeSelector": {GKE_GPU: "nvidia-l4"}}, "conflicts with 'nvidia-tesla-t4'"),
        ({"volumes": [{"name": "stalwart-shm", "emptyDir": {}}]}, "volumes already has"),
    ],
)
def test_apply_refuses_conflicts(extra: dict, fragment: str) -> None:
    spec = {"containers": [{"name": "main", "image": "x"}], **extra}
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Resources(gpu="T4:1", shm="1Gi").to_kubernetes().apply(spec)


def test_to_dict_is_a_deep_copy_and_matches_fields() -> None:
    mapped = Resources(cpu=1, gpu=TPU("V5P", "2x2x2"), shm="auto").to_kubernetes()
    data = mapped.to_dict()
    assert set(data) == {
        "resources",
        "accelerator_resource",
        "node_selector",
        "tolerations",
        "volumes",
        "volume_mounts",
    }
    data["resources"]["limits"]["cpu"] = "99"
    data["volumes"].clear()
    assert mapped.resources["limits"]["cpu"] == "1" and mapped.volumes
    assert KubernetesResources(**mapped.to_dict()) == mapped


def test_module_function_matches_method() -> None:
    resources = Resources(cpu=1, memory="1Gi", gpu="L40s:4")
    assert to_kubernetes(resources) == resources.to_kubernetes()
