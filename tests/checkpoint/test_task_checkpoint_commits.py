"""Versions are committed whole or not at all, retention never loses the newest, and a kill -9
during a save leaves a whole version.

Versions are written exactly as ``stalwart.checkpoint.task`` documents them; where a test needs a state
the API cannot produce it writes the objects directly through ``DurableStore`` (``checkpoint_stores``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import pytest
from checkpoint_stores import SRC, Store, commit_marker, load_bytes

from stalwart.checkpoint.task import Checkpoint, CheckpointInfo

# --------------------------------------------------------------------------------------------------------
# 3. Atomicity and retention
# --------------------------------------------------------------------------------------------------------


def test_uncommitted_version_is_invisible(store: Store, tmp_path: Path) -> None:
    committed = store.checkpoint(0).save_sync(b"committed")
    # a later save of attempt 0 that died after its payload, before its commit marker
    store.put("a00000.s000002/payload", b"never committed")
    # and one that died while writing the marker's temporary file (file:// writes COMMIT.json by rename)
    store.put("a00000.s000003/payload", b"never committed either")
    store.put("a00000.s000003/.COMMIT.json.123.tmp", commit_marker("a00000.s000003", "bytes", "raw", b"x"))

    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert cp.list() == [committed]
    assert cp.previous() == committed
    assert cp.load_sync().read_bytes() == b"committed"


def test_uncommitted_only_loads_none(store: Store, tmp_path: Path) -> None:
    store.put("a00000.s000001/payload", b"never committed")
    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert cp.list() == [] and cp.load_sync() is None


def test_version_becomes_visible_once_committed(store: Store, tmp_path: Path) -> None:
    payload = b"committed late"
    store.put("a00000.s000001/payload", payload)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert cp.list() == []
    store.raw().commit("a00000.s000001/COMMIT.json", commit_marker("a00000.s000001", "bytes", "raw", payload))
    assert [i.name for i in cp.list()] == ["a00000.s000001"]
    assert cp.load_sync().read_bytes() == payload


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_version_committed_by_another_process_becomes_visible(store: Store, tmp_path: Path) -> None:
    """A long-lived reader (the runner, a monitor) must see what another process commits later.

    The other process is a separate filesystem instance, so it shares no listing cache with the reader.
    """
    other_fs, other_root = fsspec.core.url_to_fs(store.uri, skip_instance_cache=True, **(store.options or {}))
    other_root = other_root.rstrip("/")
    payload = b"saved by another process"
    if store.kind == "file":
        Path(other_root, "a00000.s000001").mkdir(parents=True)
    other_fs.pipe_file(f"{other_root}/a00000.s000001/payload", payload)

    reader = store.checkpoint(1, path=tmp_path / "restore")
    assert reader.list() == []  # listed while the other process is between payload and marker

    marker = commit_marker("a00000.s000001", "bytes", "raw", payload)
    other_fs.pipe_file(f"{other_root}/a00000.s000001/COMMIT.json", marker)
    assert [i.name for i in reader.list()] == ["a00000.s000001"]
    assert reader.load_sync().read_bytes() == payload


def test_retention_keeps_newest_versions(store: Store, tmp_path: Path) -> None:
    cp = store.checkpoint(0, keep=2)
    infos = [cp.save_sync(f"v{i}".encode()) for i in range(1, 5)]
    assert [i.name for i in cp.list()] == [infos[2].name, infos[3].name]
    assert store.versions() == [infos[2].name, infos[3].name]  # old data is gone, not just the markers
    assert load_bytes(store, 1, tmp_path / "restore") == b"v4"

    cp1 = store.checkpoint(1, keep=2)
    a1 = cp1.save_sync(b"a1 v1")
    assert [i.name for i in cp1.list()] == [infos[3].name, a1.name]


def test_keep_one_never_deletes_the_newest(store: Store, tmp_path: Path) -> None:
    for attempt in range(3):
        cp = store.checkpoint(attempt, keep=1)
        for step in range(2):
            info = cp.save_sync(f"a{attempt} step{step}".encode())
            assert [i.name for i in cp.list()] == [info.name]
            assert store.versions() == [info.name]
    assert load_bytes(store, 3, tmp_path / "restore") == b"a2 step1"


def test_prune_runs_only_after_the_new_version_is_committed(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = store.checkpoint(0, keep=1)
    first = cp.save_sync(b"v1")

    removals: list[tuple[str, list[str]]] = []
    real_remove = cp.store.remove

    def spy(name: str) -> None:
        removals.append((name, [i.name for i in store.checkpoint(99).list()]))
        real_remove(name)

    monkeypatch.setattr(cp.store, "remove", spy)

    # a save that fails midway commits nothing and deletes nothing
    with pytest.raises(Exception):  # noqa: B017 - torch/pickle raise different errors for a lambda
        cp.save_sync({"not picklable": lambda: None})
    assert removals == []
    assert [i.name for i in store.checkpoint(1).list()] == [first.name]
    assert load_bytes(store, 1, tmp_path / "r1") == b"v1"

    second = cp.save_sync(b"v2")
    assert removals and all(second.name in committed for _, committed in removals)
    assert first.name in [name for name, _ in removals]
    assert [i.name for i in cp.list()] == [second.name]
    assert load_bytes(store, 1, tmp_path / "r2") == b"v2"


def test_prune_removes_uncommitted_leftovers_of_earlier_attempts(store: Store, tmp_path: Path) -> None:
    a0 = store.checkpoint(0).save_sync(b"a0 committed")
    store.put("a00000.s000002/payload", b"attempt 0 died here")
    store.put("a00001.s000001/payload.tar", b"attempt 1 died here")
    assert store.versions() == [a0.name, "a00000.s000002", "a00001.s000001"]

    a2 = store.checkpoint(2, keep=3).save_sync(b"a2 committed")
    assert store.versions() == [a0.name, a2.name]
    assert [i.name for i in store.checkpoint(3).list()] == [a0.name, a2.name]
    assert load_bytes(store, 3, tmp_path / "restore") == b"a2 committed"


def test_prune_keeps_a_version_whose_marker_exists_but_cannot_be_read(store: Store, tmp_path: Path) -> None:
    """An unreadable marker is evidence of a committed version, not of a save that died: retention leaves
    it until it is older than every version kept, as it would a readable one."""
    a0 = store.checkpoint(0).save_sync(b"a0 committed")
    store.put(f"{a0.name}/COMMIT.json", b'{"format": 1, "info": {"name": "a0')  # torn in storage
    a1 = store.checkpoint(1, keep=2).save_sync(b"a1 committed")
    assert store.versions() == [a0.name, a1.name]
    assert store.get(f"{a0.name}/payload") == b"a0 committed"
    a2 = store.checkpoint(2, keep=2).save_sync(b"a2 committed")
    assert store.versions() == [a1.name, a2.name]  # two newer versions kept: it goes, as a readable one would


def test_prune_never_deletes_the_version_just_committed(store: Store, tmp_path: Path) -> None:
    """Even when a later attempt already has versions (a stale attempt still running), the save that just
    committed survives its own retention pass."""
    later = store.checkpoint(2, keep=1).save_sync(b"attempt 2")
    stale = store.checkpoint(1, keep=1).save_sync(b"stale attempt 1")
    assert store.exists(f"{stale.name}/payload") and store.exists(f"{stale.name}/COMMIT.json")
    assert store.exists(f"{later.name}/COMMIT.json")
    assert load_bytes(store, 2, tmp_path / "r2") == b"stale attempt 1"
    assert load_bytes(store, 3, tmp_path / "r3") == b"attempt 2"


def test_prune_keeps_an_in_flight_save_of_the_same_attempt(store: Store, tmp_path: Path) -> None:
    """Uncommitted versions of the *current* attempt may still be uploading (async saves run on threads)."""
    in_flight = b"first half of a large save"
    store.put("a00000.s000001/payload", in_flight)
    cp = store.checkpoint(0, keep=1)
    done = cp.save_sync(b"a quick save that commits first")
    assert done.name == "a00000.s000002"  # does not reuse the in-flight version's name
    assert store.versions() == ["a00000.s000001", done.name]
    assert store.get("a00000.s000001/payload") == in_flight


def test_concurrent_async_saves_get_distinct_versions(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two overlapping ``await cp.save(...)`` calls (each runs save_sync on a thread) get distinct versions.

    A barrier after the store listing holds both threads at the same point of ``_next_version``, the
    interleaving that happens by chance (~1 in 5 runs here) when two saves start together.
    """
    cp = store.checkpoint(0, keep=5)
    barrier = threading.Barrier(2, timeout=1)
    real_children = cp.store.children
    calls = itertools.count()

    def children(prefix: str = "") -> list[str]:
        listing = real_children(prefix)
        if next(calls) < 2:  # the two version allocations; later listings (retention) run freely
            # both saves have listed the store before either writes; a broken barrier means the other
            # save is serialised behind a lock, which is fine
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return listing

    monkeypatch.setattr(cp.store, "children", children)

    async def both() -> list[CheckpointInfo]:
        return await asyncio.gather(cp.save(b"A" * 2**20), cp.save(b"B" * 2**20))

    infos = asyncio.run(both())
    assert len({info.name for info in infos}) == 2, infos
    assert sorted(store.checkpoint(1).list(), key=lambda i: i.name) == sorted(infos, key=lambda i: i.name)
    for info in infos:  # every committed version verifies
        assert hashlib.sha256(store.get(f"{info.name}/payload")).hexdigest() == info.sha256
    assert load_bytes(store, 1, tmp_path / "restore") in (b"A" * 2**20, b"B" * 2**20)


