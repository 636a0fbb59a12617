"""Tar archives for directory checkpoints.

A checkpoint that is a directory (for example a sharded state dict) is shipped to object storage as one
uncompressed PAX tar: a single object is atomic to upload and cheap to list. Checkpoints may come back from
shared buckets, so extraction treats the archive as untrusted and validates every member *before* writing
anything: a refused archive leaves the destination untouched, and what is written is bounded by the
archive's own size (no sparse members, no compression).
"""

from __future__ import annotations

import copy
import errno
import os
import posixpath
import re
import shutil
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..atomic import replacing

__all__ = ["DirectoryScan", "UnsafeArchiveError", "pack_directory", "safe_extract", "scan_directory"]

# Same bound as Linux's MAXSYMLINKS: deeper chains are treated as loops.
_MAX_SYMLINK_HOPS = 40
# Only permission bits survive; setuid/setgid/sticky are dropped on extraction.
_MODE_MASK = 0o777
# PEP 706 extraction filters: Python 3.12+, and backported to security releases of 3.8-3.11.
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")


class UnsafeArchiveError(ValueError):
    """An archive is refused: a member would write outside the destination, create something that is not
    plain data, or declare more data than the archive holds; or the archive cannot be read as a plain tar."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"refusing to extract archive member {member!r}: {reason}")
        self.member = member
        self.reason = reason


# --------------------------------------------------------------------------------------------------------
# Shared path logic: a symlink resolver over a virtual tree, so packing and extraction agree on "inside".
# --------------------------------------------------------------------------------------------------------


def _resolve_inside(
    parts: list[str], links: Mapping[str, str], disk_root: Path | None = None
) -> list[str] | None:
    """Resolve ``parts`` (relative to the tree root) the way the kernel would, following ``links``.

    ``links`` maps relative POSIX paths to symlink targets; when ``disk_root`` is given, symlinks that already
    exist there are followed too. Returns the resolved components, or None if resolution leaves the root,
    hits an absolute target, or loops.
    """
    stack: list[str] = []
    pending = list(parts)
    hops = 0
    while pending:
        comp = pending.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(comp)
        key = "/".join(stack)
        target = links.get(key)
        if target is None and disk_root is not None and os.path.islink(disk_root / key):
            target = os.readlink(disk_root / key)
        if target is None:
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS or _is_absolute(target):
            return None
        stack.pop()
        pending[:0] = target.split("/")
    return stack


def _is_absolute(name: str) -> bool:
    # Reject POSIX roots and Windows drive/UNC forms alike: archives travel between machines.
    return name.startswith(("/", "\\")) or os.path.isabs(name) or _WINDOWS_DRIVE.match(name) is not None


def _lexically_inside(parent: list[str], target: str) -> bool:
    norm = posixpath.normpath(posixpath.join(*parent, target) if parent else target)
    return norm != ".." and not norm.startswith("../")


# --------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------


def _walk_sorted(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Pre-order walk (directory before its contents), entries sorted by name, symlinks not followed."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        relname = f"{rel}/{entry.name}" if rel else entry.name
        yield relname, entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(root, relname)


@dataclass(frozen=True)
class DirectoryScan:
    """A directory tree checked by :func:`scan_directory`, ready for :func:`pack_directory`."""

    src: Path
    entries: list[tuple[str, os.DirEntry[str]]]
    file_bytes: int  # sum of the regular files' sizes


def scan_directory(src: Path) -> DirectoryScan:
    """Walk ``src`` and check that it can be archived, raising ValueError before anything is written.

    Symlinks are accepted only if they resolve inside ``src``; devices, FIFOs and sockets are refused,
    as :func:`safe_extract` would refuse them.
    """
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"pack_directory: source {src} is not a directory")
    entries = list(_walk_sorted(src))
    links = {rel: os.readlink(entry.path) for rel, entry in entries if entry.is_symlink()}
    file_bytes = 0
    for rel, entry in entries:
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = links[rel]
            parent = rel.split("/")[:-1]
            if (
                _is_absolute(target)
                or not _lexically_inside(parent, target)
                or _resolve_inside([*parent, *target.split("/")], links) is None
            ):
                raise ValueError(
                    f"pack_directory: symlink {src / rel} -> {target!r} points outside {src}; "
                    "only relative links that stay inside the directory can be archived"
                )
        elif stat.S_ISREG(mode):
            file_bytes += st.st_size
        elif not stat.S_ISDIR(mode):
            raise ValueError(
                f"pack_directory: {src / rel} is not a regular file, directory or symlink "
                f"(mode {stat.filemode(mode)}); it cannot be archived"
            )
    return DirectoryScan(src, entries, file_bytes)


def pack_directory(src: Path, dest: Path | BinaryIO, *, scan: DirectoryScan | None = None) -> int:
    """Write the contents of ``src`` to ``dest`` as an uncompressed PAX tar and return its size in bytes.

    ``dest`` is a path, or a writable binary file object that receives the archive as a stream (how a
    checkpoint uploads a directory without a temporary copy). ``scan``, from :func:`scan_directory`,
    lets a caller check the tree before it opens ``dest``.

    Members are named relative to ``src`` and written in sorted pre-order with ownership normalised, so the
    same tree always gives the same member list. Symlinks are kept only if they resolve inside ``src``;
    anything that :func:`safe_extract` would refuse (escaping symlinks, devices, FIFOs, sockets) raises
    ValueError here instead of producing an archive that cannot be restored. File data is streamed, and the
    archive is written to a temporary file that replaces ``dest`` only once complete.
    """
    src = Path(src)
    writer = None if isinstance(dest, (str, os.PathLike)) else dest
    if not src.is_dir():
        raise NotADirectoryError(f"pack_directory: source {src} is not a directory")
    if writer is None:
        dest = Path(dest)  # type: ignore[arg-type]
        src_real, dest_real = src.resolve(), dest.resolve()
        if dest_real == src_real or src_real in dest_real.parents:
            raise ValueError(f"pack_directory: destination {dest} is inside the source directory {src}")

    # Collect and validate everything first so a bad tree fails before any byte is written.
    if scan is None:
        scan = scan_directory(src)
    elif scan.src != src:
        raise ValueError(f"pack_directory: the scan given is of {scan.src}, not of {src}")
    entries = scan.entries

    if writer is not None:
        counted = _CountingWriter(writer)
        with tarfile.open(fileobj=counted, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            _add_entries(tar, src, entries)
        return counted.size
    assert isinstance(dest, Path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        replacing(dest, fsync=True) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add_entries(tar, src, entries)
    return dest.stat().st_size


class _CountingWriter:
    """Counts the bytes tarfile's stream mode writes into a caller's file object."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.size = raw, 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.size += len(data)
        return len(data)


