"""Round trips of bytes, files, directories and objects, which version is "previous", and the
async API, on file:// and on S3 (moto).

Versions are written exactly as ``stalwart.checkpoint.task`` documents them; where a test needs a state
the API cannot produce it writes the objects directly through ``DurableStore`` (``checkpoint_stores``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_stores import (
    SRC,
    Store,
    assert_state_equal,
    build_tree,
    load_bytes,
    restored_entries,
    snapshot,
    tensor_state,
)

from stalwart.checkpoint.task import Checkpoint, CheckpointInfo

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


def test_directory_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ckpt-dir"
    build_tree(src)
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
    build_tree(src)
    store.checkpoint(0).save_sync(src)
    target = tmp_path / "restore"
    (target / "leftover-from-elsewhere").mkdir(parents=True)
    (target / "stale.txt").write_text("old")

    restored = store.checkpoint(1, path=target).load_sync()
    assert snapshot(restored) == snapshot(src)


def test_tensor_dict_round_trip(store: Store, tmp_path: Path) -> None:
    state = tensor_state()
    info = store.checkpoint(0).save_sync(state)
    assert (info.kind, info.encoding) == ("object", "torch")

    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert_state_equal(cp.load_object(), state)  # weights_only=True by default
    # the seed's pattern: a plain torch.load on the restored payload
    assert_state_equal(torch.load(cp.load_sync(), weights_only=True), state)


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
