"""A task as a Kubernetes object: a ``Pod``, a Kubeflow ``PyTorchJob`` or a Kubeflow Trainer ``TrainJob``.

Everything here returns plain dicts (JSON-ready): print them as YAML, diff them, validate them, or
hand them to any client (``stalwart.kubernetes.submit`` uses the official one).

- ``Pod`` for a plain task: one container, ``restartPolicy: Never``; the ``stalwart run`` inside it
  retries the task in fresh processes as it does on a laptop.
- ``PyTorchJob`` (``kubeflow.org/v1``, training-operator) for an elastic task: ``max_nodes`` worker
  replicas with an ``elasticPolicy`` (c10d rendezvous, min/max replicas, restarts); the operator sets
  the ``PET_*`` variables torch elastic reads (rendezvous endpoint, node count).
- ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2) as the alternative: the
  trainer's image, command, node count and resources, on a ``ClusterTrainingRuntime``. A TrainJob has
  no node range, no restart count and no run policy of its own: it runs ``max_nodes`` nodes, and those
  policies belong to the runtime.

Every container carries what a fresh pod needs to resume the run: ``STALWART_RUN_ID``,
``STALWART_ATTEMPT``, ``STALWART_TASK``, ``STALWART_CHECKPOINT_STORE``, ``STALWART_CHECKPOINT_URI``
(``<store>/<run id>``) and ``STALWART_FLASH_ROOT``, plus the task's ``env_vars``. The default command
names the run id and store too, so a restarted pod continues the same run from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from stalwart import config
from stalwart.elastic import Elastic, RunPolicy
from stalwart.flash.preemption import TERMINATION_GRACE_SECONDS
from stalwart.kubernetes.command import default_command, input_args, script_of
from stalwart.kubernetes.container_resources import SHM_MOUNT_PATH, SHM_VOLUME_NAME, KubernetesResources

if TYPE_CHECKING:
    from stalwart.environment import Task

__all__ = [
    "API",
    "DEFAULT_FLASH_ROOT",
    "DEFAULT_TRAINING_RUNTIME",
    "KINDS",
    "POD_LOCAL_CHECKPOINT_STORE",
    "Launch",
    "checkpoint_store_for",
    "default_kind",
    "object_name",
    "pod_manifest",
    "pytorchjob_manifest",
    "render",
    "trainjob_manifest",
]

KINDS = ("pod", "pytorchjob", "trainjob")
API: Mapping[str, tuple[str, str, str, str]] = {
    "pod": ("", "v1", "pods", "Pod"),
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"),
}
"""Per kind: API group, version, plural (the REST path) and ``kind``."""

DEFAULT_FLASH_ROOT = "/dev/shm/stalwart"
POD_LOCAL_CHECKPOINT_STORE = "file:///tmp/stalwart/checkpoints"
"""Used when no store is named: survives attempts inside one pod, not the loss of the pod."""

PYTORCH_CONTAINER = "pytorch"  # the training operator finds the training container by this name
PYTORCH_PORT = {"name": "pytorchjob-port", "containerPort": 23456}  # the operator's default port
DEFAULT_TRAINING_RUNTIME = "torch-distributed"
TRAINER_TARGET_JOB = "trainer-node"  # replicated job and container of the torch-distributed runtime
TRAINER_CONTAINER = "trainer"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
RUN_ID_LABEL = "stalwart.io/run-id"
TASK_LABEL = "stalwart.io/task"

_RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NAME_MAX = 40  # leaves room for the suffixes operators append ("-worker-12", "-trainer-node-0-3-x7k2q")


@dataclasses.dataclass(frozen=True)
class Launch:
    """What one run's manifests share: object name, image, command and the run's identity.

    Build it with ``Launch.for_task``; the manifest functions take it as is.
    """

    run_id: str
    image: str
    command: tuple[str, ...]
    checkpoint_store: str
    flash_root: str = DEFAULT_FLASH_ROOT
    namespace: str | None = None

    @classmethod
    def for_task(
        cls,
        task: Task,
        *,
        run_id: str,
        image: str | None = None,
        command: Sequence[str] | None = None,
        inputs: Mapping[str, Any] | None = None,
        script: str | os.PathLike | None = None,
        checkpoint_store: str | None = None,
        flash_root: str | None = None,
        namespace: str | None = None,
    ) -> Launch:
        """Resolve the settings: arguments first, then the task's, then the defaults.

        ``image`` defaults to the environment's; ``checkpoint_store`` to the task's, then
        ``$STALWART_CHECKPOINT_STORE``, then a directory on the pod's own disk. ``command`` defaults to
        ``stalwart run`` of ``script`` (the task's file, relative to the current directory) with
        ``inputs`` as ``--name value`` options.
        """
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise ValueError(
                f"run_id={run_id!r} is not accepted; use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        image = image or task.environment.image
        if not image:
            raise ValueError(
                f"task {task.name!r} has no container image; set TaskEnvironment(image=...) or pass an "
                "image (--image on the command line)"
            )
        store = checkpoint_store_for(task, checkpoint_store)
        if command is None:
            if script is None:
                script = script_of(task)
            command = default_command(
                script, task.func.__name__, input_args(inputs or {}), run_id=run_id, checkpoint_store=store
            )
        elif inputs:
            raise ValueError("pass inputs= or command=, not both: an explicit command carries its own inputs")
        if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
            raise ValueError(f"command={command!r} is not accepted; use a non-empty list of strings")
        root = flash_root or task.env_vars.get(config.FLASH_ROOT_ENV) or DEFAULT_FLASH_ROOT
        return cls(run_id, image, tuple(command), store, root, namespace)

    @property
    def checkpoint_uri(self) -> str:
        """Where the run's task checkpoints live: the same ``<store>/<run id>`` the local runner uses."""
        return f"{self.checkpoint_store.rstrip('/')}/{self.run_id}"


# Seconds between SIGTERM and SIGKILL: a flash checkpointer saves on SIGTERM within its grace period
GRACE = TERMINATION_GRACE_SECONDS


def checkpoint_store_for(task: Task, checkpoint_store: str | None = None) -> str:
    """The store the pods use: the argument, the task's, ``$STALWART_CHECKPOINT_STORE``, else pod-local."""
    return config.checkpoint_store(checkpoint_store, task.checkpoint_store, POD_LOCAL_CHECKPOINT_STORE)[0]


def default_kind(task: Task) -> str:
    """``"pytorchjob"`` for an elastic task, ``"pod"`` otherwise."""
    return "pytorchjob" if task.elastic is not None else "pod"


def render(
    task: Task, kind: str | None = None, *, runtime: str = DEFAULT_TRAINING_RUNTIME, **settings: Any
) -> dict:
    """The manifest of ``kind`` (default: ``default_kind(task)``); ``settings`` go to ``Launch.for_task``."""
    kind = kind or default_kind(task)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not accepted; use one of {', '.join(KINDS)}")
    launch = Launch.for_task(task, **settings)
    if kind == "pod":
        return pod_manifest(task, launch)
    if kind == "pytorchjob":
        return pytorchjob_manifest(task, launch)
    return trainjob_manifest(task, launch, runtime=runtime)


def pod_manifest(task: Task, launch: Launch) -> dict:
    """A ``v1 Pod`` running the task once (``restartPolicy: Never``; the runner inside retries)."""
    elastic = task.elastic
    if elastic is not None and elastic.max_nodes > 1:
        raise ValueError(
            f"a Pod is one node, but task {task.name!r} asks for nnodes={elastic.nnodes!r}; "
            "render a pytorchjob or a trainjob instead"
        )
    container = _container("main", task, launch)
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": GRACE, "containers": [container]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(task, launch),
        "spec": _pod_resources(task).apply(spec),
    }


