"""The task Checkpoint: what one attempt saves, the next attempt loads, on file:// and on S3 (moto).

Every test that touches a store runs against both a local directory (``file://``) and a moto S3 bucket.
Versions are written exactly as ``stalwart.checkpoint.task`` documents them (``aNNNNN.sNNNNNN/payload`` or
``payload.tar``, then ``COMMIT.json``); where a test needs a state the API cannot produce (an uncommitted
save, a corrupt payload, a hostile archive) it writes the objects directly through ``DurableStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from dataclasses import asdict
from pathlib import Path

import fsspec
import pytest
import torch

import stalwart
from stalwart import config
from stalwart.checkpoint import durable_store as store_module
from stalwart.checkpoint.archive import UnsafeArchiveError
from stalwart.checkpoint.durable_store import DurableStore
from stalwart.checkpoint.restore import BOOKKEEPING
from stalwart.checkpoint.task import Checkpoint, CheckpointInfo, CorruptCheckpointError

LOGGER = "stalwart.checkpoint"
SRC = str(Path(stalwart.__file__).resolve().parents[1])  # so subprocesses import the same stalwart


# --------------------------------------------------------------------------------------------------------
# Stores and helpers
# --------------------------------------------------------------------------------------------------------


class Store:
    """One checkpoint URI plus what it takes to open it, and raw access for tests that forge states."""

    def __init__(self, kind: str, uri: str, options: dict | None) -> None:
        self.kind = kind
        self.uri = uri
        self.options = options

    def __repr__(self) -> str:
        return f"Store({self.kind}: {self.uri})"

    def checkpoint(self, attempt: int = 0, **kwargs) -> Checkpoint:
        return Checkpoint(self.uri, attempt=attempt, storage_options=self.options, **kwargs)

    def raw(self) -> DurableStore:
        return DurableStore(self.uri, self.options)

    def put(self, name: str, data: bytes) -> None:
        """Write one object directly, bypassing Checkpoint (no commit marker unless ``name`` is one)."""
        raw = self.raw()
        path = raw.path(name)
        if raw.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        raw.fs.pipe_file(path, data)

    def get(self, name: str) -> bytes:
        return self.raw().read_bytes(name)

    def exists(self, name: str) -> bool:
        raw = self.raw()
        raw.fs.invalidate_cache()
        return raw.fs.exists(raw.path(name))

    def versions(self) -> list[str]:
        """Every version prefix present, committed or not."""
        return [n for n in self.raw().children() if n.startswith("a")]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, stalwart_home: Path) -> Store:
    if request.param == "file":
        return Store("file", (tmp_path / "store").as_uri(), None)
    uri, options = request.getfixturevalue("s3_bucket")
    return Store("s3", uri, options)


def load_bytes(store: Store, attempt: int, path: Path) -> bytes | None:
    """What ``attempt`` restores, as bytes (None when there is nothing to restore)."""
    restored = store.checkpoint(attempt, path=path).load_sync()
    return None if restored is None else restored.read_bytes()


def commit_marker(name: str, kind: str, encoding: str, payload: bytes, filename: str | None = None) -> bytes:
    """A valid COMMIT.json for ``payload`` as version ``name`` (aNNNNN.sNNNNNN)."""
    attempt, seq = int(name[1:6]), int(name[8:])
    info = CheckpointInfo(
        name=name,
        attempt=attempt,
        seq=seq,
        kind=kind,
        encoding=encoding,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        created=time.time(),
        filename=filename,
    )
    return json.dumps({"format": 1, "info": asdict(info), "host": "test", "pid": 0}).encode()


def snapshot(root: Path) -> dict[str, tuple]:
    """Relative path -> ("dir",) or ("file", bytes), for every entry under ``root``."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = ("dir",) if path.is_dir() else ("file", path.read_bytes())
    return out


def restored_entries(path: Path) -> list[str]:
    """What a restore left in ``path``, besides its bookkeeping (which must hold no scratch either)."""
    if (path / BOOKKEEPING).exists():
        leftovers = [p.name for p in (path / BOOKKEEPING).iterdir() if p.name.startswith("scratch-")]
        assert leftovers == [], f"scratch left behind in {path / BOOKKEEPING}: {leftovers}"
    return sorted(p.name for p in path.iterdir() if p.name != BOOKKEEPING)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == logging.WARNING
    ]


