from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from stalwart.checkpoint.latest import latest_checkpoint

T0 = 1_700_000_000


def _touch(path: Path, mtime: float, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def _step(path: Path) -> int:
    match = re.fullmatch(r"step=(\d+)\.ckpt", path.name)
    assert match, path
    return int(match.group(1))


def test_newest_by_mtime(tmp_path: Path) -> None:
    _touch(tmp_path / "a.ckpt", T0 + 30)
    newest = _touch(tmp_path / "b.ckpt", T0 + 50)
    _touch(tmp_path / "c.ckpt", T0 + 10)
    assert latest_checkpoint(tmp_path) == newest
    os.utime(tmp_path / "c.ckpt", (T0 + 99, T0 + 99))
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "c.ckpt"


def test_mtime_tie_broken_by_path_name(tmp_path: Path) -> None:
    for name in ("b.ckpt", "a.ckpt", "sub/0.ckpt", "c.ckpt"):
        _touch(tmp_path / name, T0)
    assert latest_checkpoint(tmp_path) == tmp_path / "sub" / "0.ckpt"
    assert latest_checkpoint(tmp_path, "*.ckpt") == tmp_path / "c.ckpt"


def test_key_overrides_mtime(tmp_path: Path) -> None:
    _touch(tmp_path / "step=9.ckpt", T0 + 100)  # newest on disk, but lexically and numerically not the max
    _touch(tmp_path / "step=12.ckpt", T0)
    _touch(tmp_path / "step=100.ckpt", T0 - 100)
    assert latest_checkpoint(tmp_path) == tmp_path / "step=9.ckpt"
    assert latest_checkpoint(tmp_path, key=_step) == tmp_path / "step=100.ckpt"


def test_key_ties_are_deterministic(tmp_path: Path) -> None:
    for name in ("x/step=5.ckpt", "a/step=5.ckpt", "m/step=5.ckpt", "step=1.ckpt"):
        _touch(tmp_path / name, T0)
    assert latest_checkpoint(tmp_path, key=_step) == tmp_path / "x" / "step=5.ckpt"


def test_nested_directories_and_recursive_glob(tmp_path: Path) -> None:
    _touch(tmp_path / "top.ckpt", T0)
    deep = _touch(tmp_path / "run1" / "epoch3" / "deep.ckpt", T0 + 5)
    _touch(tmp_path / "run1" / "notes.txt", T0 + 100)
    assert latest_checkpoint(tmp_path) == deep
    assert latest_checkpoint(tmp_path, "*.ckpt") == tmp_path / "top.ckpt"  # non-recursive
    assert latest_checkpoint(tmp_path, "run1/*/*.ckpt") == deep
    assert latest_checkpoint(tmp_path, "**/*.txt") == tmp_path / "run1" / "notes.txt"


def test_directories_never_match(tmp_path: Path) -> None:
    file_ckpt = _touch(tmp_path / "real.ckpt", T0)
    (tmp_path / "x.ckpt").mkdir()
    os.utime(tmp_path / "x.ckpt", (T0 + 100, T0 + 100))
    assert latest_checkpoint(tmp_path) == file_ckpt
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "dir.ckpt").mkdir()
    assert latest_checkpoint(tmp_path / "only") is None


def test_symlinked_file_counts_dangling_symlink_ignored(tmp_path: Path) -> None:
    target = _touch(tmp_path / "store" / "data.bin", T0 + 10)
    os.symlink(target, tmp_path / "linked.ckpt")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.ckpt")
    _touch(tmp_path / "old.ckpt", T0)
    assert latest_checkpoint(tmp_path, "*.ckpt") == tmp_path / "linked.ckpt"


def test_missing_root_and_no_match(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "does-not-exist") is None
    assert latest_checkpoint(tmp_path) is None  # empty
    _touch(tmp_path / "model.pt", T0)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "model.pt") is None  # root is a file


def test_key_receives_paths(tmp_path: Path) -> None:
    _touch(tmp_path / "a.ckpt", T0, b"12345")
    _touch(tmp_path / "b.ckpt", T0 + 9, b"1")
    seen: list[Path] = []

    def by_size(path: Path) -> int:
        seen.append(path)
        return path.stat().st_size

    assert latest_checkpoint(tmp_path, key=by_size) == tmp_path / "a.ckpt"
    assert sorted(seen) == [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]


@pytest.mark.parametrize("root", [None, 3, b"/tmp", ["/tmp"]])
def test_bad_root_type(root: object) -> None:
    with pytest.raises(TypeError, match=r"root must be a str or os\.PathLike"):
        latest_checkpoint(root)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pattern", ["", "   ", "/abs/*.ckpt", "/", "C:\\ckpt\\*.ckpt", "~/x.ckpt", "../*.ckpt", "a/../../*.ckpt"]
)
def test_bad_pattern_value(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ValueError, match="relative to root, such as"):
        latest_checkpoint(tmp_path, pattern)


def test_bad_pattern_and_key_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="glob_pattern must be a string"):
        latest_checkpoint(tmp_path, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a callable"):
        latest_checkpoint(tmp_path, key="mtime")  # type: ignore[arg-type]


def test_validation_happens_even_if_root_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        latest_checkpoint(tmp_path / "missing", "/etc/*.ckpt")
