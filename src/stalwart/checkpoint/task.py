"""The task Checkpoint: what one attempt saves and the next attempt loads, on a durable store.

Layout under the run's checkpoint URI, one version per save::

    a00001.s000003/payload        bytes, a file, or an object (torch.save / pickle)
    a00001.s000003/payload.tar    a directory
    a00001.s000003/COMMIT.json    written last: kind, encoding, size, sha256

Version names sort by (attempt, save), so the previous checkpoint of attempt n is the newest committed
version of any attempt below n, even when attempt n-1 died before it saved anything.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import pickle
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..checks import int_at_least
from ..runtime import events
from .durable_store import CHUNK, DurableStore

__all__ = ["Checkpoint", "CheckpointInfo", "CorruptCheckpointError"]

log = logging.getLogger(__name__)

FORMAT = 1
COMMIT = "COMMIT.json"
_VERSION = re.compile(r"^a(\d{5})\.s(\d{6})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint cannot be loaded: its bytes do not match the size or checksum its commit marker
    recorded, its marker is unreadable, or its archive is refused. ``load_sync`` raises it when
    checkpoints exist but none of them can be loaded; ``skipped`` lists ``(version, reason)``."""

    def __init__(self, message: str, skipped: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped or []


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint version."""

    name: str
    attempt: int
    seq: int
    kind: str  # bytes | file | directory | object
    encoding: str  # raw | tar | torch | pickle
    size: int
    sha256: str
    created: float
    filename: str | None = None

    @property
    def payload(self) -> str:
        return "payload.tar" if self.kind == "directory" else "payload"


class Checkpoint:
    """Save state in one attempt, load it in the next.

    ``save_sync`` accepts bytes, a path to a file or a directory (archived, restored as a directory)
    or any object (``torch.save`` when torch is in use, so ``torch.load(payload)`` works; pickle
    otherwise). ``load_sync`` returns the previous attempts' newest checkpoint as a local path: the
    ``payload`` file, or the restored directory; ``load_object`` returns the object itself.
    """

    def __init__(
        self,
        uri: str,
        *,
        attempt: int = 0,
        path: str | os.PathLike | None = None,
        storage_options: dict | None = None,
        keep: int = 3,
    ) -> None:
        """Args:
        uri: the run's directory in the checkpoint store (an fsspec URL or a path).
        attempt: this attempt's number; versions are named after it, and ``load`` reads those of
            earlier attempts.
        path: where ``load_sync`` puts what it restores; None: a directory of its own.
        storage_options: fsspec options for ``uri`` (an S3 endpoint, credentials).
        keep: committed versions kept per run; older ones are removed after a save.
        """
        int_at_least("attempt", attempt, 0, maximum=99999)
        int_at_least("keep", keep, 1, note=" (versions kept per run)")
        self.store = DurableStore(uri, storage_options)
        self.uri = uri
        self.attempt = attempt
        self.keep = keep
        self._path = Path(path) if path is not None else None
        self._seq: int | None = None
        self._seq_lock = threading.Lock()
        self._restored: tuple[CheckpointInfo, Path] | None = None

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r}, attempt={self.attempt})"

    @property
    def path(self) -> Path:
        """The local directory previous checkpoints are restored into."""
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(prefix="stalwart-checkpoint-"))
        self._path.mkdir(parents=True, exist_ok=True)
        return self._path

    # listing

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed versions, oldest first."""
        return self._scan()[0]

    def _scan(self) -> tuple[builtins.list[CheckpointInfo], builtins.list[tuple[str, str]]]:
        """Committed versions, oldest first, and (version, why) of those whose marker is unreadable."""
        infos, unreadable = [], []
        for name in self.store.glob(f"*/{COMMIT}"):
            version = name.split("/", 1)[0]
            if not _VERSION.match(version):
                continue
            try:
                infos.append(_parse_marker(version, self.store.read_bytes(name)))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "ignoring checkpoint %s/%s: unreadable commit marker (%s)", self.uri, version, exc
                )
                unreadable.append((version, f"unreadable commit marker ({exc})"))
        return sorted(infos, key=lambda info: (info.attempt, info.seq)), unreadable

    def previous(self) -> CheckpointInfo | None:
        """The newest version saved by an earlier attempt, or None."""
        earlier = [info for info in self.list() if info.attempt < self.attempt]
        return earlier[-1] if earlier else None

    # saving

    def save_sync(self, data: Any) -> CheckpointInfo:
        """Save a new version; it becomes visible only once whole (commit marker written last)."""
        kind, encoding, filename, total, scan = _classify(data)  # refuses bad input before any write
        version = self._next_version()
        started = time.monotonic()
        from .progress import transfer_progress

        with (
            transfer_progress(f"saving checkpoint {version}", total or 0) as bar,
            self.store.open_write(
                f"{version}/{'payload.tar' if kind == 'directory' else 'payload'}", bar.update
            ) as writer,
        ):
            _write_payload(writer, data, kind, encoding, scan)
        attempt, seq = (int(g) for g in _VERSION.match(version).groups())  # type: ignore[union-attr]
        info = CheckpointInfo(
            name=version,
            attempt=attempt,
            seq=seq,
            kind=kind,
            encoding=encoding,
            size=writer.size,
            sha256=writer.sha256.hexdigest(),
            created=time.time(),
            filename=filename,
        )
        marker = {"format": FORMAT, "info": asdict(info), "host": socket.gethostname(), "pid": os.getpid()}
        self.store.commit(f"{version}/{COMMIT}", json.dumps(marker, indent=1).encode())
        took = time.monotonic() - started
        log.info("saved checkpoint %s/%s (%d bytes in %.2f s)", self.uri, version, info.size, took)
        events.record("checkpoint_save", version=version, bytes=info.size, seconds=round(took, 6))
        self._prune(info)
        return info

    async def save(self, data: Any) -> CheckpointInfo:
        return await asyncio.to_thread(self.save_sync, data)

    def _next_version(self) -> str:
        with self._seq_lock:  # overlapping async saves must never share a version name
            if self._seq is None:
                prefix = f"a{self.attempt:05d}."
                seqs = [
                    int(m.group(2))
                    for n in self.store.children()
                    if (m := _VERSION.match(n)) and n.startswith(prefix)
                ]
                self._seq = max(seqs, default=0)
            self._seq += 1
            return f"a{self.attempt:05d}.s{self._seq:06d}"

    def _prune(self, newest: CheckpointInfo) -> None:
        """Drop versions beyond ``keep`` and leftovers of saves that died before committing.

        Runs after the new version is committed, so the newest committed state is never deleted.
        """
        try:
            committed, unreadable = self._scan()
            kept = committed[-self.keep :]
            doomed = [info.name for info in committed[: -self.keep]]
            # a version whose marker exists but cannot be read is evidence, not a torn save: it goes only
            # once it is older than every version kept, as an old readable one would
            doomed += [name for name, _ in unreadable if len(kept) == self.keep and name < kept[0].name]
            names = {info.name for info in committed} | {name for name, _ in unreadable}
            for name in self.store.children():
                m = _VERSION.match(name)
                if m and name not in names and int(m.group(1)) < self.attempt:
                    doomed.append(name)  # an earlier attempt died mid-save
            for name in doomed:
                if name != newest.name:
                    self.store.remove(name)
        except Exception as exc:  # retention is housekeeping: never fail a save that committed
            log.warning("could not prune old checkpoints under %s: %s", self.uri, exc)

    # loading

    def load_sync(self) -> Path | None:
        """Restore the previous attempts' newest loadable checkpoint; None when there is none.

        Returns ``path / "payload"`` for bytes, files and objects, or ``path / <version>`` holding the
        restored directory. A version whose bytes fail their checksum, or whose archive is refused, is
        skipped with a warning for the next older one; if versions exist but none can be loaded, raises
        CorruptCheckpointError listing each one and why. Safe to call from many processes sharing
        ``path`` at once (the workers of a node): one restores, the others reuse its verified result.
        """
        if self._restored is not None:
            return self._restored[1]
        from .archive import UnsafeArchiveError

        started = time.monotonic()
        infos, unreadable = self._scan()
        candidates = [info for info in infos if info.attempt < self.attempt]
        skipped = [(v, why) for v, why in unreadable if int(v[1:6]) < self.attempt]
        cause: Exception | None = None
        for info in reversed(candidates):
            try:
                restored = self._restore(info)
            except CorruptCheckpointError as exc:
                log.warning("skipping corrupt checkpoint: %s", exc)
                skipped.append((info.name, str(exc)))
                cause = exc
            except UnsafeArchiveError as exc:
                log.warning("skipping refused checkpoint %s/%s: %s", self.uri, info.name, exc)
                skipped.append((info.name, str(exc)))
                cause = exc
            else:
                self._restored = (info, restored)
                took = round(time.monotonic() - started, 6)
                events.record("checkpoint_restore", version=info.name, bytes=info.size, seconds=took)
                return restored
        if skipped:
            listing = "; ".join(f"{version}: {why}" for version, why in sorted(skipped, reverse=True))
            raise CorruptCheckpointError(
                f"{len(skipped)} earlier checkpoint(s) under {self.uri} exist but none can be loaded, so "
                f"this attempt does not start from scratch over them: {listing}. Remove those versions "
                "from the store to start over deliberately",
                skipped,
            ) from cause
        return None

    async def load(self) -> Path | None:
        return await asyncio.to_thread(self.load_sync)

    def load_object(self, *, weights_only: bool = True, **torch_load_kwargs: Any) -> Any:
        """The previous checkpoint as an object: what was saved (bytes for bytes and files, a Path for
        a directory), or None. Objects saved with torch are loaded with ``weights_only`` (default True)."""
        path = self.load_sync()
        if path is None or self._restored is None:
            return None
        info = self._restored[0]
        if info.kind == "directory":
            return path
        if info.encoding == "torch":
            import torch

            return torch.load(path, weights_only=weights_only, **torch_load_kwargs)
        if info.encoding == "pickle":
            with open(path, "rb") as fh:
                return pickle.load(fh)
        return path.read_bytes()

    def _restore(self, info: CheckpointInfo) -> Path:
        from .restore import RestoreArea

        area = RestoreArea(self.path)
        if info.kind != "directory":
            return area.file(info.name, info.sha256, lambda dest: self._download(info, dest))

        def build(dest: Path) -> None:
            from .archive import safe_extract

            archive = area.scratch(".tar")
            try:
                self._download(info, archive)
                safe_extract(archive, dest)
            finally:
                archive.unlink(missing_ok=True)

        return area.directory(info.name, build)

    def _download(self, info: CheckpointInfo, dest: Path) -> None:
        import hashlib

        from .progress import transfer_progress

        digest, size = hashlib.sha256(), 0
        name = f"{info.name}/{info.payload}"
        try:
            with (
                transfer_progress(f"loading checkpoint {info.name}", info.size) as bar,
                self.store.open_read(name) as src,
                open(dest, "wb") as out,
            ):
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{self.uri}/{name} is missing although its commit marker exists"
            ) from None
        if size != info.size or digest.hexdigest() != info.sha256:
            dest.unlink(missing_ok=True)
            raise CorruptCheckpointError(
                f"{self.uri}/{name} holds {size} bytes with sha256 {digest.hexdigest()[:12]}..., "
                f"but its commit marker recorded {info.size} bytes with sha256 {info.sha256[:12]}..."
            )


