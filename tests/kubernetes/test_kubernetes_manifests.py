"""Pods, PyTorchJobs and TrainJobs rendered from tasks, validated against the real CRD schemas.

Custom resources are checked with the CRDs in ``../shared/k8s`` (see ``crd_schema`` for how their
OpenAPI schema becomes a strict JSON Schema); Pods and the pod templates inside jobs with
``kubernetes-validate`` in strict mode. No cluster runs here.
"""

from __future__ import annotations

import copy
import enum
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from crd_schema import check_metadata, errors, load_schema

import stalwart as sw
from stalwart.cli.inputs import parse_task_inputs
from stalwart.kubernetes.manifests import (
    POD_LOCAL_CHECKPOINT_STORE,
    default_kind,
    object_name,
    render,
)

K8S = Path(__file__).resolve().parents[3] / "shared" / "k8s"
K8S_VERSION = kubernetes_validate.latest_version()
pytestmark = pytest.mark.skipif(
    not K8S.is_dir(), reason=f"the CRD schemas are not beside the repository ({K8S} is missing)"
)
IMAGE = "ghcr.io/acme/train:1"
STORE = "s3://bucket/ckpt"

gpu_env = sw.TaskEnvironment(
    name="gpu", image=IMAGE, resources=sw.Resources(cpu=16, memory="200Gi", gpu="H100:8", shm="auto")
)


@gpu_env.task(
    retries=2,
    elastic=sw.Elastic(
        nnodes="2:4",
        nproc_per_node=8,
        max_restarts=3,
        rdzv_configs={"join_timeout": 600},
        run_policy=sw.RunPolicy(
            clean_pod_policy="Running", ttl_seconds_after_finished=3600, active_deadline_seconds=86400
        ),
    ),
)
def pretrain(steps: int, lr: float = 3e-4) -> float:
    return lr * steps


mig = sw.TaskEnvironment(name="mig", image=IMAGE, env_vars={"HF_HOME": "/cache"})


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@mig.task(resources=sw.Resources(gpu=sw.GPU(device="A100", quantity=1, partition="1g.5gb")))
def evaluate(
    n: int, scale: float = 1.0, flag: bool = False, ids: list[int] | None = None, mode: Mode = Mode.FAST
) -> int:
    return n


cpu_env = sw.TaskEnvironment(name="cpu", image=IMAGE, env_vars={"OMP_NUM_THREADS": "4"})


@cpu_env.task(elastic=sw.Elastic(nproc_per_node=2, increase_shared_mem=False))
def ddp_cpu() -> None: ...