def pytorchjob_manifest(task: Task, launch: Launch) -> dict:
    """A ``kubeflow.org/v1 PyTorchJob``: elastic workers only (no master), c10d rendezvous.

    ``nproc_per_node`` goes to ``spec.nprocPerNode``: ``elasticPolicy.nProcPerNode`` is deprecated
    since training-operator v1.7, and the operator's webhook rejects a job that sets both.
    """
    elastic = task.elastic or Elastic()  # a plain task runs as one worker
    container = {**_container(PYTORCH_CONTAINER, task, launch), "ports": [dict(PYTORCH_PORT)]}
    template = {
        "metadata": {"labels": _labels(task, launch)},
        "spec": _pod_resources(task).apply(
            {"terminationGracePeriodSeconds": GRACE, "containers": [container]}
        ),
    }
    policy: dict[str, Any] = {
        "rdzvBackend": "c10d",
        "minReplicas": elastic.min_nodes,
        "maxReplicas": elastic.max_nodes,
        "maxRestarts": elastic.max_restarts,
        "rdzvConf": [{"key": k, "value": _scalar(v)} for k, v in elastic.rdzv_configs.items()],
    }
    spec: dict[str, Any] = {
        "elasticPolicy": policy,
        "nprocPerNode": str(elastic.nproc_per_node),
        "pytorchReplicaSpecs": {
            "Worker": {"replicas": elastic.max_nodes, "restartPolicy": "OnFailure", "template": template}
        },
    }
    run_policy = _run_policy(elastic.run_policy)
    if run_policy:
        spec["runPolicy"] = run_policy
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(task, launch),
        "spec": spec,
    }