def test_failed_save_does_not_reuse_or_hide_versions(store: Store, tmp_path: Path) -> None:
    """A save that fails mid-payload leaves no visible version, and the next save is still loaded."""
    cp = store.checkpoint(0)
    cp.save_sync(b"good")
    with pytest.raises(Exception):  # noqa: B017
        cp.save_sync({"not picklable": lambda: None})
    cp.save_sync(b"good again")
    assert load_bytes(store, 1, tmp_path / "restore") == b"good again"


# --------------------------------------------------------------------------------------------------------
# 5. kill -9 during a save
# --------------------------------------------------------------------------------------------------------

BIG = 64 * 2**20

_KILL_CHILD = textwrap.dedent(
    """
    import sys
    from stalwart.checkpoint.task import Checkpoint

    uri, size = sys.argv[1], int(sys.argv[2])
    v1 = b"version one " * 1000
    v2 = (bytes(range(251)) * (size // 251 + 1))[:size]
    cp = Checkpoint(uri, attempt=0)
    cp.save_sync(v1)
    print("ready", flush=True)
    cp.save_sync(v2)
    print("done", flush=True)
    """
)
V1 = b"version one " * 1000
V2 = (bytes(range(251)) * (BIG // 251 + 1))[:BIG]


def _start_saver(uri: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, uri, str(BIG)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    line = proc.stdout.readline()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        pytest.fail(f"saver did not commit version 1: {line!r} {proc.stderr.read().decode()}")
    return proc


def test_kill_9_during_save_leaves_a_whole_version(tmp_path: Path, stalwart_home: Path) -> None:
    # Calibrate: how long does saving version 2 take here?
    uri = (tmp_path / "calibrate").as_uri()
    proc = _start_saver(uri)
    started = time.monotonic()
    assert proc.stdout.readline() == b"done\n"
    duration = time.monotonic() - started
    assert proc.wait(timeout=60) == 0
    restored = Checkpoint(uri, attempt=1, path=tmp_path / "restore-calibrate").load_sync()
    assert restored.read_bytes() == V2

    rng = random.Random(9)
    outcomes = []
    deadline = time.monotonic() + 40
    for trial in range(10):
        if time.monotonic() > deadline:
            break
        uri = (tmp_path / f"trial{trial}").as_uri()
        proc = _start_saver(uri)
        # Mostly inside the save; the last trials may land after the commit.
        delay = rng.uniform(0, duration * (0.9 if trial < 7 else 1.3))
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        finished = proc.stdout.read() == b"done\n"

        cp = Checkpoint(uri, attempt=1, path=tmp_path / f"restore{trial}")
        restored = cp.load_sync()
        assert restored is not None, f"trial {trial}: nothing loadable after a kill at {delay:.3f} s"
        data = restored.read_bytes()
        assert data in (V1, V2), f"trial {trial}: restored {len(data)} bytes after a kill at {delay:.3f} s"
        if finished:
            assert data == V2, f"trial {trial}: version 2 was committed but not loaded"
        visible = [i.name for i in cp.list()]
        assert visible in (["a00000.s000001"], ["a00000.s000001", "a00000.s000002"])
        assert (data == V2) == (len(visible) == 2)
        outcomes.append("v2" if data == V2 else "v1")
    assert "v1" in outcomes, f"no kill landed inside the save (save takes {duration:.3f} s): {outcomes}"
