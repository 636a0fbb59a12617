"""The ``stalwart`` command: run a task from a file with typed inputs, list runs, show one run."""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

import stalwart
from stalwart.cli import main, parse_task_inputs
from stalwart.cli.errors import CliError
from stalwart.runtime.records import RunRecords

TASKS = '''
"""Tasks for the CLI tests; no torch, so each attempt starts fast."""
import os
import signal
import sys
from pathlib import Path

import stalwart

env = stalwart.TaskEnvironment(name="cli-tests")


@env.task
def train(
    num_epochs: int,
    lr: float,
    shuffle: bool,
    name: str,
    layers: list[int],
    debug: bool = False,
    out: Path | None = None,
) -> dict:
    """Train nothing, return what arrived."""
    print("training in", __name__, "main is", sys.modules["__main__"].__name__)
    return {
        "num_epochs": num_epochs, "lr": lr, "shuffle": shuffle, "name": name, "layers": layers,
        "debug": debug, "out": out,
    }


@env.task
def explode(message: str) -> None:
    raise ValueError(f"exploded: {message}")


@env.task(retries=2)
def survive(steps: int = 2) -> str:
    ckpt = stalwart.ctx().checkpoint
    if stalwart.ctx().attempt == 0:
        ckpt.save_sync(b"step-1")
        print("attempt 0 about to die", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return f"resumed from {ckpt.load_sync().read_bytes().decode()} after {steps} steps"


helper = 42

if __name__ == "__main__":
    print("THE MAIN BLOCK RAN")
    sys.exit(3)
'''


@pytest.fixture
def tasks_file(tmp_path: Path) -> Path:
    path = tmp_path / "train_tasks.py"
    path.write_text(TASKS)
    return path


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stalwart.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def store(home: Path) -> RunRecords:
    return RunRecords(home / "runs.db")


# --- version and import cost -----------------------------------------------------------------------


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stalwart {stalwart.__version__}"


def test_version_from_the_installed_console_script() -> None:
    script = Path(sys.executable).with_name("stalwart")
    exe = str(script) if script.exists() else shutil.which("stalwart")
    assert exe, "the `stalwart` console script is not installed next to this Python"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"stalwart {stalwart.__version__}"


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import sys, stalwart.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fsspec', 'kubernetes', 'rich'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().err


# --- stalwart run ----------------------------------------------------------------------------------


