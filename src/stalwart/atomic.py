"""A file written whole or not at all: the bytes go to a scratch file beside it, which is renamed over
it once complete (and removed if the write fails). A reader, or a process restarted after a crash,
sees the old file or the new one, never part of one. ``fsync`` makes the new bytes survive a machine
crash too, for files that vouch for others (commit markers).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["replacing", "write_atomic"]


@contextlib.contextmanager
def replacing(path: Path, *, fsync: bool = False, scratch: Path | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` when the block ends
    without an exception. ``scratch``: where to write first (default: a hidden ``.tmp`` beside it)."""
    tmp = scratch or path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, *, fsync: bool = False, scratch: Path | None = None) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8), whole or not at all."""
    with replacing(path, fsync=fsync, scratch=scratch) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
