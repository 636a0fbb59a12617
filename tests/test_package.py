"""The package's face: fast import, version, lint, and the README's promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light() -> None:
    code = (
        "import sys, stalwart as sw\n"
        "heavy = {'torch', 'fsspec', 'kubernetes', 'rich', 's3fs'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "sw.Resources, sw.GPU, sw.TaskEnvironment, sw.RetryStrategy, sw.ctx, sw.run, sw.Checkpoint\n"
        "sw.latest_checkpoint\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "print(sw.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", proc.stdout)


def test_unknown_attribute_is_an_attribute_error() -> None:
    import stalwart

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        stalwart.Nope  # noqa: B018
    assert "Checkpoint" in dir(stalwart)
    assert set(stalwart.__all__) == {"__version__", *stalwart._EXPORTS}
    for name in stalwart._EXPORTS:
        assert getattr(stalwart, name) is not None


def test_console_script_prints_the_version() -> None:
    import stalwart

    # the script installed for this interpreter (its venv's bin), not another one found first on PATH
    exe = shutil.which("stalwart", path=sysconfig.get_path("scripts")) or shutil.which("stalwart")
    assert exe, "the console script is not installed: pip install -e ."
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and stalwart.__version__ in proc.stdout


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    paths = [str(ROOT / p) for p in ("src", "tests", "examples", "benchmarks") if (ROOT / p).exists()]
    check = subprocess.run([ruff, "check", *paths], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", *paths], capture_output=True, text=True, cwd=ROOT)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2, commands  # the quick start: one demo command, one test command
    demo, tests = commands
    assert "examples/quickstart.py" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_readme_names_every_module_where_things_are() -> None:
    """README's "Where things are" matches the tree: every module of the package is named there."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1]
    modules = sorted(
        path.relative_to(ROOT / "src" / "stalwart")
        for path in (ROOT / "src" / "stalwart").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py", "_version.py")
    )
    missing = [str(m) for m in modules if f"`{m.name}`" not in section]
    assert not missing, f"not named in README's 'Where things are': {missing}"