def test_run_parses_typed_inputs_and_prints_the_output(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_before = sys.modules["__main__"]
    code = main(
        [
            "run",
            str(tasks_file),
            "train",
            "--num_epochs",
            "3",
            "--lr",
            "1e-3",
            "--shuffle",
            "no",
            "--name",
            "mnist",
            "--layers",
            "64,32",
            "--debug",
            "--run-id",
            "typed-1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = {
        "num_epochs": 3,
        "lr": 0.001,
        "shuffle": False,
        "name": "mnist",
        "layers": [64, 32],
        "debug": True,
        "out": None,
    }
    assert f"output: {expected!r}" in out
    assert "run typed-1 succeeded after 1 attempt" in out
    assert "training in __mp_main__ main is __mp_main__" in out  # echoed, imported as `python FILE` is
    assert "THE MAIN BLOCK RAN" not in out + err
    assert sys.modules["__main__"] is main_before  # main() puts the caller's __main__ back
    record = store(stalwart_home).get_run("typed-1")
    assert record is not None and record.status == "succeeded" and record.inputs["layers"] == "[64, 32]"


def test_quiet_run_with_json_list_and_options_before_the_file(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--num-epochs", "1", "--lr", "2", "--shuffle", "--name", "x", "--layers", "[1, 2]"]
    code = main(["run", "--run-id", "quiet-1", str(tasks_file), "train", *args, "--out", "/tmp/o", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "training in" not in out  # --quiet: the attempt's output stays in its log only
    assert "'layers': [1, 2]" in out and "'shuffle': True" in out and "PosixPath('/tmp/o')" in out
    assert "run quiet-1 succeeded" in out


def test_failing_task_exits_1_with_its_traceback(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(tasks_file), "explode", "--message", "kaboom"])
    err = capsys.readouterr().err
    assert code == 1
    assert "failed after 1 attempt" in err
    assert "Traceback" in err and "ValueError: exploded: kaboom" in err
    assert "train_tasks.py" in err and "in explode" in err  # the task's own frame
    assert "stalwart/cli" not in err  # no traceback of the CLI itself


def test_sigkilled_attempt_is_retried_then_show_lists_both_attempts(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = cli("run", str(tasks_file), "survive", "--steps", "5", "--run-id", "survivor-7")
    assert proc.returncode == 0, proc.stderr
    assert "output: 'resumed from step-1 after 5 steps'" in proc.stdout
    assert "run survivor-7 succeeded after 2 attempts" in proc.stdout
    assert "killed by SIGKILL" in proc.stderr  # the runner's retry warning

    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    header, row = listing.splitlines()[:2]
    assert header.split() == ["id", "task", "status", "attempts", "started", "duration"]
    assert row.split()[:4] == ["survivor-7", "survive", "succeeded", "2"]

    assert main(["show", "surv", "--logs"]) == 0  # a unique prefix is enough
    shown = capsys.readouterr().out
    assert "survivor-7" in shown and "steps=5" in shown
    attempts = shown.split("Attempts", 1)[1].split("Checkpoints", 1)[0].splitlines()
    rows = [line.split() for line in attempts if line[:1].isdigit()]
    assert [r[:2] for r in rows] == [["0", "killed"], ["1", "succeeded"]]
    assert "-9 (SIGKILL)" in shown
    checkpoints = shown.split("Checkpoints", 1)[1].split("Events", 1)[0]
    assert "a00000.s000001" in checkpoints and "6 B" in checkpoints
    assert "attempt_killed" in shown and "run_succeeded" in shown
    assert "--- attempt 0 stdout.log (1 line) ---\nattempt 0 about to die" in shown


def test_unknown_task_exits_2_listing_the_tasks(tasks_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tasks_file), "trian"]) == 2
    err = capsys.readouterr().err
    assert "no task 'trian'" in err
    assert "train(num_epochs: int" in err and "explode(message: str)" in err and "survive(" in err
    assert "Traceback" not in err

    assert main(["run", str(tasks_file), "helper"]) == 2
    err = capsys.readouterr().err
    assert "'helper' in" in err and "is not a task but of type int" in err

    assert main(["run", str(tasks_file)]) == 2  # no TASK at all: say which there are
    assert "explode(message: str)" in capsys.readouterr().err


def test_bad_input_value_exits_2_naming_the_input_and_type(
    tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--lr", "0.1", "--shuffle", "--name", "x", "--layers", "1"]
    assert main(["run", str(tasks_file), "train", "--num-epochs", "three", *args]) == 2
    err = capsys.readouterr().err
    assert 'Invalid value for --num-epochs: "three" is not an int' in err
    assert "train_tasks.py train --help" in err  # where to look

    assert main(["run", str(tasks_file), "train", "--num-epochs", "3", *args[:-1], "1,x"]) == 2
    assert "Invalid value for --layers: item 1 is 'x', not int" in capsys.readouterr().err

    assert main(["run", str(tasks_file), "train", "--num-epochs", "3", *args[2:], "--lr", "fast"]) == 2
    assert 'Invalid value for --lr: unable to convert "fast" into float' in capsys.readouterr().err


def test_missing_required_input_exits_2(tasks_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tasks_file), "train", "--lr", "0.1", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "missing required inputs: --num-epochs (int), --shuffle (bool), --layers (list[int])" in err


def test_unknown_option_exits_2(tasks_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tasks_file), "explode", "--message", "m", "--mesage", "x"]) == 2
    assert "Unknown option: --mesage. Did you mean --message?" in capsys.readouterr().err


def test_task_help_lists_inputs_with_types_and_defaults(
    tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tasks_file), "train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Train nothing, return what arrived." in out
    assert "Inputs of task train" in out and "--num-epochs --num_epochs" in out and "int [required]" in out
    assert "--layers A,B,...           list[int] [required]" in out
    assert "bool; default: False" in out and "Path | None; default: None" in out
    assert "--run-id ID" in out and "--quiet" in out and "Lists take 1,2,3" in out


def test_missing_file_and_broken_file_exit_2_without_a_cli_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "absent.py"), "train"]) == 2
    assert "no such file" in capsys.readouterr().err

    broken = write(tmp_path, "broken.py", "import stalwart\nx = 1 +\n")
    assert main(["run", str(broken), "train"]) == 2
    err = capsys.readouterr().err
    assert "could not import" in err and "SyntaxError" in err and "stalwart/cli" not in err

    failing = write(tmp_path, "failing.py", "import not_a_module_anywhere_42\n")
    assert main(["run", str(failing), "train"]) == 2
    err = capsys.readouterr().err
    assert "ModuleNotFoundError" in err and "failing.py" in err and "importlib" not in err

    exiting = write(tmp_path, "exiting.py", "import sys\nsys.exit(4)\n")
    assert main(["run", str(exiting), "train"]) == 2
    assert "called sys.exit(4) while being imported" in capsys.readouterr().err