def _add_entries(tar: tarfile.TarFile, src: Path, entries: list[tuple[str, os.DirEntry[str]]]) -> None:
    for rel, entry in entries:
        info = tar.gettarinfo(entry.path, arcname=rel)
        if info is None:  # pragma: no cover - type changed since validation (e.g. now a socket)
            raise ValueError(f"pack_directory: {src / rel} cannot be archived")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if info.isreg():
            with open(entry.path, "rb") as fh:
                tar.addfile(info, fh)
        else:
            tar.addfile(info)


# --------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------


class _NoChownTarFile(tarfile.TarFile):
    """Never restore ownership from the archive, even when running as root."""

    def chown(self, *args: object, **kwargs: object) -> None:
        return None


def _member_parts(member: tarfile.TarInfo) -> list[str]:
    name = member.name
    if "\x00" in name or "\x00" in member.linkname:
        raise UnsafeArchiveError(name, "NUL byte in member name or link target")
    if _is_absolute(name):
        raise UnsafeArchiveError(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(name, "path contains a '..' component")
    if not parts and not member.isdir():
        raise UnsafeArchiveError(name, "empty member name")
    return parts


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(member.name, "device file")
    if member.isfifo():
        raise UnsafeArchiveError(member.name, "FIFO")
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isreg():
        return "file"
    raise UnsafeArchiveError(member.name, f"unsupported member type {member.type!r}")


def _validate(members: list[tarfile.TarInfo], dest: Path) -> list[tarfile.TarInfo]:
    """Check every member against ``dest``; return sanitised copies ready for extraction."""
    parsed: list[tuple[tarfile.TarInfo, list[str], str]] = []
    kinds: dict[str, str] = {}
    links: dict[str, str] = {}
    for member in members:
        parts = _member_parts(member)
        kind = _member_kind(member)
        key = "/".join(parts)
        if key in kinds and not (kind == "dir" and kinds[key] == "dir"):
            raise UnsafeArchiveError(member.name, "duplicate member name")
        kinds[key] = kind
        if kind == "symlink":
            links[key] = member.linkname
        parsed.append((member, parts, kind))

    seen_files: set[str] = set()
    sanitised = []
    for member, parts, kind in parsed:
        name = member.name
        key = "/".join(parts)
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links or os.path.islink(dest / prefix):
                raise UnsafeArchiveError(name, f"path goes through the symlink {prefix!r}")
            if kinds.get(prefix, "dir") != "dir":
                raise UnsafeArchiveError(name, f"parent {prefix!r} is not a directory in the archive")
        on_disk = dest / key if parts else dest
        if parts and os.path.islink(on_disk):
            raise UnsafeArchiveError(name, f"would replace the existing symlink {on_disk}")
        if kind == "dir" and on_disk.exists() and not on_disk.is_dir():
            raise UnsafeArchiveError(name, f"{on_disk} exists and is not a directory")
        if kind != "dir" and on_disk.is_dir():
            raise UnsafeArchiveError(name, f"{on_disk} exists and is a directory")

        if kind == "symlink":
            target = member.linkname
            if not target:
                raise UnsafeArchiveError(name, "symlink with an empty target")
            if _is_absolute(target):
                raise UnsafeArchiveError(name, f"symlink to absolute path {target!r}")
            parent = parts[:-1]
            if (
                not _lexically_inside(parent, target)
                or _resolve_inside([*parent, *target.split("/")], links, dest) is None
            ):
                raise UnsafeArchiveError(name, f"symlink target {target!r} resolves outside the destination")
        elif kind == "hardlink":
            target = member.linkname
            if _is_absolute(target):
                raise UnsafeArchiveError(name, f"hardlink to absolute path {target!r}")
            target_parts = [p for p in target.split("/") if p not in ("", ".")]
            if ".." in target_parts:
                raise UnsafeArchiveError(name, f"hardlink target {target!r} contains a '..' component")
            if "/".join(target_parts) not in seen_files:
                raise UnsafeArchiveError(
                    name, f"hardlink target {target!r} is not a regular file earlier in the archive"
                )
        if kind == "file":
            seen_files.add(key)

        if _HAS_DATA_FILTER:
            # Belt and braces: the stdlib's own policy must agree before anything is written.
            try:
                tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(name, f"rejected by tarfile's data filter: {exc}") from exc

        clean = copy.copy(member)
        clean.mode = member.mode & _MODE_MASK
        clean.uid = clean.gid = 0
        clean.uname = clean.gname = ""
        sanitised.append(clean)
    return sanitised


def _data_filter_keep_mode(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """The stdlib 'data' filter, but keeping the (already sanitised) permission bits it would widen/drop."""
    filtered = tarfile.data_filter(member, path)
    if member.issym():
        return filtered
    return filtered.replace(mode=member.mode, deep=False)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` (created if missing), refusing anything that is not plain data.

    Every member is validated before the first write, so a refused archive extracts nothing. Refused with
    :class:`UnsafeArchiveError`: compressed archives (checkpoints are uncompressed tars; compressed data can
    expand without bound), unreadable headers, sparse members, members declaring more data than the
    archive holds after their header, absolute names, ``..`` components, members reached through a
    symlink, symlinks or hardlinks resolving outside ``dest``, devices and FIFOs. So the bytes written are
    bounded by the archive's own size; if they would not fit in the free space under ``dest``, OSError
    (ENOSPC) is raised, again before anything is written. File modes (minus setuid, setgid and sticky bits)
    and mtimes are preserved; ownership is not restored. Where the stdlib provides it, the 'data'
    extraction filter runs as an additional check (keeping the validated modes).
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    with open(archive, "rb") as fh:
        head = fh.read(8)
        archive_size = os.fstat(fh.fileno()).st_size
    for magic, codec in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise UnsafeArchiveError(
                archive.name,
                f"{codec}-compressed archive; checkpoint archives are uncompressed tars, whose members "
                "cannot declare more bytes than the archive holds",
            )
    try:
        with _NoChownTarFile.open(archive, mode="r:", errorlevel=2) as tar:
            members, needed = _read_members(tar, archive_size)
            members = _validate(members, dest)
            free = shutil.disk_usage(dest).free
            if needed > free:
                raise OSError(
                    errno.ENOSPC,
                    f"extracting {archive} needs about {needed} bytes under {dest}, but only {free} bytes "
                    "are free there; nothing was extracted",
                )
            if _HAS_DATA_FILTER:
                tar.extractall(dest, members=members, filter=_data_filter_keep_mode)
            else:  # Python builds without the PEP 706 backport: our checks above are the only ones.
                tar.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(archive.name, f"unreadable tar archive ({exc})") from exc


# Magic numbers of the compressions tarfile (and tar) would otherwise decode transparently.
_COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
)
# Space a file or directory takes beyond its data, for the free-space check (one filesystem block).
_BLOCK = 4096


def _read_members(tar: tarfile.TarFile, archive_size: int) -> tuple[list[tarfile.TarInfo], int]:
    """The members, each checked as it is read, and about how many bytes extracting them writes.

    In an uncompressed tar every byte of a regular member's data is stored after its header, so an honest
    member ends within the archive; as members' data follow one another, their sizes then add up to less
    than the archive's size too. Sparse members are the exception: they declare a size their stored data
    does not cover (a 1 TiB member can take a few blocks), and checkpoints never contain them. Checking
    each member before reading the next names the member whose declared size runs past the end.
    """
    members, needed = [], 0
    while (member := tar.next()) is not None:
        if member.issparse():
            raise UnsafeArchiveError(
                member.name, f"sparse member declaring {member.size} bytes; checkpoints hold no sparse files"
            )
        if member.isreg():
            stored = max(0, archive_size - member.offset_data)
            if member.size > stored:
                raise UnsafeArchiveError(
                    member.name,
                    f"declares {member.size} bytes, but the {archive_size}-byte archive holds at most "
                    f"{stored} bytes after its header",
                )
            needed += -(-member.size // _BLOCK) * _BLOCK
        needed += _BLOCK
        members.append(member)
    return members, needed
