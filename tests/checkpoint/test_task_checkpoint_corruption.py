"""A corrupt, missing or hostile version is detected, never loaded: the load falls back to an older
one or says why none can be used.

Versions are written exactly as ``stalwart.checkpoint.task`` documents them; where a test needs a state
the API cannot produce it writes the objects directly through ``DurableStore`` (``checkpoint_stores``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from checkpoint_stores import (
    LOGGER,
    Store,
    assert_state_equal,
    build_tree,
    commit_marker,
    load_bytes,
    restored_entries,
    snapshot,
    tensor_state,
    warnings_of,
)

from stalwart.checkpoint.archive import UnsafeArchiveError
from stalwart.checkpoint.task import CorruptCheckpointError

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
    state = tensor_state()
    cp0 = store.checkpoint(0)
    cp0.save_sync(state)
    newer = cp0.save_sync({"model": torch.nn.Linear(4, 3).state_dict(), "epoch": 4})
    name = f"{newer.name}/payload"
    store.put(name, _flip_one_byte(store.get(name)))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    cp = store.checkpoint(1, path=tmp_path / "restore")
    assert_state_equal(cp.load_object(), state)
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
    build_tree(older)
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
    build_tree(older)
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
