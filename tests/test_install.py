"""The README's test command resolves on a fresh machine without pip backtracking.

pip once spent 15 to 19 minutes here walking back through ~1,300 botocore releases: the newest
kubernetes needs python-dateutil>=3, botocore (under s3fs and moto) needs <3, and pip backtracked
through aiobotocore and botocore instead of kubernetes. This resolves the test extra from scratch (a
fresh virtual environment, nothing installed, ``--dry-run``) and checks pip never had to look through
the AWS packages' releases. It needs the package index (as the install itself does).
"""

from __future__ import annotations

import re
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_pip_args() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    test_command = next(c for c in commands if ".[test]" in c)
    install = test_command.split("&&")[0].split()  # pip install torch==... -e ".[test]"
    return [arg.strip('"') for arg in install[2:]]


def test_the_test_extra_resolves_from_scratch_without_backtracking(tmp_path: Path) -> None:
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    args = _readme_pip_args()
    assert any(a.startswith("torch==") for a in args) and any(a.endswith("[test]") for a in args), args
    try:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pip did not resolve the test extra in 20 minutes:\n{str(exc.stdout)[-3000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    backtracked = set(re.findall(r"pip is (?:still )?looking at multiple versions of (\S+)", output))
    aws = backtracked & {"aiobotocore", "botocore", "s3fs", "moto"}
    assert not aws, f"pip backtracked through {sorted(aws)}:\n{output[-3000:]}"
    assert "Would install" in output and re.search(r"\bkubernetes-\d", output), output[-2000:]


def test_ci_installs_exactly_the_declared_floors() -> None:
    """.ci/floors.txt pins every dependency of the package and its extras (but gcs, which no test
    uses) at its floor in pyproject.toml, and the README's test command installs with it, so the
    suite runs at the floors: a floor is a version that was tested."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [
        r for name, group in extras.items() if name != "gcs" for r in group
    ]
    floors = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,;\s]+)", requirement)
        assert match, f"{requirement!r} has no floor"
        floors[match.group(1).lower()] = match.group(3)
    pinned = dict(
        line.split("==", 1) for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines() if "==" in line
    )
    assert pinned == floors
    assert "-c .ci/floors.txt" in " ".join(_readme_pip_args())
    assert "-c .ci/floors.txt" in (ROOT / ".ci" / "run").read_text()
