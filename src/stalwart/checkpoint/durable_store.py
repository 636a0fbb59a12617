"""A durable store: a prefix on any fsspec filesystem, with data-first, commit-marker-last writes.

Object stores have no rename (DESIGN decision 7), so a checkpoint is a set of data objects plus a
small commit marker written after them; readers look only at prefixes whose marker exists. On a local
filesystem the marker is written to a temporary name, fsynced and renamed, so it is atomic there too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..atomic import write_atomic

__all__ = ["DurableStore", "HashingWriter"]

CHUNK = 8 * 2**20


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._on_bytes = on_bytes

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(
            view
        ):  # an unbuffered file may take fewer bytes than offered (2 GiB per call on Linux)
            written = self.raw.write(view[done:])
            done += len(view) - done if written is None else written
        self.sha256.update(view)
        self.size += len(view)
        if self._on_bytes:
            self._on_bytes(len(view))
        return len(view)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.raw.flush()


class DurableStore:
    """Read and write objects under one fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``...)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(
                f"store URL {url!r} is not accepted; use an fsspec URL such as 's3://bucket/prefix'"
            )
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot open checkpoint store {url!r}: {exc}") from exc
        self.url = url
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols

    def path(self, *parts: str) -> str:
        for part in parts:
            if not part or part.startswith("/") or ".." in part.split("/"):
                raise ValueError(f"object name {part!r} would leave the store's prefix")
        return "/".join([self.root.rstrip("/"), *parts])

    # writes

    @contextlib.contextmanager
    def open_write(self, name: str, on_bytes: Callable[[int], None] | None = None) -> Iterator[HashingWriter]:
        """Write one data object; its size and sha256 are on the writer when the block ends."""
        path = self.path(name)
        if self.local:
            parent = Path(path).parent
            created = not parent.exists()
            parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "wb", buffering=0) as raw:
                    writer = HashingWriter(raw, on_bytes)
                    yield writer
                    os.fsync(raw.fileno())
            except BaseException:  # a failed write leaves no torn object behind, as on object stores
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    if created:
                        parent.rmdir()
                raise
        else:
            raw = self.fs.open(path, "wb")
            try:
                writer = HashingWriter(raw, on_bytes)
                yield writer
            except BaseException:
                if hasattr(raw, "discard"):  # abort a multipart upload instead of completing a torn object
                    raw.discard()
                    # discarded, so closed: otherwise the file's __del__ would close it, i.e. upload
                    # from the buffer discard() dropped (s3fs then raises in the garbage collector)
                    raw.closed = True
                raise
            raw.close()

    def commit(self, name: str, data: bytes) -> None:
        """Write a commit marker atomically: whole or absent, never partial."""
        path = self.path(name)
        if self.local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, data, fsync=True)
            _fsync_dir(target.parent)
        else:
            self.fs.pipe_file(path, data)

    def abort_uploads(self, match: Callable[[str], bool]) -> int:
        """Abort open multipart uploads whose object name (relative to the store's root) ``match``es: what
        an upload killed half-way leaves on S3, billed until aborted. Other filesystems have none: 0."""
        if not (hasattr(self.fs, "call_s3") and hasattr(self.fs, "abort_mpu")):
            return 0
        bucket, key, _ = self.fs.split_path(self.root)
        prefix = f"{key.rstrip('/')}/" if key else ""
        query: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        aborted = 0
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **query)
            for upload in page.get("Uploads") or []:
                if upload["Key"].startswith(prefix) and match(upload["Key"][len(prefix) :]):
                    self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            query.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(name), recursive=True)

    # reads

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self.path(name), "rb") as fh:
            yield fh

    def children(self, prefix: str = "") -> list[str]:
        """Names of the entries directly under ``prefix`` (fresh listing, no cache)."""
        base = self.path(prefix) if prefix else self.root
        self.fs.invalidate_cache()  # s3fs drops only the given path's own listing otherwise
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the store's root) of objects matching ``pattern`` (fresh listing)."""
        self.fs.invalidate_cache()
        root = self.root.rstrip("/") + "/"
        found = self.fs.glob(root + pattern)
        return sorted(p[len(root) :] for p in found if p.startswith(root))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