# --------------------------------------------------------------------------------------------------------
# 1. Round trips
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello checkpoint", bytes(range(256)) * 4, os.urandom(12 * 2**20 + 7)],
    ids=["empty", "short", "all-byte-values", "12MB-multipart"],
)
def test_bytes_round_trip(store: Store, tmp_path: Path, data: bytes) -> None:
    info = store.checkpoint(0).save_sync(data)
    assert (info.kind, info.encoding, info.size) == ("bytes", "raw", len(data))
    assert info.sha256 == hashlib.sha256(data).hexdigest()

    cp = store.checkpoint(1, path=tmp_path / "restore")
    restored = cp.load_sync()
    assert restored == tmp_path / "restore" / "payload"
    assert restored.read_bytes() == data
    assert cp.load_object() == data


def test_bytearray_and_memoryview_round_trip(store: Store, tmp_path: Path) -> None:
    store.checkpoint(0).save_sync(bytearray(b"from a bytearray"))
    assert load_bytes(store, 1, tmp_path / "r1") == b"from a bytearray"
    store.checkpoint(1).save_sync(memoryview(b"--from a memoryview--")[2:-2])
    assert load_bytes(store, 2, tmp_path / "r2") == b"from a memoryview"


def test_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    data = os.urandom(2 * 2**20 + 3)
    src.write_bytes(data)

    info = store.checkpoint(0).save_sync(src)
    assert (info.kind, info.encoding, info.filename, info.size) == ("file", "raw", "weights.bin", len(data))

    cp = store.checkpoint(1, path=tmp_path / "restore")
    restored = cp.load_sync()
    assert restored == tmp_path / "restore" / "payload"
    assert restored.read_bytes() == data
    assert cp.load_object() == data


def test_file_given_as_str_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "state.txt"
    src.write_text("step=7\n")
    assert store.checkpoint(0).save_sync(str(src)).kind == "file"
    assert load_bytes(store, 1, tmp_path / "restore") == b"step=7\n"


def _build_tree(root: Path) -> None:
    (root / "shards" / "rank0").mkdir(parents=True)
    (root / "shards" / "rank1" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "shards" / "rank1" / "empty-too").mkdir()
    (root / "meta.json").write_text('{"step": 12}')
    (root / "shards" / "rank0" / "model.bin").write_bytes(bytes(range(256)) * 64 + b"\x00\xff")
    (root / "shards" / "rank1" / "deeper" / "optim.bin").write_bytes(os.urandom(4099))
    (root / "shards" / "rank1" / "zero-length").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 * 2**20))


def test_directory_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ckpt-dir"
    _build_tree(src)
    expected = snapshot(src)
    siblings = {p.name for p in tmp_path.iterdir()}

    info = store.checkpoint(0).save_sync(src)
    assert (info.kind, info.encoding, info.filename) == ("directory", "tar", "ckpt-dir")
    assert store.exists(f"{info.name}/payload.tar") and not store.exists(f"{info.name}/payload")

    cp = store.checkpoint(1, path=tmp_path / "restore")
    restored = cp.load_sync()
    assert restored == cp.path / info.name and cp.path == tmp_path / "restore"
    assert restored_entries(cp.path) == [info.name]
    assert snapshot(restored) == expected
    assert cp.load_object() == restored
    # the downloaded archive is not left behind next to the restore directory
    assert {p.name for p in tmp_path.iterdir()} - {"store"} == siblings | {"restore"}


def test_directory_restore_replaces_stale_contents(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ckpt-dir"
    _build_tree(src)
    store.checkpoint(0).save_sync(src)
    target = tmp_path / "restore"
    (target / "leftover-from-elsewhere").mkdir(parents=True)
    (target / "stale.txt").write_text("old")

    restored = store.checkpoint(1, path=target).load_sync()
    assert snapshot(restored) == snapshot(src)


def _tensor_state() -> dict:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 3).state_dict(), "epoch": 3}


