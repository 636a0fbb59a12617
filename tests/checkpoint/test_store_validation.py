"""Errors no retry can fix stop a run before its first attempt, or after the first, with one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import runner_tasks as tasks

import stalwart as sw
from stalwart.cli import main

BAD = "nosuchscheme://bucket/ckpt"


def _no_attempt_ran(home: Path, marker: Path) -> None:
    assert not marker.exists()
    assert not (home / "runs").exists()  # no attempt directory, no attempt process


def test_an_unknown_scheme_is_refused_where_the_store_is_declared() -> None:
    message = "fsspec knows no protocol 'nosuchscheme'"
    with pytest.raises(ValueError, match=f"checkpoint_store='{BAD}': {message}.*'s3://bucket/prefix'"):
        sw.TaskEnvironment(name="declared", checkpoint_store=BAD)
    env = sw.TaskEnvironment(name="declared")

    def train() -> None: ...

    with pytest.raises(ValueError, match=message):
        env.task(checkpoint_store=BAD)(train)
    with pytest.raises(ValueError, match=message):
        tasks.add.override(checkpoint_store=BAD)
    with pytest.raises(ValueError, match=message):
        sw.with_runcontext(checkpoint_store=BAD)
    with pytest.raises(ValueError, match="fsspec knows no protocol 'nosuchcache'"):
        sw.with_runcontext(checkpoint_store="nosuchcache::s3://bucket/ckpt")
    for good in (
        "s3://bucket/ckpt",
        "file:///data/ckpt",
        "/data/ckpt",
        "memory://ckpt",
        "simplecache::s3://b/c",
    ):
        assert sw.with_runcontext(checkpoint_store=good).checkpoint_store == good


def test_declaring_a_store_keeps_import_stalwart_light() -> None:
    code = (
        "import sys, stalwart as sw\n"
        "heavy = sorted({'torch', 'fsspec', 'kubernetes'} & set(sys.modules))\n"
        "sw.TaskEnvironment(name='x', checkpoint_store='s3://bucket/ckpt')\n"
        "print(heavy, 's3fs' in sys.modules, 'botocore' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False False"  # fsspec is read when a store is declared; s3fs is not imported


def test_a_store_from_the_environment_fails_before_attempt_0(
    stalwart_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STALWART_CHECKPOINT_STORE", BAD)
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=f"STALWART_CHECKPOINT_STORE='{BAD}': fsspec knows no protocol"):
        sw.run(tasks.touches, marker=str(marker))  # retries=3: no attempt at all
    _no_attempt_ran(stalwart_home, marker)


def test_the_cli_refuses_an_unknown_scheme_in_one_message(
    stalwart_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "four_attempts.py"
    script.write_text(
        textwrap.dedent(
            """
            import stalwart as sw
            env = sw.TaskEnvironment(name="four")

            @env.task(retries=3)
            def work(marker: str) -> None:
                open(marker, "a").write("ran\\n")
            """
        )
    )
    marker = tmp_path / "ran"
    assert main(["run", str(script), "work", "--marker", str(marker), "--checkpoint-store", BAD]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint_store='{BAD}': fsspec knows no protocol 'nosuchscheme'" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 2
    _no_attempt_ran(stalwart_home, marker)


def test_a_missing_backend_names_the_extra_to_install(tmp_path: Path) -> None:
    """s3fs hidden from a fresh interpreter, as on a machine where it was never installed."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys

            class _Hide:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] == "s3fs":
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, _Hide())
            """
        )
    )
    code = textwrap.dedent(
        """
        import os
        import stalwart as sw
        import runner_tasks

        try:
            sw.TaskEnvironment(name="x", checkpoint_store="s3://bucket/ckpt")
        except ValueError as exc:
            print("DECLARED:", exc)
        os.environ["STALWART_CHECKPOINT_STORE"] = "s3://bucket/ckpt"
        try:
            sw.run(runner_tasks.touches, marker=os.path.join(os.environ["STALWART_HOME"], "ran"))
        except ValueError as exc:
            print("RUN:", exc)
        home = os.environ["STALWART_HOME"]
        ran = [os.path.exists(os.path.join(home, name)) for name in ("runs", "ran")]
        print("ATTEMPTS:", any(ran))
        """
    )
    tests = Path(__file__).resolve().parents[1] / "support"
    src = Path(sw.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hide), str(src), str(tests)]),
        "STALWART_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    install = 'pip install "stalwart[s3]"'
    assert "checkpoint_store='s3://bucket/ckpt' needs the s3fs package" in lines["DECLARED"]
    assert install in lines["DECLARED"]
    assert "STALWART_CHECKPOINT_STORE='s3://bucket/ckpt' needs the s3fs package" in lines["RUN"]
    assert install in lines["RUN"]
    assert lines["ATTEMPTS"] == "False"


SCRIPT_ONLY_MAIN = """
import stalwart as sw

env = sw.TaskEnvironment(name="load")

if __name__ != "__main__":
    raise ImportError("this script only imports as __main__")


@env.task(retries=3)
def hello() -> str:
    return "hi"


if __name__ == "__main__":
    print("OUTPUT", sw.run(hello).output)
"""

SCRIPT_TASK_UNDER_MAIN = """
import stalwart as sw

env = sw.TaskEnvironment(name="load")

if __name__ == "__main__":

    @env.task(retries=3)
    def hello() -> str:
        return "hi"

    print("OUTPUT", sw.run(hello).output)
"""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (SCRIPT_ONLY_MAIN, "ImportError: this script only imports as __main__"),
        (SCRIPT_TASK_UNDER_MAIN, 'not under `if __name__ == "__main__":`'),
    ],
)
def test_a_task_that_cannot_be_loaded_is_not_retried(
    stalwart_home: Path, tmp_path: Path, source: str, expected: str
) -> None:
    script = tmp_path / "load_script.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "failed after 1 attempt: attempt 0 raised stalwart.runtime.protocol.TaskLoadError" in proc.stderr
    assert "could not load task hello from" in proc.stderr and expected in proc.stderr
    assert "retrying as attempt" not in proc.stderr
    assert len(list((stalwart_home / "runs").glob("*/attempt-*"))) == 1


def test_k8s_render_refuses_an_unknown_scheme_but_not_a_backend_only_the_pods_need(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "pods.py"
    script.write_text(
        "import stalwart as sw\nenv = sw.TaskEnvironment(name='pods', image='python:3.11')\n"
        "@env.task\ndef hello() -> str:\n    return 'hi'\n"
    )
    assert main(["k8s", "render", str(script), "hello", "--checkpoint-store", BAD]) == 2
    assert f"--checkpoint-store='{BAD}': fsspec knows no protocol 'nosuchscheme'" in capsys.readouterr().err
    # gcsfs is not needed on this machine to render pods that will write to gs://
    assert main(["k8s", "render", str(script), "hello", "--checkpoint-store", "gs://bucket/ckpt"]) == 0
    assert "gs://bucket/ckpt" in capsys.readouterr().out
