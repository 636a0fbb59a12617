"""``stalwart k8s render|submit``: YAML out, and what the kubernetes client is asked to create.

No cluster runs here. Submission is tested twice: against fake client API classes (the exact
group/version/namespace/plural/body), and through the real client over HTTP to a stand-in API server
on 127.0.0.1 (the request path and JSON body it receives).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from stalwart.cli import main

SCRIPT = textwrap.dedent(
    """
    import stalwart as sw

    env = sw.TaskEnvironment(name="train", image="ghcr.io/acme/train:1", resources=sw.Resources(gpu="H100:8"))
    bare = sw.TaskEnvironment(name="bare")

    @env.task(elastic=sw.Elastic(nnodes="2:4", nproc_per_node=8))
    def ddp(steps: int, lr: float = 0.1) -> float:
        return lr

    @env.task
    def single(image: str = "x") -> str:
        return image

    @bare.task
    def no_image(n: int = 1) -> int:
        return n
    """
)


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "train.py").write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STALWART_CHECKPOINT_STORE", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return "train.py"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_render_picks_pytorchjob_for_an_elastic_task(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "k8s",
        "render",
        "--run-id",
        "ddp-1",
        script,
        "ddp",
        "--steps",
        "100",
        "--checkpoint-store",
        "s3://b",
    )
    assert code == 0, err
    job = yaml.safe_load(out)
    assert job["kind"] == "PyTorchJob" and job["metadata"]["name"] == "ddp-1"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        *("stalwart", "run", "--run-id", "ddp-1", "--checkpoint-store", "s3://b"),
        *("train.py", "ddp", "--steps", "100"),
    ]
    assert err == ""  # a shared store: no warning


def test_render_kinds_options_and_warnings(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "k8s", "render", script, "ddp", "--steps", "1", "--kind", "trainjob", "-n", "ml"
    )
    assert code == 0, err
    job = yaml.safe_load(out)
    assert (job["kind"], job["metadata"]["namespace"], job["spec"]["trainer"]["numNodes"]) == (
        "TrainJob",
        "ml",
        4,
    )
    assert job["metadata"]["name"].startswith("ddp-")  # a fresh run id
    assert "on the pod's own disk" in err and "--checkpoint-store" in err
    # A task input called `image` keeps --image after TASK; the option goes before FILE.py.
    code, out, err = run(capsys, "k8s", "render", "--image", "py:3.11", script, "single", "--image", "y")
    assert code == 0, err
    pod = yaml.safe_load(out)
    assert pod["kind"] == "Pod" and pod["spec"]["containers"][0]["image"] == "py:3.11"
    assert pod["spec"]["containers"][0]["command"][-2:] == ["--image", "y"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["no_image"],
            "task 'no_image' has no container image; set TaskEnvironment(image=...) or pass an image "
            "(--image on the command line)",
        ),
        (["ddp"], "missing required input: --steps (int)"),
        (["ddp", "--steps", "x"], 'Invalid value for --steps: "x" is not an int'),
        (["ddp", "--steps", "1", "--kind", "pod"], "a Pod is one node, but task 'ddp' asks for nnodes='2:4'"),
        (["ddp", "--steps", "1", "--run-id", "Bad"], "run_id='Bad' is not accepted"),
        (["nope"], "no task 'nope' in train.py"),
        ([], "name the task: stalwart k8s render train.py TASK"),
    ],
)
def test_render_errors_are_one_clear_message(
    script: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "k8s", "render", script, *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_dry_run_prints_the_request_without_the_client(script: str) -> None:
    code = (
        "import sys; from stalwart.cli import main\n"
        "rc = main(['k8s', 'submit', '--dry-run', '-n', 'team', 'train.py', 'ddp', '--steps', '2',"
        " '--run-id', 'd-1', '--checkpoint-store', 's3://b'])\n"
        "print('kubernetes imported' if 'kubernetes' in sys.modules else 'no client', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "no client"
    first, body = proc.stdout.split("\n", 1)
    assert first == "# dry run: POST /apis/kubeflow.org/v1/namespaces/team/pytorchjobs"
    assert yaml.safe_load(body)["metadata"] == {
        "name": "d-1",
        "namespace": "team",
        "labels": {
            "app.kubernetes.io/managed-by": "stalwart",
            "stalwart.io/run-id": "d-1",
            "stalwart.io/task": "ddp",
        },
    }


class _Recorder:
    calls: list[tuple] = []

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict
    ):
        self.calls.append(("custom", group, version, namespace, plural, body))
        return body

    def create_namespaced_pod(self, namespace: str, body: dict) -> dict:
        self.calls.append(("pod", namespace, body))
        return body


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    from kubernetes import client, config

    _Recorder.calls = []
    monkeypatch.setattr(config, "load_kube_config", lambda config_file=None: None)
    monkeypatch.setattr(
        config, "list_kube_config_contexts", lambda config_file=None: ([], {"context": {"namespace": "ctx"}})
    )
    monkeypatch.setattr(client, "CustomObjectsApi", _Recorder)
    monkeypatch.setattr(client, "CoreV1Api", _Recorder)
    return _Recorder.calls


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ddp", "--steps", "3"], ("kubeflow.org", "v1", "ctx", "pytorchjobs")),
        (
            ["-n", "ml", "ddp", "--steps", "3", "--kind", "trainjob"],
            ("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs"),
        ),
    ],
)
def test_submit_sends_the_rendered_custom_resource(
    script: str,
    capsys: pytest.CaptureFixture[str],
    fake_client: list[tuple],
    argv: list[str],
    expected: tuple,
) -> None:
    flags, task_argv = (argv[:2], argv[2:]) if argv[0] == "-n" else ([], argv)
    common = ["--run-id", "s-1", "--checkpoint-store", "s3://b"]
    code, rendered, err = run(capsys, "k8s", "render", *common, *flags, script, *task_argv)
    assert code == 0, err
    code, out, err = run(capsys, "k8s", "submit", *common, *flags, script, *task_argv)
    assert code == 0, err
    ((kind, *call, body),) = fake_client
    assert kind == "custom" and tuple(call) == expected
    assert body == {
        **yaml.safe_load(rendered),
        "metadata": {**yaml.safe_load(rendered)["metadata"], "namespace": expected[2]},
    }
    assert out.startswith(f"created {body['kind']} s-1 in namespace {expected[2]} (run s-1)")


def test_submit_creates_a_pod_with_the_core_api(
    script: str, capsys: pytest.CaptureFixture[str], fake_client: list[tuple]
) -> None:
    code, _, err = run(
        capsys, "k8s", "submit", "--run-id", "p-1", script, "single", "--checkpoint-store", "s3://b"
    )
    assert code == 0, err
    ((kind, namespace, body),) = fake_client
    assert (kind, namespace, body["kind"], body["metadata"]["name"]) == ("pod", "ctx", "Pod", "p-1")


def test_submit_without_a_kubeconfig_is_a_clear_error(
    script: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    code, out, err = run(
        capsys, "k8s", "submit", script, "ddp", "--steps", "1", "--checkpoint-store", "s3://b"
    )
    assert code == 2 and out == "" and "Traceback" not in err
    assert (
        "no Kubernetes configuration" in err
        and "missing-kubeconfig" in err
        and "not a pod in a cluster" in err
    )


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[str, list[dict]]]:
    """A stand-in API server: records each request; answers 201 with the object, 409 on a repeat."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"method": "POST", "path": self.path, "body": body})
            keys = [(r["path"], r["body"]["metadata"]["name"]) for r in received]
            if keys.count(keys[-1]) > 1:
                status, reply = (
                    409,
                    {"kind": "Status", "reason": "AlreadyExists", "message": "it already exists"},
                )
            else:
                status, reply = 201, {**body, "metadata": {**body["metadata"], "uid": "u-1"}}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "local", "context": {"cluster": "local", "user": "me", "namespace": "research"}}
                ],
                "current-context": "local",
            }
        )
    )
    try:
        yield str(kubeconfig), received
    finally:
        server.shutdown()
        server.server_close()