def _assert_state_equal(loaded: dict, state: dict) -> None:
    assert set(loaded) == {"model", "epoch"} and loaded["epoch"] == 3
    assert set(loaded["model"]) == set(state["model"]) == {"weight", "bias"}
    for key, tensor in state["model"].items():
        assert loaded["model"][key].dtype == tensor.dtype
        assert torch.equal(loaded["model"][key], tensor), key


def test_tensor_dict_round_trip(store: Store, tmp_path: Path) -> None:
    state = _tensor_state()
    info = store.checkpoint(0).save_sync(state)
    assert (info.kind, info.encoding) == ("object", "torch")

    cp = store.checkpoint(1, path=tmp_path / "restore")
    _assert_state_equal(cp.load_object(), state)  # weights_only=True by default
    # the seed's pattern: a plain torch.load on the restored payload
    _assert_state_equal(torch.load(cp.load_sync(), weights_only=True), state)


def test_load_object_is_weights_only_by_default(store: Store, tmp_path: Path) -> None:
    store.checkpoint(0).save_sync({"cls": Store})  # an arbitrary class: refused by weights_only loading
    cp = store.checkpoint(1, path=tmp_path / "restore")
    with pytest.raises(Exception, match=r"(?i)weights_only"):
        cp.load_object()
    assert cp.load_object(weights_only=False) == {"cls": Store}


_PICKLE_CHILD = textwrap.dedent(
    """
    import json, sys
    from stalwart.checkpoint.task import Checkpoint

    uri, options, restore = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    state = {"epoch": 3, "names": ["a", "b"], "blob": bytes(range(256)), "nested": {"lr": 0.5, "t": (1, 2)}}
    info = Checkpoint(uri, attempt=0, storage_options=options).save_sync(state)
    loaded = Checkpoint(uri, attempt=1, path=restore, storage_options=options).load_object()
    print(json.dumps({"encoding": info.encoding, "kind": info.kind, "same": loaded == state,
                      "torch_imported": "torch" in sys.modules}))
    """
)


def test_plain_object_without_torch_is_pickled(store: Store, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PICKLE_CHILD, store.uri, json.dumps(store.options), str(tmp_path / "child")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"encoding": "pickle", "kind": "object", "same": True, "torch_imported": False}

    # and this process (torch imported) loads the pickled object back too
    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert cp.previous().encoding == "pickle"
    assert cp.load_object() == {
        "epoch": 3,
        "names": ["a", "b"],
        "blob": bytes(range(256)),
        "nested": {"lr": 0.5, "t": (1, 2)},
    }


def test_s3_prefix_round_trip(s3_bucket: tuple[str, dict], tmp_path: Path) -> None:
    """A run's URI is usually a prefix inside a bucket, not the bucket itself."""
    bucket, options = s3_bucket
    uri = f"{bucket}/runs/run-1/checkpoint"
    Checkpoint(uri, attempt=0, storage_options=options).save_sync(b"under a prefix")
    # a sibling run under the same bucket sees nothing
    sibling = Checkpoint(f"{bucket}/runs/run-10/checkpoint", attempt=1, storage_options=options)
    assert sibling.list() == [] and sibling.load_sync() is None
    cp = Checkpoint(uri, attempt=1, path=tmp_path / "restore", storage_options=options)
    assert cp.load_sync().read_bytes() == b"under a prefix"


# --------------------------------------------------------------------------------------------------------
# 2. Which checkpoint is "previous"
# --------------------------------------------------------------------------------------------------------


def test_nothing_saved_loads_none(store: Store, tmp_path: Path) -> None:
    cp = store.checkpoint(3, path=tmp_path / "restore")
    assert cp.list() == []
    assert cp.previous() is None
    assert cp.load_sync() is None
    assert cp.load_object() is None


def test_attempt_zero_never_loads(store: Store, tmp_path: Path) -> None:
    cp = store.checkpoint(0, path=tmp_path / "restore")
    cp.save_sync(b"mine")
    assert cp.previous() is None and cp.load_sync() is None
    assert store.checkpoint(0).load_sync() is None