@cpu_env.task(
    resources=sw.Resources(memory="8Gi", shm="16Gi"), elastic=sw.Elastic(nnodes=3, start_method="fork")
)
def sized_shm() -> None: ...


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {
        "PyTorchJob": load_schema(K8S / "kubeflow.org_pytorchjobs.v1.9.0.yaml", "v1"),
        "TrainJob": load_schema(K8S / "trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    }


def validate_pod(pod: dict) -> None:
    kubernetes_validate.validate(pod, desired_version=K8S_VERSION, strict=True)
    assert check_metadata(pod["metadata"]) == []


def as_pod(name: str, labels: dict, spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}


def validate(manifest: dict, schemas: dict[str, dict]) -> None:
    """The whole object against its CRD, and the pods it will create against the core Pod schema."""
    kind = manifest["kind"]
    if kind == "Pod":
        validate_pod(manifest)
        return
    assert errors(schemas[kind], manifest) == []
    assert check_metadata(manifest["metadata"], max_name=40) == []
    name = manifest["metadata"]["name"]
    if kind == "PyTorchJob":
        for replica, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
            template = spec["template"]
            validate_pod(
                as_pod(f"{name}-{replica.lower()}-0", template["metadata"]["labels"], template["spec"])
            )
        return
    trainer = manifest["spec"]["trainer"]
    container = {
        "name": "trainer",
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
    }
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    spec: dict = {"containers": [container]}
    for override in manifest["spec"].get("podSpecOverrides", []):
        spec.update({k: v for k, v in override.items() if k not in ("targetJobs", "containers")})
        for patch in override.get("containers", []):
            assert patch["name"] == container["name"]
            container["volumeMounts"] = patch["volumeMounts"]
    validate_pod(as_pod(f"{name}-trainer-node-0-0", manifest["metadata"]["labels"], spec))


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


def test_the_validators_reject_wrong_manifests(schemas: dict[str, dict]) -> None:
    job = render(pretrain, run_id="bad-1", checkpoint_store=STORE)
    trainjob = render(pretrain, "trainjob", run_id="bad-1", checkpoint_store=STORE)
    validate(job, schemas)
    validate(trainjob, schemas)
    broken = []
    for path, value in [
        (("spec", "elasticPolicy", "rdzvBackEnd"), "c10d"),  # misspelt field
        (("spec", "elasticPolicy", "maxReplicas"), "4"),  # string for an int
        (("spec", "runPolicy", "backoffLimit"), 2**31),  # int32 overflow
        (("spec", "nprocPerNode"), 8),  # int for a string
    ]:
        bad = copy.deepcopy(job)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        broken.append(errors(schemas["PyTorchJob"], bad))
    dup = copy.deepcopy(job)
    worker = dup["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    worker["env"].append(dict(worker["env"][0]))  # a list-map with a repeated key
    broken.append(errors(schemas["PyTorchJob"], dup))
    bad_trainjob = copy.deepcopy(trainjob)
    bad_trainjob["spec"]["trainer"]["gpus"] = 8
    broken.append(errors(schemas["TrainJob"], bad_trainjob))
    del bad_trainjob["spec"]["runtimeRef"]
    broken.append(errors(schemas["TrainJob"], bad_trainjob))
    assert all(broken), broken
    assert "gpus" in broken[-2][0] and "runtimeRef" in " ".join(broken[-1])
    assert check_metadata({"name": "9-starts-with-a-digit"}) != []
    pod = render(evaluate, run_id="bad-1", checkpoint_store=STORE)
    pod["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, desired_version=K8S_VERSION, strict=True)


def test_pytorchjob_for_2_to_4_nodes_of_8_h100(schemas: dict[str, dict]) -> None:
    job = render(pretrain, run_id="pretrain-7", checkpoint_store=STORE, namespace="ml", script="train.py")
    validate(job, schemas)
    assert (job["apiVersion"], job["kind"], default_kind(pretrain)) == (
        "kubeflow.org/v1",
        "PyTorchJob",
        "pytorchjob",
    )
    assert job["metadata"] == {
        "name": "pretrain-7",
        "namespace": "ml",
        "labels": {
            "app.kubernetes.io/managed-by": "stalwart",
            "stalwart.io/run-id": "pretrain-7",
            "stalwart.io/task": "pretrain",
        },
    }
    spec = job["spec"]
    assert spec["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": 2,
        "maxReplicas": 4,
        "maxRestarts": 3,
        "rdzvConf": [{"key": "timeout", "value": "900"}, {"key": "join_timeout", "value": "600"}],
    }
    assert spec["nprocPerNode"] == "8" and "nProcPerNode" not in spec["elasticPolicy"]
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": 86400,
    }
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "OnFailure"
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == IMAGE
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
    assert container["resources"]["limits"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "stalwart-shm", "emptyDir": {"medium": "Memory"}}]
    assert container["volumeMounts"] == [{"name": "stalwart-shm", "mountPath": "/dev/shm"}]
    assert container["command"] == [
        "stalwart", "run", "--run-id", "pretrain-7", "--checkpoint-store", STORE, "train.py", "pretrain",
    ]  # fmt: skip
    env = env_of(container)
    assert env == {
        "STALWART_RUN_ID": "pretrain-7",
        "STALWART_ATTEMPT": "0",
        "STALWART_TASK": "pretrain",
        "STALWART_CHECKPOINT_STORE": STORE,
        "STALWART_CHECKPOINT_URI": f"{STORE}/pretrain-7",
        "STALWART_FLASH_ROOT": "/dev/shm/stalwart",
        "PET_START_METHOD": "spawn",
        "PET_MONITOR_INTERVAL": "5",
        "OMP_NUM_THREADS": "1",
    }


def test_trainjob_for_2_to_4_nodes_of_8_h100(schemas: dict[str, dict]) -> None:
    job = render(pretrain, "trainjob", run_id="pretrain-7", checkpoint_store=STORE, inputs={"steps": 10})
    validate(job, schemas)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (4, 8, IMAGE)
    assert trainer["command"][-2:] == ["--steps", "10"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    env = env_of(trainer)
    assert env["STALWART_CHECKPOINT_URI"] == f"{STORE}/pretrain-7" and env["PET_MAX_RESTARTS"] == "3"
    (override,) = spec["podSpecOverrides"]
    assert override["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert override["volumes"] == [{"name": "stalwart-shm", "emptyDir": {"medium": "Memory"}}]
    # The overrides must name a replicated job and a container that the runtime really has.
    runtime = yaml.safe_load((K8S / "example-clustertrainingruntime-torch-distributed.yaml").read_text())
    assert runtime["metadata"]["name"] == spec["runtimeRef"]["name"]
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    (target,) = override["targetJobs"]
    containers = jobs[target["name"]]["template"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in override["containers"]] == [c["name"] for c in containers]


def test_pod_for_a_mig_partition_validates(schemas: dict[str, dict]) -> None:
    pod = render(evaluate, run_id="eval-1", checkpoint_store=STORE, script="jobs/eval.py")
    validate(pod, schemas)
    assert default_kind(evaluate) == "pod" and pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/mig-1g.5gb": "1"}
    assert "volumes" not in pod["spec"]  # no shm asked for, not elastic
    env = env_of(container)
    assert env["HF_HOME"] == "/cache" and "OMP_NUM_THREADS" not in env and "PET_START_METHOD" not in env
    assert container["command"][6:] == ["jobs/eval.py", "evaluate"]


def test_every_kind_of_every_task_validates(schemas: dict[str, dict]) -> None:
    for task in (pretrain, evaluate, ddp_cpu, sized_shm):
        for kind in ("pod", "pytorchjob", "trainjob"):
            if kind == "pod" and task.elastic is not None and task.elastic.max_nodes > 1:
                with pytest.raises(ValueError, match=r"a Pod is one node.*render a pytorchjob or a trainjob"):
                    render(task, kind, run_id="r-1", checkpoint_store=STORE)
                continue
            validate(render(task, kind, run_id="a-run-1", checkpoint_store=STORE, namespace="ns"), schemas)


def test_pods_get_the_time_a_save_on_sigterm_needs(schemas: dict[str, dict]) -> None:
    """Between SIGTERM and SIGKILL a pod's flash checkpointer saves its newest step (issue 11)."""
    pod = render(evaluate, "pod", run_id="eval-1", checkpoint_store=STORE)
    job = render(ddp_cpu, "pytorchjob", run_id="ddp-1", checkpoint_store=STORE)
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    for spec in (pod["spec"], template["spec"]):
        assert spec["terminationGracePeriodSeconds"] == 30
        assert (
            spec["terminationGracePeriodSeconds"]
            > sw.FlashCheckpointer.__init__.__kwdefaults__["grace_period"]
        )
    validate(pod, schemas)
    validate(job, schemas)


def test_shared_memory_and_omp_threads() -> None:
    ddp = render(ddp_cpu, run_id="d-1", checkpoint_store=STORE)
    container = ddp["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "volumeMounts" not in container  # increase_shared_mem=False and no Resources.shm
    assert env_of(container)["OMP_NUM_THREADS"] == "4"  # the task's own value wins over torchrun's 1
    sized = render(sized_shm, run_id="s-1", checkpoint_store=STORE)
    spec = sized["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert spec["volumes"] == [
        {"name": "stalwart-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    ]
    assert env_of(spec["containers"][0])["PET_START_METHOD"] == "fork"
    assert sized["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert sized["spec"]["elasticPolicy"]["minReplicas"] == 3 and "runPolicy" not in sized["spec"]


def test_env_vars_cannot_change_the_runs_identity() -> None:
    task = evaluate.override(
        env_vars={"STALWART_RUN_ID": "other", "STALWART_FLASH_ROOT": "/mnt/flash", "STALWART_ATTEMPT": "5"}
    )
    env = env_of(render(task, run_id="eval-2", checkpoint_store=STORE)["spec"]["containers"][0])
    assert (env["STALWART_RUN_ID"], env["STALWART_ATTEMPT"], env["STALWART_FLASH_ROOT"]) == (
        "eval-2",
        "0",
        "/mnt/flash",
    )
    explicit = render(task, run_id="eval-2", checkpoint_store=STORE, flash_root="/dev/shm/x")
    assert env_of(explicit["spec"]["containers"][0])["STALWART_FLASH_ROOT"] == "/dev/shm/x"


def test_checkpoint_store_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    def store_of(task: sw.Task, **kwargs: object) -> str:
        pod = render(task, "pytorchjob", run_id="c-1", **kwargs)
        return env_of(pod["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0])[
            "STALWART_CHECKPOINT_URI"
        ]

    monkeypatch.delenv("STALWART_CHECKPOINT_STORE", raising=False)
    assert store_of(ddp_cpu) == f"{POD_LOCAL_CHECKPOINT_STORE}/c-1"
    monkeypatch.setenv("STALWART_CHECKPOINT_STORE", "gs://env/")
    assert store_of(ddp_cpu) == "gs://env/c-1"
    assert store_of(ddp_cpu.override(checkpoint_store="s3://task")) == "s3://task/c-1"
    assert (
        store_of(ddp_cpu.override(checkpoint_store="s3://task"), checkpoint_store="s3://arg")
        == "s3://arg/c-1"
    )


def test_inputs_round_trip_through_the_command_line() -> None:
    inputs = {"n": 3, "scale": 0.5, "flag": True, "ids": [1, 2], "mode": Mode.SLOW}
    command = render(evaluate, run_id="e-3", checkpoint_store=STORE, script="e.py", inputs=inputs)["spec"][
        "containers"
    ][0]["command"]
    assert command[6:8] == ["e.py", "evaluate"]
    _, parsed, _ = parse_task_inputs(evaluate, command[8:])
    assert parsed == inputs


def test_object_names_are_dns_1035_labels() -> None:
    assert object_name("pretrain-7") == "pretrain-7"
    assert object_name("7-up") == "r-7-up"
    long_id = "a" * 50 + "-0123abcd"
    name = object_name(long_id)
    assert len(name) <= 40 and name != object_name("a" * 50 + "-0123abce")
    for run_id in ("7-up", long_id, "x", "a-" * 31 + "b"):
        assert check_metadata({"name": object_name(run_id)}, max_name=40) == []


def test_bad_settings_are_clear_errors() -> None:
    no_image = sw.TaskEnvironment(name="n").task(pretrain.func)
    with pytest.raises(ValueError, match=r"task 'pretrain' has no container image.*--image"):
        render(no_image, run_id="x-1")
    assert render(no_image, run_id="x-1", image="py:3.11")["spec"]["containers"][0]["image"] == "py:3.11"
    with pytest.raises(ValueError, match="run_id='Bad_Id' is not accepted"):
        render(evaluate, run_id="Bad_Id")
    with pytest.raises(ValueError, match="kind='job' is not accepted; use one of pod, pytorchjob, trainjob"):
        render(evaluate, "job", run_id="x-1")
    with pytest.raises(ValueError, match="pass inputs= or command=, not both"):
        render(evaluate, run_id="x-1", command=["python", "e.py"], inputs={"n": 1})
    with pytest.raises(ValueError, match=r"command='python e\.py' is not accepted"):
        render(evaluate, run_id="x-1", command="python e.py")
    custom = render(evaluate, run_id="x-1", command=["python", "-m", "eval"], image="other:2")
    assert custom["spec"]["containers"][0]["command"] == ["python", "-m", "eval"]
    assert custom["spec"]["containers"][0]["image"] == "other:2"


def test_default_script_is_the_tasks_file_relative_to_the_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = Path(__file__).resolve()
    monkeypatch.chdir(here.parents[2])
    command = render(evaluate, run_id="x-1")["spec"]["containers"][0]["command"]
    assert command[6:8] == [f"tests/kubernetes/{here.name}", "evaluate"]