def test_submit_through_the_real_client(
    script: str, capsys: pytest.CaptureFixture[str], api_server: tuple[str, list[dict]]
) -> None:
    kubeconfig, received = api_server
    argv = ["k8s", "submit", "--kubeconfig", kubeconfig, "--run-id", "h-1", "--checkpoint-store", "s3://b"]
    code, out, err = run(capsys, *argv, script, "ddp", "--steps", "5")
    assert code == 0, err
    (request,) = received
    assert request["path"] == "/apis/kubeflow.org/v1/namespaces/research/pytorchjobs"
    assert request["body"]["kind"] == "PyTorchJob" and request["body"]["metadata"]["namespace"] == "research"
    assert out.startswith("created PyTorchJob h-1 in namespace research")
    code, out, err = run(capsys, *argv, "-n", "other", script, "single")
    assert code == 0, err
    assert received[-1]["path"] == "/api/v1/namespaces/other/pods"
    code, out, err = run(capsys, *argv, script, "ddp", "--steps", "5")  # the same name again
    assert code == 1 and "Traceback" not in err
    assert "refused PyTorchJob h-1: 409 Conflict: it already exists" in err


def test_readme_shows_what_render_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Elastic training and clusters", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    command = re.search(r"`(stalwart k8s render [^`]+)`", section).group(1)
    (tmp_path / "pretrain.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STALWART_CHECKPOINT_STORE", raising=False)
    status, out, err = run(capsys, *shlex.split(command)[1:])
    assert status == 0, err
    assert out == shown