def test_skips_an_attempt_that_saved_nothing(store: Store, tmp_path: Path) -> None:
    first = store.checkpoint(0)
    first.save_sync(b"a0-first")
    newest = first.save_sync(b"a0-second")
    # attempt 1 crashed before saving anything
    cp = store.checkpoint(2, path=tmp_path / "restore")
    assert cp.previous() == newest
    assert cp.load_sync().read_bytes() == b"a0-second"


def test_own_and_later_attempts_are_invisible(store: Store, tmp_path: Path) -> None:
    store.checkpoint(0).save_sync(b"from attempt 0")
    own = store.checkpoint(1)
    own.save_sync(b"from attempt 1")
    store.checkpoint(2).save_sync(b"from attempt 2")

    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert cp.previous().attempt == 0
    assert cp.load_sync().read_bytes() == b"from attempt 0"
    # the Checkpoint that saved does not load its own save either
    assert own.load_sync().read_bytes() == b"from attempt 0"
    assert load_bytes(store, 2, tmp_path / "r2") == b"from attempt 1"
    assert load_bytes(store, 3, tmp_path / "r3") == b"from attempt 2"


def test_last_save_of_an_attempt_wins(store: Store, tmp_path: Path) -> None:
    cp0 = store.checkpoint(0, keep=10)
    for step in range(5):
        cp0.save_sync(f"step {step}".encode())
    assert load_bytes(store, 1, tmp_path / "restore") == b"step 4"


def test_list_and_previous_ordering(store: Store, tmp_path: Path) -> None:
    saved = []
    cp0 = store.checkpoint(0, keep=100)
    saved += [cp0.save_sync(f"a0 s{i}".encode()) for i in range(3)]  # s000001 .. s000003
    saved += [store.checkpoint(1, keep=100).save_sync(b"a1 s1")]
    # a restarted process of the same attempt continues the sequence instead of overwriting
    saved += [store.checkpoint(1, keep=100).save_sync(b"a1 s2")]
    saved += [store.checkpoint(12, keep=100).save_sync(b"a12 s1")]

    names = [info.name for info in saved]
    assert names[:3] == ["a00000.s000001", "a00000.s000002", "a00000.s000003"]
    assert names[3:] == ["a00001.s000001", "a00001.s000002", "a00012.s000001"]

    listed = store.checkpoint(5).list()
    assert listed == saved  # oldest first, full infos
    assert [(i.attempt, i.seq) for i in listed] == sorted((i.attempt, i.seq) for i in listed)
    assert store.checkpoint(1).previous() == saved[2]
    assert store.checkpoint(2).previous() == saved[4]
    assert store.checkpoint(12).previous() == saved[4]
    assert store.checkpoint(13).previous() == saved[5]
    assert load_bytes(store, 2, tmp_path / "r2") == b"a1 s2"


def test_load_is_cached_per_checkpoint(store: Store, tmp_path: Path) -> None:
    store.checkpoint(0).save_sync(b"v1")
    cp = store.checkpoint(1, path=tmp_path / "restore")
    first = cp.load_sync()
    assert cp.load_sync() == first and first.read_bytes() == b"v1"


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
# 4. Corruption
# --------------------------------------------------------------------------------------------------------


def _flip_one_byte(data: bytes, index: int | None = None) -> bytes:
    i = len(data) // 2 if index is None else index
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


