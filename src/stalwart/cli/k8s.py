"""``stalwart k8s render|submit FILE.py TASK``: a task as a Kubernetes Pod, PyTorchJob or TrainJob.

``render`` prints the manifest as YAML; ``submit`` creates it with the official kubernetes client
(``--dry-run`` prints the request instead and needs neither the client nor a cluster). The task's
inputs are given as for ``stalwart run`` and are checked against its signature here, before a pod
fails on them; they go into the container's ``stalwart run`` command as typed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import CHECKPOINT_STORE_ENV, check_store_url
from .errors import CliError
from .inputs import parse_task_inputs
from .script import script_task

__all__ = ["add_k8s_parser"]

_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "kind": (
        ("--kind",),
        {
            "choices": ("pod", "pytorchjob", "trainjob"),
            "help": "what to render (default: pytorchjob for an elastic task, else pod)",
        },
    ),
    "image": (("--image",), {"metavar": "IMG", "help": "container image (default: the environment's)"}),
    "namespace": (("--namespace", "-n"), {"metavar": "NS", "help": "the object's namespace"}),
    "run_id": (("--run-id",), {"metavar": "ID", "help": "name the run (default: a new id)"}),
    "checkpoint_store": (
        ("--checkpoint-store",),
        {
            "metavar": "URL",
            "help": "fsspec URL of the checkpoint store the pods share, e.g. s3://bucket/ckpt",
        },
    ),
    "flash_root": (("--flash-root",), {"metavar": "PATH", "help": "flash tier directory in the pods"}),
    "runtime": (
        ("--runtime",),
        {"metavar": "NAME", "help": "ClusterTrainingRuntime of a trainjob (default: torch-distributed)"},
    ),
}
_SUBMIT_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "dry_run": (("--dry-run",), {"action": "store_true", "help": "print the request instead of sending it"}),
    "kubeconfig": (("--kubeconfig",), {"metavar": "PATH", "help": "kubeconfig file (default: $KUBECONFIG)"}),
}


def add_k8s_parser(commands: Any) -> None:
    """Register ``stalwart k8s render`` and ``stalwart k8s submit``."""
    k8s = commands.add_parser(
        "k8s",
        help="render or submit a task as a Kubernetes Pod, PyTorchJob or TrainJob",
        description="Render a task as a Kubernetes manifest, or submit it to the cluster of your kubeconfig.",
    )
    k8s.set_defaults(handler=lambda _args: _usage(k8s))
    actions = k8s.add_subparsers(dest="k8s_command", metavar="COMMAND")
    for name, handler, summary in (
        ("render", _cmd_render, "print the manifest as YAML"),
        ("submit", _cmd_submit, "create the object on the cluster (kubeconfig, else in-cluster)"),
    ):
        parser = actions.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. Inputs are given as for `stalwart run`.",
            usage=f"stalwart k8s {name} [options] FILE.py TASK [--input value ...]",
            epilog="Options may also follow TASK, except those whose names a task input uses.",
        )
        for dest, (flags, kwargs) in _options(name).items():
            parser.add_argument(*flags, dest=f"k8s:{dest}", default=None, **kwargs)
        parser.add_argument("file", metavar="FILE.py", help="the Python file that defines the task")
        parser.add_argument("task", metavar="TASK", nargs="?", help="the task's name in that file")
        parser.add_argument("inputs", nargs=argparse.REMAINDER, help="the task's inputs, as --name value")
        parser.set_defaults(handler=handler)


def _options(command: str) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    return {**_OPTIONS, **(_SUBMIT_OPTIONS if command == "submit" else {})}


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cmd_render(args: argparse.Namespace) -> int:
    manifest, _ = _render(args, "render")
    print(_yaml(manifest), end="")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from ..kubernetes.submit import KubernetesConfigError, plan, submit

    manifest, options = _render(args, "submit")
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


def _render(args: argparse.Namespace, command: str) -> tuple[dict, dict[str, Any]]:
    """Load the script, split our options from the task's inputs, and build the manifest."""
    from ..kubernetes.command import default_command
    from ..kubernetes.manifests import (
        DEFAULT_TRAINING_RUNTIME,
        POD_LOCAL_CHECKPOINT_STORE,
        checkpoint_store_for,
        render,
    )
    from ..runtime.runner import new_run_id

    with script_task(
        args.file, args.task, f"stalwart k8s {command} {{file}} TASK [--input value ...]"
    ) as task:
        options, input_argv = _split_options(task, args.inputs, command)
        for dest in _options(command):  # options after TASK win over those before FILE.py
            options.setdefault(dest, getattr(args, f"k8s:{dest}"))
        prog = f"stalwart k8s {command} {args.file} {args.task}"
        _, _, run_options = parse_task_inputs(task, input_argv, prog=prog)  # exits 2 on a bad input
        if run_options:
            raise CliError(f"{', '.join(sorted(run_options))}: not an option of stalwart k8s {command}")
        run_id = options.get("run_id") or new_run_id(task.name)
        store = checkpoint_store_for(task, options.get("checkpoint_store"))
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
                    args.file, args.task, input_argv, run_id=run_id, checkpoint_store=store
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


def _split_options(task: Any, argv: list[str], command: str) -> tuple[dict[str, Any], list[str]]:
    """Our options given after TASK, and the rest (the task's inputs, in their order)."""
    taken: set[str] = set()
    for name in task.signature.parameters:
        taken |= {f"--{name}", f"--{name.replace('_', '-')}"}
    parser = argparse.ArgumentParser(prog=f"stalwart k8s {command}", add_help=False, allow_abbrev=False)
    for dest, (flags, kwargs) in _options(command).items():
        free = [flag for flag in flags if flag not in taken]
        if free:
            parser.add_argument(*free, dest=dest, default=argparse.SUPPRESS, **kwargs)
    try:
        known, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse printed the usage error already
        raise CliError(f"see stalwart k8s {command} --help", code=2) from exc
    return vars(known), rest


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