def trainjob_manifest(
    task: Task,
    launch: Launch,
    *,
    runtime: str = DEFAULT_TRAINING_RUNTIME,
    runtime_kind: str = "ClusterTrainingRuntime",
    target_job: str = TRAINER_TARGET_JOB,
    container: str = TRAINER_CONTAINER,
) -> dict:
    """A ``trainer.kubeflow.org/v1alpha1 TrainJob`` on the ``runtime`` training runtime.

    Node selectors, tolerations and ``/dev/shm`` go into ``podSpecOverrides`` of ``target_job`` (the
    runtime's replicated job) and its ``container``; the defaults match the torch-distributed runtime.
    The time between SIGTERM and SIGKILL is the runtime's pod template's (``podSpecOverrides`` cannot
    set it; Kubernetes' default 30 s fits the flash checkpointer's default grace period).
    """
    elastic = task.elastic
    trainer: dict[str, Any] = {
        "image": launch.image,
        "command": list(launch.command),
        "numNodes": elastic.max_nodes if elastic else 1,
        "numProcPerNode": elastic.nproc_per_node if elastic else 1,
        "env": _env(task, launch, extra_pet={"PET_MAX_RESTARTS": elastic.max_restarts} if elastic else None),
    }
    fragments = _pod_resources(task)
    if fragments.resources:
        trainer["resourcesPerNode"] = fragments.resources
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "kind": runtime_kind, "apiGroup": "trainer.kubeflow.org"},
        "trainer": trainer,
    }
    override: dict[str, Any] = {}
    if fragments.node_selector:
        override["nodeSelector"] = dict(fragments.node_selector)
    if fragments.tolerations:
        override["tolerations"] = [dict(t) for t in fragments.tolerations]
    if fragments.volumes:
        override["volumes"] = [dict(v) for v in fragments.volumes]
        override["containers"] = [
            {"name": container, "volumeMounts": [dict(m) for m in fragments.volume_mounts]}
        ]
    if override:
        spec["podSpecOverrides"] = [{"targetJobs": [{"name": target_job}], **override}]
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(task, launch),
        "spec": spec,
    }


def object_name(run_id: str) -> str:
    """A DNS-1035 name (what the training operator requires) derived from the run id, at most 40 long."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    if not name[0].isalpha():
        name = f"r-{name}"
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        name = f"{name[: _NAME_MAX - 9].rstrip('-')}-{digest}"
    return name


def _labels(task: Task, launch: Launch) -> dict[str, str]:
    return {MANAGED_BY_LABEL: "stalwart", RUN_ID_LABEL: launch.run_id, TASK_LABEL: task.name}


def _metadata(task: Task, launch: Launch) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": object_name(launch.run_id)}
    if launch.namespace:
        metadata["namespace"] = launch.namespace
    metadata["labels"] = _labels(task, launch)
    return metadata


def _scalar(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _env(task: Task, launch: Launch, extra_pet: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """The run's identity first, then the task's env_vars (which cannot change the identity)."""
    values = {
        config.RUN_ID_ENV: launch.run_id,
        config.ATTEMPT_ENV: "0",
        config.TASK_ENV: task.name,
        config.CHECKPOINT_STORE_ENV: launch.checkpoint_store,
        config.CHECKPOINT_URI_ENV: launch.checkpoint_uri,
        config.FLASH_ROOT_ENV: launch.flash_root,
    }
    elastic = task.elastic
    if elastic is not None:
        # torchrun reads PET_<OPTION>; the operators set the rendezvous ones, these come from the task.
        values["PET_START_METHOD"] = elastic.start_method
        values["PET_MONITOR_INTERVAL"] = _scalar(elastic.monitor_interval)
        values.update({k: _scalar(v) for k, v in (extra_pet or {}).items()})
        if elastic.nproc_per_node > 1 and "OMP_NUM_THREADS" not in task.env_vars:
            values["OMP_NUM_THREADS"] = "1"  # as torchrun does
    for key, value in task.env_vars.items():
        values.setdefault(key, value)
    return [{"name": key, "value": value} for key, value in values.items()]


def _container(name: str, task: Task, launch: Launch) -> dict[str, Any]:
    return {"name": name, "image": launch.image, "command": list(launch.command), "env": _env(task, launch)}


def _pod_resources(task: Task) -> KubernetesResources:
    """The task's Resources as Pod fragments, plus a memory-backed /dev/shm for elastic tasks that ask."""
    fragments = task.resources.to_kubernetes() if task.resources is not None else KubernetesResources()
    elastic = task.elastic
    has_shm = any(m.get("mountPath") == SHM_MOUNT_PATH for m in fragments.volume_mounts)
    if elastic is not None and elastic.increase_shared_mem and not has_shm:
        fragments = dataclasses.replace(
            fragments,
            volumes=[*fragments.volumes, {"name": SHM_VOLUME_NAME, "emptyDir": {"medium": "Memory"}}],
            volume_mounts=[*fragments.volume_mounts, {"name": SHM_VOLUME_NAME, "mountPath": SHM_MOUNT_PATH}],
        )
    return fragments


def _run_policy(policy: RunPolicy | None) -> dict[str, Any]:
    if policy is None:
        return {}
    fields = {
        "cleanPodPolicy": policy.clean_pod_policy,
        "ttlSecondsAfterFinished": policy.ttl_seconds_after_finished,
        "activeDeadlineSeconds": policy.active_deadline_seconds,
        "backoffLimit": policy.backoff_limit,
    }
    return {key: value for key, value in fields.items() if value is not None}