def test_unguarded_run_at_import_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write(
        tmp_path,
        "unguarded.py",
        """
        import stalwart
        env = stalwart.TaskEnvironment(name="t")

        @env.task
        def job() -> int:
            return 1

        stalwart.run(job)
        """,
    )
    assert main(["run", str(script), "job"]) == 2
    assert 'if __name__ == "__main__":' in capsys.readouterr().err


# --- typed inputs, without running anything --------------------------------------------------------

env = stalwart.TaskEnvironment(name="cli-parse")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


@env.task
def typed(
    a: int,
    /,
    flag: bool = True,
    maybe: int | None = 5,
    pair: tuple[int, str] = (0, ""),
    scores: dict[str, float] | None = None,
    mode: Literal["fast", "slow"] = "fast",
    color: Color = Color.RED,
    size: Size = Size.SMALL,
    items=(),
    untyped=None,
) -> None:
    pass


def parse(*argv: str) -> tuple[list, dict, dict]:
    return parse_task_inputs(typed, list(argv))


def test_parsing_covers_the_usual_annotations() -> None:
    positional, inputs, options = parse(
        "--a",
        "1e3",
        "--no-flag",
        "--maybe",
        "none",
        "--pair",
        '[7, "x"]',
        "--scores",
        '{"acc": 1}',
        "--mode",
        "slow",
        "--color",
        "blue",
        "--untyped",
        "[1, 2]",
        "--quiet",
    )
    assert positional == [1000]
    assert inputs == {
        "flag": False,
        "maybe": None,
        "pair": (7, "x"),
        "scores": {"acc": 1.0},
        "mode": "slow",
        "color": Color.BLUE,
        "untyped": [1, 2],
    }
    assert options == {"quiet": True}


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_spellings(raw: str, value: bool) -> None:
    assert parse("--a", "1", "--flag", raw)[1] == {"flag": value}
    assert parse("--a", "1", f"--flag={raw}")[1] == {"flag": value}


def test_enum_members_by_name_in_any_case_or_by_value() -> None:
    for raw in ("BLUE", "blue", "Blue"):
        assert parse("--a", "1", "--color", raw)[1] == {"color": Color.BLUE}
    assert parse("--a", "1", "--size", "2")[1] == {"size": Size.LARGE}  # by value
    assert parse("--a", "1", "--size", "small")[1] == {"size": Size.SMALL}


def test_only_given_inputs_are_passed_so_defaults_stay_the_functions() -> None:
    assert parse("--a", "2", "--items", "a,b") == ([2], {"items": ("a", "b")}, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--a", "2.5"], 'Invalid value for --a: "2.5" is not a whole number'),
        (["--a", "1", "--flag", "maybe"], 'Invalid value for --flag: unable to convert "maybe" into bool'),
        (["--a", "1", "--pair", "1,2,3"], "Invalid value for --pair: tuple[int, str] needs 2 items, got 3"),
        (["--a", "1", "--scores", "[1]"], 'Invalid value for --scores: unable to convert "[1]" into dict'),
        (["--a", "1", "--mode", "medium"], 'Invalid value "medium" for --mode. Choose from: "fast", "slow"'),
        (["--a", "1", "--color", "green"], 'Invalid value for --color: "green" is not one of RED, BLUE'),
    ],
)
def test_bad_values_name_the_input_and_type(argv: list[str], message: str) -> None:
    with pytest.raises(CliError) as info:
        parse(*argv)
    assert info.value.code == 2
    assert message in str(info.value) and "See `stalwart run FILE.py typed --help`." in str(info.value)


# --- stalwart runs / show, from records made directly ---------------------------------------------


