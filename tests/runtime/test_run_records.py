"""A damaged run-record database: every command says which file and what to do, and keeps the file."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

import pytest
import runner_tasks as tasks

import stalwart as sw
from stalwart.cli import main
from stalwart.runtime.records import RunRecords, RunRecordsError

SCRIPT = """
import stalwart as sw

env = sw.TaskEnvironment(name="records")


@env.task
def hello(name: str = "world") -> str:
    return f"hello {name}"
"""


def _healthy_store(home: Path, runs: int = 200) -> Path:
    """A real runs.db of several pages (runs, attempts, events), its WAL folded into the file."""
    store = RunRecords(home / "runs.db")
    for n in range(runs):
        run_id = f"old-run-{n}"
        store.create_run(run_id, "hello", 2, None, {"name": "x" * 100})
        store.start_attempt(run_id, 0, 1000 + n, str(home / "runs" / run_id / "attempt-0"))
        store.finish_attempt(run_id, 0, "succeeded", 0, None)
        store.finish_run(run_id, "succeeded")
    db = sqlite3.connect(home / "runs.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return home / "runs.db"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    noise = random.Random(0).randbytes(len(data))
    if how == "garbage":  # something else written over the whole file
        path.write_bytes(noise)
    elif how == "truncated":  # a copy or a disk that stopped half-way
        path.write_bytes(data[: len(data) // 2])
    elif how == "half-corrupt":  # the header and schema intact, the rest overwritten
        half = len(data) // 2
        path.write_bytes(data[:half] + noise[half:])
    else:
        raise AssertionError(how)


@pytest.fixture(scope="module")
def healthy_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _healthy_store(tmp_path_factory.mktemp("records")).read_bytes()


@pytest.fixture(params=["garbage", "truncated", "half-corrupt"])
def damaged(request: pytest.FixtureRequest, stalwart_home: Path, healthy_bytes: bytes) -> Path:
    stalwart_home.mkdir(parents=True, exist_ok=True)
    db = stalwart_home / "runs.db"
    db.write_bytes(healthy_bytes)
    _damage(db, request.param)
    return db


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _says_what_and_where(text: str, db: Path) -> None:
    assert str(db) in text
    assert "damaged" in text
    assert f"mv {db} {db}.damaged" in text  # what to do about it
    assert "Traceback" not in text and "sqlite3.DatabaseError" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["runs", "--limit", "3"],
        ["show", "old-run-7"],
        ["show", "old-run", "--logs"],
        ["run", "{script}", "hello", "--name", "you"],
        ["run", "{script}", "hello", "--run-id", "old-run-3", "-q"],
    ],
)
def test_every_command_names_the_damaged_file_and_keeps_it(
    damaged: Path, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "records_script.py"
    script.write_text(SCRIPT)
    before = _digest(damaged)
    code = main([arg.format(script=script) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    _says_what_and_where(err, damaged)
    assert "hello you" not in out  # the task did not run without a record
    assert _digest(damaged) == before  # never repaired, replaced or deleted behind the user's back


def test_kubernetes_commands_do_not_need_the_records(
    damaged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "records_script.py"
    script.write_text(SCRIPT)
    before = _digest(damaged)
    assert main(["k8s", "render", str(script), "hello", "--run-id", "k8s-1", "--image", "python:3.11"]) == 0
    assert "kind: Pod" in capsys.readouterr().out
    assert _digest(damaged) == before


def test_run_refuses_before_the_first_attempt(damaged: Path, tmp_path: Path) -> None:
    before = _digest(damaged)
    marker = tmp_path / "ran"
    with pytest.raises(RunRecordsError) as info:
        sw.run(tasks.touches, marker=str(marker))
    _says_what_and_where(str(info.value), damaged)
    assert info.value.path == damaged
    assert not marker.exists()
    assert _digest(damaged) == before


def test_moving_the_file_aside_starts_afresh_and_keeps_the_old_records(stalwart_home: Path) -> None:
    stalwart_home.mkdir(parents=True, exist_ok=True)
    db = _healthy_store(stalwart_home, runs=5)
    _damage(db, "garbage")
    with pytest.raises(RunRecordsError):
        sw.run(tasks.add, 1)
    db.rename(db.with_name("runs.db.damaged"))
    assert sw.run(tasks.add, 1).output == 2
    assert len(RunRecords(db).list_runs()) == 1


def test_a_healthy_store_is_not_reported_as_damaged(stalwart_home: Path) -> None:
    stalwart_home.mkdir(parents=True, exist_ok=True)
    db = _healthy_store(stalwart_home, runs=3)
    store = RunRecords(db)
    store.check()
    assert [r.id for r in store.list_runs(2)] == ["old-run-2", "old-run-1"]
