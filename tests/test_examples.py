"""The demo and the README's tour run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stalwart.runtime.records import RunRecords

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STALWART_HOME": str(home)}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_quickstart_is_killed_and_resumes(tmp_path: Path) -> None:
    proc = _run([sys.executable, str(ROOT / "examples" / "quickstart.py")], tmp_path / "home", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # nothing a user reads as breakage
    assert "OOM" not in proc.stdout + proc.stderr  # the kill is deliberate: no guess about the OOM killer
    assert "attempt 0 was killed by SIGKILL; retrying as attempt 1" in proc.stderr
    assert "  attempt 0: was killed by SIGKILL" in proc.stdout
    assert "attempt 0: simulating a crash (SIGKILL)" in proc.stdout
    assert "attempt 1: resumed from the checkpoint of epoch 4" in proc.stdout
    assert "attempt 1: epoch 4/8" not in proc.stdout  # nothing before the checkpoint is redone
    run_id = re.search(r"^run (\S+): succeeded", proc.stdout, re.M).group(1)
    attempts = RunRecords(tmp_path / "home" / "runs.db").attempts(run_id)
    assert [a.status for a in attempts] == ["killed", "succeeded"]


def test_torch_finds_numpy_in_the_environment_the_package_declares() -> None:
    """torch imports without numpy but warns "Failed to initialize NumPy" in every process that imports
    it (the demo's runner and each attempt); torch does not require numpy, so this package must."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    assert "torch" in names and "numpy" in names


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## Tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    (tmp_path / "tour.py").write_text(code)
    proc = _run([sys.executable, "tour.py"], tmp_path / "home", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "5 ['killed', 'succeeded']"
    cli = _run(
        [sys.executable, "-m", "stalwart.cli", "run", "tour.py", "count", "--to", "4"],
        tmp_path / "home",
        tmp_path,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    runs = RunRecords(tmp_path / "home" / "runs.db").list_runs()
    assert len(runs) == 2 and all(r.status == "succeeded" for r in runs)


def test_ddp_example_survives_a_killed_worker(run_example, tmp_path: Path) -> None:
    proc = run_example("ddp_flash.py")
    assert "Traceback" not in proc.stderr, proc.stderr  # rank 0 only lost its peer: one line, no traceback
    assert "rank 1: killed by SIGKILL after step 25" in proc.stdout
    assert "rank 0: resumed at step 25 from flash" in proc.stdout
    assert re.search(r"succeeded: \{'resumed_at': 25, 'restored_from': 'flash'", proc.stdout)
    # the run's records say so too: one attempt, one worker-group restart, resumed at step 25 from flash
    (run,) = RunRecords(tmp_path / "home" / "runs.db").list_runs()
    show = _run([sys.executable, "-m", "stalwart.cli", "show", run.id, "--json"], tmp_path / "home", tmp_path)
    assert show.returncode == 0, show.stderr
    (attempt,) = json.loads(show.stdout)["attempts"]
    assert attempt["restarts"] == 1
    resumed = [r["resumed"] for r in attempt["rounds"] if r["round"] == 1]
    assert resumed and (resumed[0]["step"], resumed[0]["source"]) == (25, "flash"), attempt
