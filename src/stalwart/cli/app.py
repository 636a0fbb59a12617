"""The ``stalwart`` command's tree on cyclopts: ``run``, ``runs``, ``show``, ``k8s render|submit`` and
``--install-completion``. Built when the command runs (cyclopts and rich load only then).

``run`` and ``k8s`` take FILE.py and TASK, then the task's own inputs: ``main`` puts ``--`` after TASK
so those reach the command untouched, and ``inputs.parse_task_inputs`` parses them against the task's
signature (with the command's options that may follow TASK).
"""

# No ``from __future__ import annotations``: cyclopts reads these annotations at run time.
import dataclasses
from typing import Annotated, Literal

from cyclopts import App, Parameter

from .. import __version__
from .k8s import submit_or_render
from .run import run_task
from .show import LOG_TAIL_LINES, cmd_runs, cmd_show

__all__ = ["build", "mark_task_inputs"]

_ABOUT = (
    "Run PyTorch training as durable tasks: each attempt in a fresh process, retried, resumed from the "
    "newest checkpoint that survived."
)
# Options that take a value, per command that takes FILE.py TASK (to find TASK before cyclopts runs).
_VALUED = {
    ("run",): {"--run-id", "--checkpoint-store"},
    ("k8s", "render"): {"--kind", "--image", "--namespace", "-n", "--run-id", "--checkpoint-store"}
    | {"--flash-root", "--runtime"},
}
_VALUED["k8s", "submit"] = _VALUED["k8s", "render"] | {"--kubeconfig"}


def mark_task_inputs(argv: list[str]) -> list[str]:
    """``argv`` with ``--`` after TASK of ``run`` and ``k8s render|submit``: what follows is the task's."""
    for path, valued in _VALUED.items():
        if tuple(argv[: len(path)]) != path:
            continue
        index, found = len(path), 0
        while index < len(argv):
            token = argv[index]
            if token == "--":
                return argv
            if token.startswith("-"):
                index += 2 if token in valued else 1
                continue
            found += 1
            index += 1
            if found == 2:  # FILE.py and TASK
                return [*argv[:index], "--", *argv[index:]]
        return argv
    return argv


file_arg = Annotated[str, Parameter(name="FILE.py", help="the Python file that defines the task")]
task_arg = Annotated[str | None, Parameter(name="TASK", help="the task's name in that file")]
inputs_arg = Annotated[str, Parameter(name="INPUTS", help="the task's inputs, as --name value", show=False)]
flag = Parameter(negative="")


def run(
    file: file_arg,
    task: task_arg = None,
    /,
    *inputs: inputs_arg,
    run_id: Annotated[
        str | None, Parameter(metavar="ID", help="name the run; an existing id resumes that run")
    ] = None,
    checkpoint_store: Annotated[
        str | None, Parameter(metavar="URL", help="fsspec URL under which the run's checkpoints live")
    ] = None,
    quiet: Annotated[
        bool, Parameter(name=["--quiet", "-q"], negative="", help="keep attempts' output in logs")
    ] = False,
    rerun: Annotated[
        bool, Parameter(negative="", help="start a new attempt even if the run succeeded")
    ] = False,
) -> int:
    """Run TASK from FILE.py with retries; its inputs are given as --name value.

    `stalwart run FILE.py TASK --help` lists them. Options may also follow TASK, except those whose
    names a task input uses.
    """
    given = {"run_id": run_id, "checkpoint_store": checkpoint_store, "quiet": quiet, "rerun": rerun}
    return run_task(file, task, list(inputs), given)


def runs(
    *,
    limit: Annotated[int, Parameter(name=["--limit", "-n"], help="how many runs")] = 20,
    json: Annotated[bool, flag] = False,
) -> int:
    """List recent runs, newest first (--json: as a JSON list)."""
    if limit < 1:
        from .errors import CliError

        raise CliError(f"--limit {limit} is not accepted; use an int >= 1")
    return cmd_runs(limit, as_json=json)


def show(
    run_id: Annotated[str, Parameter(name="RUN_ID", help="a run id, or a prefix that matches one run")],
    /,
    *,
    logs: Annotated[
        bool, Parameter(negative="", help=f"print the last {LOG_TAIL_LINES} lines of each log")
    ] = False,
    json: Annotated[bool, Parameter(negative="", help="print the same as one JSON object")] = False,
    timeline: Annotated[
        str | None, Parameter(name="--timeline", help="draw the run into FILE (.png, .svg, .html)")
    ] = None,
    trace: Annotated[str | None, Parameter(help="write the run as a Chrome/Perfetto trace (JSON)")] = None,
) -> int:
    """Show one run: output, attempts and where each resumed from, goodput, checkpoints, events."""
    return cmd_show(run_id, logs=logs, as_json=json, timeline=timeline, trace=trace)


@Parameter(name="*")  # flattened: --kind, --image, ... as options of render and submit
@dataclasses.dataclass
class K8sOptions:
    """Options of ``stalwart k8s render`` and ``submit``, before FILE.py (or after TASK)."""

    kind: Annotated[
        Literal["pod", "pytorchjob", "trainjob"] | None,
        Parameter(help="what to render (default: pytorchjob for an elastic task, else pod)"),
    ] = None
    image: Annotated[
        str | None, Parameter(metavar="IMG", help="container image (default: the environment's)")
    ] = None
    namespace: Annotated[
        str | None, Parameter(name=["--namespace", "-n"], metavar="NS", help="the namespace")
    ] = None
    run_id: Annotated[str | None, Parameter(metavar="ID", help="name the run (default: a new id)")] = None
    checkpoint_store: Annotated[
        str | None, Parameter(metavar="URL", help="checkpoint store the pods share, e.g. s3://bucket/ckpt")
    ] = None
    flash_root: Annotated[str | None, Parameter(metavar="PATH", help="flash tier directory in the pods")] = (
        None
    )
    runtime: Annotated[str | None, Parameter(metavar="NAME", help="ClusterTrainingRuntime of a trainjob")] = (
        None
    )


def render(
    file: file_arg, task: task_arg = None, /, *inputs: inputs_arg, options: K8sOptions | None = None
) -> int:
    """Print the manifest as YAML. Inputs are given as for `stalwart run`."""
    given = dataclasses.asdict(options or K8sOptions())
    return submit_or_render("render", file, task, list(inputs), given)


def submit(
    file: file_arg,
    task: task_arg = None,
    /,
    *inputs: inputs_arg,
    options: K8sOptions | None = None,
    dry_run: Annotated[bool, Parameter(negative="", help="print the request instead of sending it")] = False,
    kubeconfig: Annotated[
        str | None, Parameter(metavar="PATH", help="kubeconfig file (default: $KUBECONFIG)")
    ] = None,
) -> int:
    """Create the object on the cluster (kubeconfig, else in-cluster). Inputs as for `stalwart run`."""
    given = {**dataclasses.asdict(options or K8sOptions()), "dry_run": dry_run, "kubeconfig": kubeconfig}
    return submit_or_render("submit", file, task, list(inputs), given)


def build() -> App:
    """The command tree."""
    app = App(name="stalwart", help=_ABOUT, version=f"stalwart {__version__}", help_format="rich")
    app.register_install_completion_command(add_to_startup=False)
    for command in (run, runs, show):
        app.command(command)
    k8s = App(name="k8s", help="Render or submit a task as a Kubernetes Pod, PyTorchJob or TrainJob.")
    k8s.command(render)
    k8s.command(submit)
    app.command(k8s)
    return app