_KINDS = {"bytes": ("raw",), "file": ("raw",), "directory": ("tar",), "object": ("torch", "pickle")}


def _parse_marker(version: str, raw: bytes) -> CheckpointInfo:
    """The CheckpointInfo in a commit marker of ``version``; ValueError, KeyError or TypeError if none.

    Names from a marker end up in local paths, so the marker must describe the version it sits in.
    """
    info = CheckpointInfo(**json.loads(raw)["info"])
    if info.name != version:
        raise ValueError(f"the marker describes version {info.name!r}")
    if info.encoding not in _KINDS.get(info.kind, ()):
        raise ValueError(f"unknown kind/encoding {info.kind!r}/{info.encoding!r}")
    if not isinstance(info.size, int) or info.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", str(info.sha256)):
        raise ValueError("size or sha256 is malformed")
    return info


def _classify(data: Any) -> tuple[str, str, str | None, int | None, Any]:
    """(kind, encoding, original file name, size if known, directory scan) of what is being saved.

    A directory is checked whole here (links leaving it, devices...), so a refused save writes nothing.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "bytes", "raw", None, memoryview(data).nbytes, None
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            from .archive import scan_directory

            scan = scan_directory(path)
            return "directory", "tar", path.name, scan.file_bytes, scan
        if path.is_file():
            return "file", "raw", path.name, path.stat().st_size, None
        raise FileNotFoundError(
            f"cannot save checkpoint: {str(data)!r} is neither a file nor a directory; pass bytes, a path "
            "to a file or directory, or an object (wrap a plain string, e.g. {'text': s})"
        )
    if "torch" in sys.modules:
        return "object", "torch", None, None, None
    return "object", "pickle", None, None, None


def _write_payload(writer: Any, data: Any, kind: str, encoding: str, scan: Any = None) -> None:
    if kind == "bytes":
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            writer.write(view[start : start + CHUNK])
    elif kind == "file":
        with open(data, "rb") as src:
            while chunk := src.read(CHUNK):
                writer.write(chunk)
    elif kind == "directory":
        from .archive import pack_directory

        pack_directory(Path(data), writer, scan=scan)
    elif encoding == "torch":
        import torch

        torch.save(data, writer)
    else:
        pickle.dump(data, writer, protocol=pickle.HIGHEST_PROTOCOL)
