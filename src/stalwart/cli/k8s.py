"""``stalwart k8s render|submit FILE.py TASK``: a task as a Kubernetes Pod, PyTorchJob or TrainJob.

``render`` prints the manifest as YAML; ``submit`` creates it with the official kubernetes client
(``--dry-run`` prints the request instead and needs neither the client nor a cluster). The task's
inputs are given as for ``stalwart run`` and are checked against its signature here, before a pod
fails on them; they go into the container's ``stalwart run`` command as typed.
"""

from __future__ import annotations

import sys
from typing import Any

from ..config import CHECKPOINT_STORE_ENV, check_store_url
from .errors import CliError
from .inputs import Option, parse_task_inputs
from .script import script_task

__all__ = ["submit_or_render"]

# The options that may follow TASK too (cyclopts parses those before FILE.py): (type, flags, help).
_OPTIONS = {
    "kind": Option(str, ("--kind",), "pod, pytorchjob or trainjob"),
    "image": Option(str, ("--image",), "container image (default: the environment's)", "IMG"),
    "namespace": Option(str, ("--namespace", "-n"), "the object's namespace", "NS"),
    "run_id": Option(str, ("--run-id",), "name the run (default: a new id)", "ID"),
    "checkpoint_store": Option(str, ("--checkpoint-store",), "checkpoint store the pods share", "URL"),
    "flash_root": Option(str, ("--flash-root",), "flash tier directory in the pods", "PATH"),
    "runtime": Option(str, ("--runtime",), "ClusterTrainingRuntime of a trainjob", "NAME"),
}
_SUBMIT_OPTIONS = {
    "dry_run": Option(bool, ("--dry-run",), "print the request instead of sending it"),
    "kubeconfig": Option(str, ("--kubeconfig",), "kubeconfig file (default: $KUBECONFIG)", "PATH"),
}
_KINDS = ("pod", "pytorchjob", "trainjob")


def submit_or_render(
    command: str, file: str, name: str | None, argv: list[str], given: dict[str, Any]
) -> int:
    """``stalwart k8s render|submit``; ``given``: the options before FILE.py (those after TASK win)."""
    manifest, options = _render(command, file, name, argv, given)
    if command == "render":
        print(_yaml(manifest), end="")
        return 0
    return _submit(manifest, options)


def _submit(manifest: dict, options: dict[str, Any]) -> int:
    from ..kubernetes.submit import KubernetesConfigError, plan, submit

    if options.get("dry_run"):
        call = plan(manifest, options.get("namespace"))
        print(f"# dry run: POST {call.path}")
        print(_yaml(call.body), end="")
        return 0
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    try:
        created = submit(manifest, namespace=options.get("namespace"), kubeconfig=options.get("kubeconfig"))
    except KubernetesConfigError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:
        from kubernetes.client.exceptions import ApiException  # installed: submit got past loading it
        from urllib3.exceptions import HTTPError

        if isinstance(exc, ApiException):
            print(
                f"stalwart: error: the API server refused {kind} {name}: {_api_error(exc)}", file=sys.stderr
            )
            return 1
        if isinstance(exc, HTTPError):
            print(f"stalwart: error: cannot reach the API server: {exc}", file=sys.stderr)
            return 1
        raise
    namespace = (created.get("metadata") or {}).get("namespace", "default")
    labels = (created.get("metadata") or {}).get("labels") or {}
    print(f"created {kind} {name} in namespace {namespace} (run {labels.get('stalwart.io/run-id', '?')})")
    print(f"  kubectl get {kind.lower()} {name} -n {namespace}")
    return 0


def _render(
    command: str, file: str, name: str | None, argv: list[str], given: dict[str, Any]
) -> tuple[dict, dict[str, Any]]:
    """Load the script, parse the task's inputs and our options among them, and build the manifest."""
    from ..kubernetes.command import default_command, input_args
    from ..kubernetes.manifests import (
        DEFAULT_TRAINING_RUNTIME,
        POD_LOCAL_CHECKPOINT_STORE,
        checkpoint_store_for,
        render,
    )
    from ..runtime.runner import new_run_id

    with script_task(file, name, f"stalwart k8s {command} {{file}} TASK [--input value ...]") as task:
        assert name is not None  # script_task refuses a missing TASK
        ours = {**_OPTIONS, **(_SUBMIT_OPTIONS if command == "submit" else {})}
        prog = f"stalwart k8s {command} {file} {name}"
        positional, inputs, after = parse_task_inputs(task, argv, prog=prog, options=ours)
        options = {**given, **after}
        if options.get("kind") is not None and options["kind"] not in _KINDS:
            raise CliError(f"--kind {options['kind']!r} is not accepted; use one of {', '.join(_KINDS)}")
        run_id = options.get("run_id") or new_run_id(task.name)
        store = checkpoint_store_for(task, options.get("checkpoint_store"))
        given_inputs = dict(zip(_positional_names(task), positional, strict=False)) | inputs
        try:
            # the pods open it, not this machine: its scheme is checked, not whether s3fs is here
            check_store_url(store, _store_field(task, options), here=False)
            manifest = render(
                task,
                options.get("kind"),
                runtime=options.get("runtime") or DEFAULT_TRAINING_RUNTIME,
                run_id=run_id,
                image=options.get("image"),
                command=default_command(
                    file, name, input_args(given_inputs), run_id=run_id, checkpoint_store=store
                ),
                checkpoint_store=store,
                flash_root=options.get("flash_root"),
                namespace=options.get("namespace"),
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if store == POD_LOCAL_CHECKPOINT_STORE:
        print(
            f"stalwart: checkpoints go to {store} on the pod's own disk, so a new pod "
            "starts the run over; pass --checkpoint-store s3://... (or gs://...) to resume anywhere",
            file=sys.stderr,
        )
    return manifest, options


def _store_field(task: Any, options: dict[str, Any]) -> str:
    """Where the pods' checkpoint store was named, for an error message about it."""
    if options.get("checkpoint_store"):
        return "--checkpoint-store"
    return "checkpoint_store" if task.checkpoint_store else CHECKPOINT_STORE_ENV


def _positional_names(task: Any) -> list[str]:
    import inspect

    return [p.name for p in task.signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_ONLY]


def _yaml(manifest: dict) -> str:
    try:
        import yaml
    except ImportError:
        raise CliError("printing YAML needs PyYAML: pip install 'stalwart[kubernetes]'") from None
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def _api_error(exc: Any) -> str:
    import json

    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = str(exc.body or "")
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
