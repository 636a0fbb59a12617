"""Restoring a task checkpoint into a directory that several processes share.

All torch elastic workers of a node construct ``ctx().checkpoint`` with the same ``path`` and call
``load_sync()`` at about the same time; nodes may share that filesystem too. Every reader must get the
whole checkpoint, and a checkpoint handed to one reader must never be torn down under it by another.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import restore_workers
from processes import run_all

import stalwart as sw
from stalwart.checkpoint.task import Checkpoint

SRC = str(Path(sw.__file__).resolve().parents[1])  # so subprocesses import the same stalwart


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict | None]:
    if kind == "file":
        return (tmp_path / "store").as_uri(), None
    return request.getfixturevalue("s3_bucket")


_write_tree = restore_workers.write_tree


def _run_readers(
    uri: str,
    options: dict | None,
    base: Path,
    out: Path,
    kind: str,
    expected: object,
    readers: int,
    rounds: int,
) -> list[dict]:
    """``readers`` spawned processes load attempt 1's checkpoint together, ``rounds`` times; their reports."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(readers)
    out.mkdir()
    procs = [
        ctx.Process(
            target=restore_workers.load_rounds,
            args=(i, uri, options, str(base), rounds, kind, expected, barrier, str(out)),
            daemon=True,
        )
        for i in range(readers)
    ]
    run_all(procs, 300, "reader processes")
    reports = []
    for i, proc in enumerate(procs):
        result = out / f"result-{i}.json"
        assert result.exists(), f"reader {i} reported nothing (exit code {proc.exitcode})"
        reports += [{"reader": i, **r} for r in json.loads(result.read_text())]
    return reports


def _failures(reports: list[dict], expected: object) -> list[str]:
    out = []
    for r in reports:
        if r["ok"]:
            continue
        if "error" in r:
            out.append(f"reader {r['reader']} round {r['round']}: {r['error'].strip().splitlines()[-1]}")
            continue
        for label in ("seen", "again"):
            got = r[label]
            if got == expected:
                continue
            if isinstance(expected, dict) and isinstance(got, dict):
                wrong = sorted(k for k in expected if got.get(k) != expected[k]) + sorted(
                    set(got) - set(expected)
                )
                out.append(f"reader {r['reader']} round {r['round']} ({label}): wrong or missing {wrong}")
            else:
                out.append(f"reader {r['reader']} round {r['round']} ({label}): wrong payload")
    return out


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_concurrent_readers_of_a_directory_checkpoint_all_get_every_file_whole(
    tmp_path: Path, stalwart_home: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    uri, options = _store(kind, tmp_path, request)
    src = tmp_path / "ckpt-dir"
    _write_tree(src, seed=91)
    expected = restore_workers.digest_tree(src)
    info = Checkpoint(uri, attempt=0, storage_options=options).save_sync(src)

    base = tmp_path / "node-restore"
    readers, rounds = (8, 3) if kind == "file" else (4, 2)  # every reader lists the store: moto is slow
    reports = _run_readers(uri, options, base, tmp_path / "out", "directory", expected, readers, rounds)
    assert not _failures(reports, expected), "\n".join(_failures(reports, expected))
    # one restored copy per shared directory, and every reader was handed that copy
    for round_ in range(rounds):
        paths = {r["path"] for r in reports if r["round"] == round_}
        assert paths == {str(base / f"round{round_}" / info.name)}, paths
        leftovers = sorted(p.name for p in (base / f"round{round_}").iterdir())
        assert leftovers == [".stalwart-restore", info.name], leftovers


def test_concurrent_readers_of_a_bytes_checkpoint_all_get_the_whole_payload(
    tmp_path: Path, stalwart_home: Path
) -> None:
    uri = (tmp_path / "store").as_uri()
    payload = random.Random(92).randbytes(8 * 2**20 + 5)
    Checkpoint(uri, attempt=0).save_sync(payload)
    expected = hashlib.sha256(payload).hexdigest()
    base = tmp_path / "node-restore"
    reports = _run_readers(uri, None, base, tmp_path / "out", "bytes", expected, readers=8, rounds=3)
    assert not _failures(reports, expected), "\n".join(_failures(reports, expected))
    for round_ in range(3):
        assert {r["path"] for r in reports if r["round"] == round_} == {
            str(base / f"round{round_}" / "payload")
        }


def test_elastic_ranks_of_a_task_all_restore_the_whole_directory(tmp_path: Path, stalwart_home: Path) -> None:
    """The reported case end to end: a real elastic task, 4 workers on one node, ``ctx().checkpoint``."""
    run = sw.run(restore_workers.ranks_restore_a_directory, seed=7)
    assert len(run.attempts) == 2
    expected_dir = tmp_path / "expected"
    _write_tree(expected_dir, seed=7)
    expected = restore_workers.digest_tree(expected_dir)
    views = run.output["views"]
    assert len(views) == 4
    for rank, seen in enumerate(views):
        assert "error" not in seen, f"rank {rank}:\n{seen['error']}"
        assert seen["files"] == expected and seen["again"] == expected, f"rank {rank} saw a torn checkpoint"
    assert len({seen["path"] for seen in views}) == 1  # one restored copy for the node


# --------------------------------------------------------------------------------------------------------
# A restored directory in use is never deleted; one nobody uses any more is cleaned up
# --------------------------------------------------------------------------------------------------------


def test_a_directory_handed_to_a_reader_survives_another_reader_restoring_a_newer_version(
    tmp_path: Path, stalwart_home: Path
) -> None:
    uri = (tmp_path / "store").as_uri()
    shared = tmp_path / "shared"
    old_src, new_src = tmp_path / "old", tmp_path / "new"
    _write_tree(old_src, seed=1, files=3)
    _write_tree(new_src, seed=2, files=4)
    old = Checkpoint(uri, attempt=0, keep=5).save_sync(old_src)

    first = Checkpoint(uri, attempt=1, path=shared).load_sync()
    assert first == shared / old.name
    # a straggler commits a newer version; a reader arriving later restores that one into the same place
    new = Checkpoint(uri, attempt=1, keep=5).save_sync(new_src)
    second = Checkpoint(uri, attempt=2, path=shared).load_sync()
    assert second == shared / new.name
    assert restore_workers.digest_tree(second) == restore_workers.digest_tree(new_src)
    # the first reader's directory is still whole: this process still uses it
    assert restore_workers.digest_tree(first) == restore_workers.digest_tree(old_src)


_HOLD_AND_EXIT = textwrap.dedent(
    """
    import sys
    import stalwart as sw
    print(sw.Checkpoint(sys.argv[1], attempt=1, path=sys.argv[2]).load_sync(), flush=True)
    """
)


def test_a_restored_directory_nobody_uses_is_removed_by_the_next_restore(
    tmp_path: Path, stalwart_home: Path
) -> None:
    uri = (tmp_path / "store").as_uri()
    shared = tmp_path / "shared"
    old_src, new_src = tmp_path / "old", tmp_path / "new"
    _write_tree(old_src, seed=3, files=2)
    _write_tree(new_src, seed=4, files=2)
    old = Checkpoint(uri, attempt=0, keep=5).save_sync(old_src)
    proc = subprocess.run(
        [sys.executable, "-c", _HOLD_AND_EXIT, uri, str(shared)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(shared / old.name)  # restored by a process that has exited since

    new = Checkpoint(uri, attempt=1, keep=5).save_sync(new_src)
    restored = Checkpoint(uri, attempt=2, path=shared).load_sync()
    assert restored == shared / new.name
    assert sorted(p.name for p in shared.iterdir()) == [".stalwart-restore", new.name]
