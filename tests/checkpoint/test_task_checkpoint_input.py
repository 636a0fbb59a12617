"""Bad arguments get clear errors; failed writes leave nothing behind; short writes are completed.

Versions are written exactly as ``stalwart.checkpoint.task`` documents them; where a test needs a state
the API cannot produce it writes the objects directly through ``DurableStore`` (``checkpoint_stores``).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_stores import Store

import stalwart
from stalwart import config
from stalwart.checkpoint import durable_store as store_module
from stalwart.checkpoint.durable_store import DurableStore
from stalwart.checkpoint.task import Checkpoint

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