def test_runs_when_nothing_ran_yet(stalwart_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.strip() == f"No runs yet (home: {stalwart_home})"
    assert not (stalwart_home / "runs.db").exists()  # reading does not create the database


def test_runs_newest_first_with_limit(stalwart_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = store(stalwart_home)
    for run_id in ("older-run", "newer-run"):
        runs.create_run(run_id, "train", 1, None, {})
    runs.finish_run("older-run", "failed", "boom")
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["newer-run", "older-run"]
    assert "running" in lines[1] and "so far" in lines[1] and "failed" in lines[2]
    assert main(["runs", "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_show_prefix_ambiguous_unknown_and_unreachable_store(
    stalwart_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = store(stalwart_home)
    runs.create_run("exp-1", "train", 2, "nosuchprotocol://bucket/exp-1", {"epochs": "3"})
    runs.create_run("exp-12", "train", 2, None, {})

    assert main(["show", "exp-"]) == 2
    err = capsys.readouterr().err
    assert "matches 2 runs" in err and "exp-1 " in err and "exp-12" in err

    assert main(["show", "nope"]) == 1
    assert "no run matches 'nope'" in capsys.readouterr().err

    assert main(["show", "exp-1"]) == 0  # an exact id wins over being a prefix of exp-12
    out = capsys.readouterr().out
    assert "exp-1" in out and "epochs=3" in out and "Attempts: none" in out
    assert "Checkpoints: could not list nosuchprotocol://bucket/exp-1" in out
    assert "run_started" in out


def test_required_input_of_a_type_the_command_line_cannot_give(tmp_path, stalwart_home, capsys) -> None:
    script = tmp_path / "opaque.py"
    script.write_text(
        "import stalwart as sw\n"
        "env = sw.TaskEnvironment(name='opaque')\n"
        "class Model:\n    pass\n"
        "@env.task\n"
        "def fit(model: Model) -> int:\n    return 1\n"
    )
    assert main(["run", str(script), "fit"]) == 2
    err = capsys.readouterr().err
    assert "needs inputs whose type the command line cannot give" in err and "'model'" in err
    assert "Traceback" not in err


def test_running_a_succeeded_run_id_again_shows_its_output_and_rerun_forces_an_attempt(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", str(tasks_file), "explode", "--message", "x", "--run-id", "once-1"]
    assert main(["run", str(tasks_file), "survive", "--run-id", "once-1"]) == 0
    capsys.readouterr()
    assert main(["run", str(tasks_file), "survive", "--run-id", "once-1"]) == 0
    out, err = capsys.readouterr()
    assert "attempt 0 about to die" not in out + err  # nothing ran
    assert "run once-1 already succeeded (attempt 1); not running it again" in err and "--rerun" in err
    assert "output: 'resumed from step-1 after 2 steps'" in out
    assert [a.number for a in store(stalwart_home).attempts("once-1")] == [0, 1]

    assert main(["run", str(tasks_file), "survive", "--run-id", "once-1", "--rerun"]) == 0
    out, err = capsys.readouterr()
    assert "resuming run once-1" in err and "run once-1 succeeded after 3 attempts" in out
    assert [a.number for a in store(stalwart_home).attempts("once-1")] == [0, 1, 2]
    assert main(args) == 2  # another task's run id: refused, as before
    assert "belongs to task 'survive'" in capsys.readouterr().err


# --- the command line's library: completion, JSON listings ---------------------------------------


def test_bash_completion_completes_commands_and_subcommands(tmp_path: Path) -> None:
    """``--install-completion`` writes a bash script that completes the command tree."""
    script = tmp_path / "stalwart.bash"
    assert main(["--install-completion", "--shell", "bash", "--output", str(script)]) == 0
    assert script.is_file()

    def complete(*words: str) -> set[str]:
        line = " ".join(f'"{word}"' for word in words)
        code = f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _stalwart; "
        code += 'echo "${COMPREPLY[@]}"'
        proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return set(proc.stdout.split())

    assert complete("stalwart", "ru") == {"run", "runs"}
    assert complete("stalwart", "k8s", "") >= {"render", "submit"}
    assert "--timeline" in complete("stalwart", "show", "r1", "--t")


def test_runs_json_lists_the_same_runs_as_data(
    stalwart_home: Path, tasks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing ran: an empty list, still JSON
    assert main(["run", str(tasks_file), "explode", "--message", "x", "--run-id", "json-1", "-q"]) == 1
    assert main(["run", str(tasks_file), "survive", "--run-id", "json-2", "-q"]) == 0
    capsys.readouterr()
    assert main(["runs", "--json", "--limit", "1"]) == 0
    (newest,) = json.loads(capsys.readouterr().out)
    assert (newest["id"], newest["task"], newest["status"], newest["attempts"]) == (
        "json-2",
        "survive",
        "succeeded",
        2,
    )
    assert main(["runs", "--limit", "0"]) == 2
    assert "--limit 0 is not accepted; use an int >= 1" in capsys.readouterr().err


def test_bare_group_prints_its_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s"]) == 2
    err = capsys.readouterr().err
    assert "render" in err and "submit" in err
