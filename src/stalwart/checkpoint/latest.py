"""Find the checkpoint a retried task should resume from."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["latest_checkpoint"]


def _check_pattern(glob_pattern: object) -> str:
    accepted = "a non-empty glob relative to root, such as '**/*.ckpt' or 'step=*.ckpt'"
    if not isinstance(glob_pattern, str):
        raise TypeError(f"glob_pattern must be a string ({accepted}), got {type(glob_pattern).__name__}")
    if not glob_pattern.strip():
        raise ValueError(f"glob_pattern must be {accepted}, got an empty pattern")
    if (
        PurePosixPath(glob_pattern).is_absolute()
        or PureWindowsPath(glob_pattern).anchor
        or glob_pattern.startswith("~")
    ):
        raise ValueError(f"glob_pattern must be {accepted}, got the absolute pattern {glob_pattern!r}")
    if ".." in PurePosixPath(glob_pattern.replace("\\", "/")).parts:
        raise ValueError(
            f"glob_pattern must be {accepted} that stays under root, got {glob_pattern!r} with '..'"
        )
    return glob_pattern


def latest_checkpoint(
    root: str | os.PathLike[str],
    glob_pattern: str = "**/*.ckpt",
    key: Callable[[Path], Any] | None = None,
) -> Path | None:
    """Return the newest file under ``root`` matching ``glob_pattern``, or None if there is none.

    "Newest" is the latest modification time, ties broken by the greater path name so every process picks
    the same file; with ``key`` it is the file with the largest ``key(path)`` instead (ties broken the same
    way), e.g. a step number parsed from the name, which survives copies that reset mtimes. Directories never
    match, and files deleted while scanning (a concurrent checkpoint rotation) are skipped. ``**`` matches
    any number of directories. Returns None when ``root`` does not exist.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or os.PathLike, got {type(root).__name__}")
    pattern = _check_pattern(glob_pattern)
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable taking a Path, got {type(key).__name__}")
    root_path = Path(root)
    if not root_path.is_dir():
        return None

    best: Path | None = None
    best_rank: Any = None
    for path in sorted(root_path.glob(pattern), key=str):
        try:
            st = path.stat()
        except OSError:  # vanished between listing and stat, or a dangling symlink
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        rank = (st.st_mtime_ns, str(path)) if key is None else key(path)
        # Paths arrive in ascending order, so ">=" makes the greater path win a tie of key values.
        if best is None or not rank < best_rank:
            best, best_rank = path, rank
    return best