CORRUPTIONS = {
    "flipped-byte": _flip_one_byte,
    "flipped-last-byte": lambda data: _flip_one_byte(data, len(data) - 1),
    "truncated": lambda data: data[: len(data) // 2],
    "truncated-to-empty": lambda data: b"",
    "extended": lambda data: data + b"\x00",
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_newest_falls_back_to_older(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    cp0 = store.checkpoint(0)
    good = os.urandom(4096)
    cp0.save_sync(good)
    bad = cp0.save_sync(os.urandom(4096))
    name = f"{bad.name}/payload"
    store.put(name, CORRUPTIONS[corrupt](store.get(name)))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    restored = cp.load_sync()
    assert restored.read_bytes() == good
    assert cp.load_object() == good
    messages = warnings_of(caplog)
    assert any(f"{store.uri}/{name}" in m for m in messages), messages
    assert restored_entries(cp.path) == ["payload"]


@pytest.mark.parametrize("corrupt", ["flipped-byte", "truncated"])
def test_only_version_corrupt_is_an_error(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    """A checkpoint that exists but cannot be read is an error, never "no checkpoint" (a fresh start)."""
    info = store.checkpoint(0).save_sync(os.urandom(10_000))
    name = f"{info.name}/payload"
    store.put(name, CORRUPTIONS[corrupt](store.get(name)))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    for load in (cp.load_sync, cp.load_object):
        with pytest.raises(CorruptCheckpointError, match="exist but none can be loaded") as raised:
            load()
        assert f"{info.name}: {store.uri}/{name} holds" in str(raised.value)
        assert [version for version, _ in raised.value.skipped] == [info.name]
    messages = warnings_of(caplog)
    assert any(f"{store.uri}/{name}" in m for m in messages), messages
    assert restored_entries(cp.path) == []  # no corrupt bytes left where the task would look


def test_every_version_unloadable_lists_each_and_why(store: Store, tmp_path: Path) -> None:
    cp0 = store.checkpoint(0, keep=5)
    corrupt = cp0.save_sync(b"a" * 1000)
    store.put(f"{corrupt.name}/payload", b"b" * 1000)
    missing = cp0.save_sync(b"c" * 1000)
    raw = store.raw()
    raw.fs.rm(raw.path(f"{missing.name}/payload"))
    torn = cp0.save_sync(b"d" * 1000)
    store.put(f"{torn.name}/COMMIT.json", b'{"format": 1, "info": {"na')

    with pytest.raises(CorruptCheckpointError) as raised:
        store.checkpoint(1, path=tmp_path / "restore").load_sync()
    assert "3 earlier checkpoint(s)" in str(raised.value)
    reasons = dict(raised.value.skipped)
    assert set(reasons) == {corrupt.name, missing.name, torn.name}
    assert "sha256" in reasons[corrupt.name]
    assert "missing although its commit marker exists" in reasons[missing.name]
    assert "unreadable commit marker" in reasons[torn.name]


def test_corrupt_tensor_checkpoint_falls_back(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _tensor_state()
    cp0 = store.checkpoint(0)
    cp0.save_sync(state)
    newer = cp0.save_sync({"model": torch.nn.Linear(4, 3).state_dict(), "epoch": 4})
    name = f"{newer.name}/payload"
    store.put(name, _flip_one_byte(store.get(name)))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    _assert_state_equal(cp.load_object(), state)
    assert any(name in m for m in warnings_of(caplog))


def test_missing_payload_is_skipped(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cp0 = store.checkpoint(0)
    cp0.save_sync(b"older")
    newer = cp0.save_sync(b"newer")
    raw = store.raw()
    raw.fs.rm(raw.path(f"{newer.name}/payload"))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert load_bytes(store, 1, tmp_path / "restore") == b"older"
    assert any(f"{newer.name}/payload" in m and "missing" in m for m in warnings_of(caplog))


def test_unreadable_commit_marker_is_ignored(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cp0 = store.checkpoint(0)
    cp0.save_sync(b"older")
    newer = cp0.save_sync(b"newer")
    store.put(f"{newer.name}/COMMIT.json", b'{"format": 1, "info": {"name": "a0')  # torn marker

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert [i.name for i in cp.list()] == ["a00000.s000001"]
    assert cp.load_sync().read_bytes() == b"older"
    assert any(newer.name in m for m in warnings_of(caplog))


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "a00000.s000001"), ("name", "../../escape"), ("kind", "symlink"), ("sha256", "../x")],
)
def test_commit_marker_describing_something_else_is_unreadable(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: str
) -> None:
    """Names in a marker end up in local paths: a marker must describe the version it sits in."""
    cp0 = store.checkpoint(0)
    cp0.save_sync(b"older")
    newer = cp0.save_sync(b"newer")
    marker = json.loads(store.get(f"{newer.name}/COMMIT.json"))
    marker["info"][field] = value
    store.put(f"{newer.name}/COMMIT.json", json.dumps(marker).encode())

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "work" / "restore")
    assert [i.name for i in cp.list()] == ["a00000.s000001"]
    assert cp.load_sync().read_bytes() == b"older"
    assert any(newer.name in m and "unreadable commit marker" in m for m in warnings_of(caplog))
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["restore"]


def test_corrupt_directory_falls_back(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    older, newer = tmp_path / "older", tmp_path / "newer"
    _build_tree(older)
    (newer / "sub").mkdir(parents=True)
    (newer / "sub" / "x.bin").write_bytes(os.urandom(5000))
    cp0 = store.checkpoint(0)
    cp0.save_sync(older)
    bad = cp0.save_sync(newer)
    name = f"{bad.name}/payload.tar"
    store.put(name, _flip_one_byte(store.get(name), 1024 + 100))  # inside x.bin's data

    caplog.set_level(logging.WARNING, logger=LOGGER)
    restored = store.checkpoint(1, path=tmp_path / "restore").load_sync()
    assert snapshot(restored) == snapshot(older)
    assert any(name in m for m in warnings_of(caplog))


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


# --------------------------------------------------------------------------------------------------------
# 6. Hostile archives
# --------------------------------------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


HOSTILE = {
    "dotdot": lambda work: [_file("ok.txt", b"fine"), _file("../escape", b"pwned")],
    "nested-dotdot": lambda work: [_file("a/../../escape", b"pwned")],
    "absolute": lambda work: [_file(f"{work.as_posix()}/escape", b"pwned")],
    "symlink-out": lambda work: [_symlink("link", ".."), _file("link/escape", b"pwned")],
}


@pytest.mark.parametrize("hostile", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_archive_is_refused(store: Store, tmp_path: Path, hostile: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    payload = _tar(HOSTILE[hostile](work))  # every member aims at work/escape, next to work/restore
    store.put("a00000.s000001/payload.tar", payload)
    store.raw().commit(
        "a00000.s000001/COMMIT.json", commit_marker("a00000.s000001", "directory", "tar", payload, "evil")
    )

    cp = store.checkpoint(1, path=work / "restore")
    assert [i.kind for i in cp.list()] == ["directory"]  # a committed, checksum-valid version
    # refused, and no other version to fall back to: an error naming the refusal, not "no checkpoint"
    with pytest.raises(CorruptCheckpointError, match="refusing to extract archive member") as raised:
        cp.load_sync()
    assert isinstance(raised.value.__cause__, UnsafeArchiveError)
    assert not (work / "escape").exists()
    assert not (tmp_path / "escape").exists()
    assert restored_entries(work / "restore") == []  # refused before anything was extracted
    assert sorted(p.name for p in work.iterdir()) == ["restore"]  # the downloaded archive is removed too


def _sparse_tar(realsize: int = 2**40) -> bytes:
    """A PAX (GNU sparse 1.0) member declaring 1 TiB, of which the archive stores four bytes."""
    sparse_map = b"1\n0\n4\n"
    body = sparse_map + b"\0" * (512 - len(sparse_map)) + b"DATA"
    info = tarfile.TarInfo("GNUSparseFile.0/huge.bin")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "huge.bin",
        "GNU.sparse.realsize": str(realsize),
    }
    return _tar([(info, body)])


def _gzip_bomb(size: int = 16 * 2**20) -> bytes:
    buf = io.BytesIO()
    info = tarfile.TarInfo("zeros.bin")
    info.size = size
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


REFUSED = {
    **{name: (lambda work, make=make: _tar(make(work))) for name, make in HOSTILE.items()},
    "sparse-1TiB": lambda work: _sparse_tar(),
    "gzip-bomb": lambda work: _gzip_bomb(),
    "unreadable-header": lambda work: b"this is not a tar archive" * 40,
}


@pytest.mark.parametrize("refused", list(REFUSED), ids=list(REFUSED))
def test_refused_newest_archive_falls_back_to_the_previous_version(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    """A committed archive that extraction refuses is skipped like a corrupt one, with a warning (why)."""
    work = tmp_path / "work"
    work.mkdir()
    older = tmp_path / "older"
    _build_tree(older)
    good = store.checkpoint(0).save_sync(older)
    payload = REFUSED[refused](work)
    name = "a00000.s000002"
    store.put(f"{name}/payload.tar", payload)
    store.raw().commit(f"{name}/COMMIT.json", commit_marker(name, "directory", "tar", payload, "evil"))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=work / "restore")
    assert [i.name for i in cp.list()] == [good.name, name]
    restored = cp.load_sync()
    # names first: reading a restored 1 TiB sparse member would take hours
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*")) == sorted(snapshot(older))
    assert restored == cp.path / good.name
    assert snapshot(restored) == snapshot(older)
    messages = warnings_of(caplog)
    assert any(name in m and "refusing to extract archive member" in m for m in messages), messages
    assert not (work / "escape").exists() and not (tmp_path / "escape").exists()
    assert restored_entries(cp.path) == [good.name]


# --------------------------------------------------------------------------------------------------------
# 7. Bad input
# --------------------------------------------------------------------------------------------------------


def test_save_missing_path(store: Store, tmp_path: Path) -> None:
    cp = store.checkpoint(0)
    with pytest.raises(FileNotFoundError, match=r"no/such/path.*neither a file nor a directory"):
        cp.save_sync("no/such/path")
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        cp.save_sync(tmp_path / "missing.bin")
    assert store.versions() == []  # nothing half-written
    assert store.checkpoint(1).load_sync() is None


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_refused_directory_save_leaves_nothing_behind(store: Store, tmp_path: Path, link: str) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the checkpoint")
    src = tmp_path / "ckpt-dir"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    os.symlink(outside if link == "absolute" else "../../outside.txt", src / "sub" / "escape")

    cp = store.checkpoint(0)
    with pytest.raises(ValueError, match=r"points outside .*ckpt-dir"):
        cp.save_sync(src)
    assert store.versions() == []  # no payload.tar, not even an empty version prefix
    assert store.checkpoint(1).load_sync() is None
    assert cp.save_sync(b"next save").name == "a00000.s000001"


def test_failed_write_leaves_no_partial_object(store: Store) -> None:
    """DurableStore.open_write: a block that raises leaves no object, on a local disk as on object stores."""
    raw = store.raw()
    with pytest.raises(RuntimeError, match="writer died"), raw.open_write("a00000.s000001/payload") as writer:
        writer.write(os.urandom(100_000))
        raise RuntimeError("writer died")
    assert not store.exists("a00000.s000001/payload")
    assert store.versions() == []


def test_a_discarded_upload_is_not_finished_by_the_garbage_collector(
    s3_bucket: tuple[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted S3 upload must be closed: else its __del__ tries to upload the buffer discard() dropped."""
    import gc

    uri, options = s3_bucket
    unraisable: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    )

    def fail_a_write() -> None:
        with DurableStore(uri, options).open_write("a00000.s000001/payload") as writer:
            writer.write(b"x" * 1000)
            raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        fail_a_write()
    gc.collect()
    assert unraisable == []
    assert Store("s3", uri, options).versions() == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempt": -1}, "attempt=-1"),
        ({"attempt": 100000}, "attempt=100000"),
        ({"attempt": True}, "attempt=True"),
        ({"attempt": 1.0}, "attempt=1.0"),
        ({"attempt": "1"}, "attempt='1'"),
        ({"keep": 0}, "keep=0"),
        ({"keep": -3}, "keep=-3"),
        ({"keep": True}, "keep=True"),
        ({"keep": 2.0}, "keep=2.0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Checkpoint(tmp_path.as_uri(), **kwargs)


@pytest.mark.parametrize("uri", ["", None, 42])
def test_bad_uri(uri: object) -> None:
    with pytest.raises(ValueError, match="not accepted"):
        Checkpoint(uri, attempt=0)  # type: ignore[arg-type]


def test_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nosuchproto"):
        Checkpoint("nosuchproto://bucket/prefix")


def test_ctx_checkpoint_outside_a_run(monkeypatch: pytest.MonkeyPatch, stalwart_home: Path) -> None:
    for name in (
        config.RUN_ID_ENV,
        config.ATTEMPT_ENV,
        config.MAX_ATTEMPTS_ENV,
        config.TASK_ENV,
        config.CHECKPOINT_URI_ENV,
        config.CHECKPOINT_PATH_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    context = stalwart.ctx()
    assert context.in_task is False
    with pytest.raises(RuntimeError, match=r"ctx\(\)\.checkpoint exists only inside a task"):
        _ = context.checkpoint


def test_ctx_checkpoint_inside_a_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stalwart_home: Path
) -> None:
    uri = (tmp_path / "store").as_uri()
    Checkpoint(uri, attempt=0).save_sync(b"from attempt 0")
    monkeypatch.setenv(config.RUN_ID_ENV, "run-ctx-test")
    monkeypatch.setenv(config.ATTEMPT_ENV, "1")
    monkeypatch.setenv(config.CHECKPOINT_URI_ENV, uri)
    monkeypatch.setenv(config.CHECKPOINT_PATH_ENV, str(tmp_path / "attempt-1"))
    cp = stalwart.ctx().checkpoint
    assert cp.attempt == 1 and cp.path == tmp_path / "attempt-1"
    assert stalwart.ctx().checkpoint is cp
    assert cp.load_sync().read_bytes() == b"from attempt 0"


# --------------------------------------------------------------------------------------------------------
# 8. async API
# --------------------------------------------------------------------------------------------------------


def test_async_save_and_load(store: Store, tmp_path: Path) -> None:
    info = asyncio.run(store.checkpoint(0).save(b"x"))
    assert isinstance(info, CheckpointInfo) and info.size == 1

    cp2 = store.checkpoint(1, path=tmp_path / "restore")
    restored = asyncio.run(cp2.load())
    assert restored == tmp_path / "restore" / "payload" and restored.read_bytes() == b"x"


def test_async_load_nothing(store: Store, tmp_path: Path) -> None:
    assert asyncio.run(store.checkpoint(1, path=tmp_path / "restore").load()) is None


def test_async_saves_inside_a_running_loop(store: Store, tmp_path: Path) -> None:
    async def main() -> list[CheckpointInfo]:
        cp = store.checkpoint(0, keep=5)
        return [await cp.save(f"step {i}".encode()) for i in range(3)]

    infos = asyncio.run(main())
    assert [i.seq for i in infos] == [1, 2, 3]
    assert load_bytes(store, 1, tmp_path / "restore") == b"step 2"


# --------------------------------------------------------------------------------------------------------
# Short writes: a raw file's write() may write less than it was given
# --------------------------------------------------------------------------------------------------------


class _ShortWriteFile(io.FileIO):
    """A regular file whose write() writes at most 1 MiB per call.

    Linux does the same at 0x7ffff000 bytes (2 GiB - 4 KiB) per write(2), and FileIO.write is one write(2):
    ``open(path, "wb", buffering=0).write(memoryview(bytearray(2**31 + 2**20)))`` returns 2147479552.
    torch.save hands each tensor storage to write() in one call, so a tensor over 2 GiB gets here.
    """

    LIMIT = 2**20

    def write(self, data) -> int:  # type: ignore[override]
        return super().write(memoryview(data).cast("B")[: self.LIMIT])


def _short_write_open(file, mode="r", buffering=-1, *args, **kwargs):
    if mode == "wb" and buffering == 0:
        return _ShortWriteFile(file, "wb")
    return open(file, mode, buffering, *args, **kwargs)


def test_short_writes_on_local_files_are_completed(
    tmp_path: Path, stalwart_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "open", _short_write_open, raising=False)
    uri = (tmp_path / "store").as_uri()
    state = {"w": torch.arange(2**20, dtype=torch.float32)}  # one 4 MiB storage, written in one call
    blob = os.urandom(3 * 2**20)
    cp0 = Checkpoint(uri, attempt=0)
    for info in (cp0.save_sync(blob), cp0.save_sync(state)):  # 8 MiB chunks for bytes; one call per storage
        assert (tmp_path / "store" / info.name / "payload").stat().st_size == info.size, info.kind

    cp1 = Checkpoint(uri, attempt=1, path=tmp_path / "restore")
    loaded = cp1.load_object()
    assert loaded is not None and torch.equal(loaded["w"], state["w"])
