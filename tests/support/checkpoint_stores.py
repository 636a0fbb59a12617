"""The checkpoint tests' stores (file:// and moto S3) and the helpers that forge states the API cannot
produce (an uncommitted save, a corrupt payload): used by tests/checkpoint/test_task_checkpoint_*.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import stalwart
from stalwart.checkpoint.durable_store import DurableStore
from stalwart.checkpoint.restore import BOOKKEEPING
from stalwart.checkpoint.task import Checkpoint, CheckpointInfo

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


def build_tree(root: Path) -> None:
    (root / "shards" / "rank0").mkdir(parents=True)
    (root / "shards" / "rank1" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "shards" / "rank1" / "empty-too").mkdir()
    (root / "meta.json").write_text('{"step": 12}')
    (root / "shards" / "rank0" / "model.bin").write_bytes(bytes(range(256)) * 64 + b"\x00\xff")
    (root / "shards" / "rank1" / "deeper" / "optim.bin").write_bytes(os.urandom(4099))
    (root / "shards" / "rank1" / "zero-length").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 * 2**20))


def tensor_state() -> dict:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 3).state_dict(), "epoch": 3}


def assert_state_equal(loaded: dict, state: dict) -> None:
    assert set(loaded) == {"model", "epoch"} and loaded["epoch"] == 3
    assert set(loaded["model"]) == set(state["model"]) == {"weight", "bias"}
    for key, tensor in state["model"].items():
        assert loaded["model"][key].dtype == tensor.dtype
        assert torch.equal(loaded["model"][key], tensor), key
