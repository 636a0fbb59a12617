from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stalwart.checkpoint import archive
from stalwart.checkpoint.archive import UnsafeArchiveError, pack_directory, safe_extract

BASE_MTIME = 1_700_000_000


def _snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable about a tree: type, bytes/link target, permission bits and mtime."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def _build_tree(src: Path) -> None:
    (src / "nested" / "deep").mkdir(parents=True)
    (src / "nested" / "empty").mkdir()
    (src / "empty_dir").mkdir()
    (src / "a.txt").write_text("hello\n")
    (src / "binary.dat").write_bytes(bytes(range(256)) * 4 + b"\x00\xff\x00")
    (src / "big.bin").write_bytes(os.urandom(5 * 2**20))
    (src / "nested" / "deep" / "weights.pt").write_bytes(b"\x80\x02" + os.urandom(1000))
    run = src / "nested" / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (src / "readonly.txt").write_text("ro")
    (src / "readonly.txt").chmod(0o444)
    os.symlink("nested/deep/weights.pt", src / "latest")
    os.symlink("../a.txt", src / "nested" / "up_to_a")
    os.symlink("nested", src / "dirlink")
    os.link(src / "a.txt", src / "nested" / "hardlink.txt")
    # Distinct, exactly representable mtimes; directories last so creating children does not reset them.
    paths = sorted(src.rglob("*"), key=lambda p: (p.is_dir() and not p.is_symlink(), -len(p.parts)))
    for i, path in enumerate(paths):
        if not path.is_symlink():
            os.utime(path, (BASE_MTIME + i + 0.25, BASE_MTIME + i + 0.25))


def test_round_trip_is_byte_exact(tmp_path: Path) -> None:
    src, dest, tar_path = tmp_path / "src", tmp_path / "out", tmp_path / "ckpt.tar"
    src.mkdir()
    _build_tree(src)
    before = _snapshot(src)

    size = pack_directory(src, tar_path)
    assert size == tar_path.stat().st_size > 5 * 2**20
    safe_extract(tar_path, dest)

    assert _snapshot(dest) == before
    assert _snapshot(src) == before  # packing does not touch the source
    assert (dest / "nested" / "hardlink.txt").stat().st_ino == (dest / "a.txt").stat().st_ino


def test_archive_layout_is_deterministic_pax(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _build_tree(src)
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    pack_directory(src, first)
    pack_directory(src, second)
    assert first.read_bytes() == second.read_bytes()

    with tarfile.open(first) as tar:
        assert tar.format == tarfile.PAX_FORMAT
        names = tar.getnames()
        assert {m.uid for m in tar.getmembers()} == {0}
    assert names[0] == "a.txt"
    assert not any(n.startswith(("/", "./")) or n == "." for n in names)
    assert names.index("nested") < names.index("nested/deep") < names.index("nested/deep/weights.pt")
    assert names == [n for n, _ in archive._walk_sorted(src)]  # sorted pre-order
    assert set(names) == {p.relative_to(src).as_posix() for p in src.rglob("*")}


def test_pack_empty_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pack_directory(src, tmp_path / "empty.tar")
    safe_extract(tmp_path / "empty.tar", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_pack_overwrites_dest_atomically_and_creates_parent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    dest = tmp_path / "a" / "b" / "ckpt.tar"
    pack_directory(src, dest)
    dest.write_bytes(b"stale")
    pack_directory(src, dest)
    with tarfile.open(dest) as tar:
        assert tar.getnames() == ["f"]
    assert [p.name for p in dest.parent.iterdir()] == ["ckpt.tar"]  # no temp files left


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("bad", "/etc"),
        ("bad", "../outside"),
        ("sub/bad", "../../outside"),
        ("sub/bad", "./../x/../.."),
        ("bad", "loop"),
    ],
)
def test_pack_refuses_symlink_leaving_src(tmp_path: Path, link: str, target: str) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok").write_text("ok")
    os.symlink(target, src / link)
    if target == "loop":
        os.symlink("bad", src / "loop")
    dest = tmp_path / "out.tar"
    with pytest.raises(ValueError, match="bad"):
        pack_directory(src, dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_pack_refuses_symlink_escaping_through_another_symlink(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(".", src / "here")  # fine on its own
    os.symlink("here/../x", src / "sneaky")  # lexically "x", really src/../x
    with pytest.raises(ValueError, match="sneaky"):
        pack_directory(src, tmp_path / "out.tar")


def test_pack_refuses_fifo_and_dest_inside_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with pytest.raises(ValueError, match="inside the source"):
        pack_directory(src, src / "ckpt.tar")
    os.mkfifo(src / "pipe")
    with pytest.raises(ValueError, match="pipe"):
        pack_directory(src, tmp_path / "out.tar")
    with pytest.raises(NotADirectoryError):
        pack_directory(src / "f", tmp_path / "out.tar")


# ---------------------------------------------------------------------------------------------------------
# Malicious archives
# ---------------------------------------------------------------------------------------------------------


def _file(name: str, data: bytes = b"pwned", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def _write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MALICIOUS = {
    "parent-escape": ([_file("../escape")], "../escape", "'..'"),
    "absolute": ([_file("/etc/passwd")], "/etc/passwd", "absolute"),
    "absolute-tmp": ([_file("/tmp/stalwart_abs_evil")], "/tmp/stalwart_abs_evil", "absolute"),
    "windows-drive": ([_file("C:/Windows/evil")], "C:/Windows/evil", "absolute"),
    "symlink-empty-target": ([_special("empty", tarfile.SYMTYPE, "")], "empty", "empty"),
    "file-under-file": ([_file("plain"), _file("plain/child")], "plain/child", "not a directory"),
    "nested-dotdot": ([_file("a/../../x")], "a/../../x", "'..'"),
    "symlink-abs-then-file": (
        [_special("link", tarfile.SYMTYPE, "/etc"), _file("link/evil")],
        "link",
        "absolute",
    ),
    "symlink-up": ([_special("up", tarfile.SYMTYPE, "../..")], "up", "outside"),
    "hardlink-abs": ([_special("hl", tarfile.LNKTYPE, "/etc/passwd")], "hl", "absolute"),
    "hardlink-dotdot": ([_special("hl", tarfile.LNKTYPE, "../../etc/passwd")], "hl", "'..'"),
    "hardlink-not-in-archive": ([_special("hl", tarfile.LNKTYPE, "missing")], "hl", "earlier"),
    "char-device": ([_special("dev", tarfile.CHRTYPE)], "dev", "device"),
    "block-device": ([_special("blk", tarfile.BLKTYPE)], "blk", "device"),
    "fifo": ([_special("fifo", tarfile.FIFOTYPE)], "fifo", "FIFO"),
    "through-inside-symlink": (
        [_special("sub", tarfile.DIRTYPE), _special("link", tarfile.SYMTYPE, "sub"), _file("link/evil")],
        "link/evil",
        "through the symlink",
    ),
    "symlink-escape-via-dot-link": (
        [_special("here", tarfile.SYMTYPE, "."), _special("sneaky", tarfile.SYMTYPE, "here/../x")],
        "sneaky",
        "outside",
    ),
    "symlink-loop": (
        [_special("a", tarfile.SYMTYPE, "b"), _special("b", tarfile.SYMTYPE, "a")],
        "a",
        "outside",
    ),
    "duplicate-file-then-symlink": (
        [_file("f", b"benign"), _special("f", tarfile.SYMTYPE, "/etc/passwd")],
        "f",
        "duplicate",
    ),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused_and_writes_nothing(tmp_path: Path, case: str) -> None:
    entries, member, reason = MALICIOUS[case]
    work = tmp_path / "work"
    work.mkdir()
    # A benign member first: if validation were lazy it would already be on disk when the bad one is found.
    tar_path = _write_tar(tmp_path / "evil.tar", [_file("benign.txt", b"fine"), *entries])
    dest = work / "dest"
    outside_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(UnsafeArchiveError) as excinfo:
        safe_extract(tar_path, dest)

    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.member == member
    assert reason in excinfo.value.reason
    assert repr(member) in str(excinfo.value)
    assert list(dest.iterdir()) == []
    outside_after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if dest not in p.parents)
    assert [p for p in outside_after if p != dest.relative_to(tmp_path)] == outside_before
    assert not Path("/tmp/stalwart_abs_evil").exists()


def test_refuses_writing_through_symlink_already_in_dest(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(victim, dest / "sub")
    os.symlink(victim / "file", dest / "file")
    for name in ("sub/evil", "file"):
        tar_path = _write_tar(tmp_path / "x.tar", [_file(name)])
        with pytest.raises(UnsafeArchiveError, match="symlink"):
            safe_extract(tar_path, dest)
    assert list(victim.iterdir()) == []


def test_setuid_bits_stripped_and_ownership_ignored(tmp_path: Path) -> None:
    info, data = _file("tool", b"#!/bin/sh\n", mode=0o6755)
    info.uid, info.gid, info.uname, info.gname = 4242, 4242, "nobody-here", "nogroup-here"
    info.mtime = BASE_MTIME
    d, _ = _special("d", tarfile.DIRTYPE)
    d.mode = 0o1777
    tar_path = _write_tar(tmp_path / "x.tar", [(info, data), (d, None)])
    safe_extract(tar_path, tmp_path / "out")
    st = (tmp_path / "out" / "tool").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "d").stat().st_mode) == 0o777
    assert st.st_mtime == BASE_MTIME
    assert st.st_uid == os.getuid()


def test_colon_in_name_is_not_mistaken_for_a_drive(tmp_path: Path) -> None:
    safe_extract(_write_tar(tmp_path / "x.tar", [_file("a:b", b"ok")]), tmp_path / "out")
    assert (tmp_path / "out" / "a:b").read_bytes() == b"ok"


def test_dot_prefixed_names_and_internal_links_are_accepted(tmp_path: Path) -> None:
    tar_path = _write_tar(
        tmp_path / "x.tar",
        [
            _special("./", tarfile.DIRTYPE),
            _special("./sub", tarfile.DIRTYPE),
            _file("./sub/data", b"payload"),
            _special("./alias", tarfile.SYMTYPE, "sub/data"),
            _special("./sub/back", tarfile.SYMTYPE, "../sub/./data"),
            _special("./hard", tarfile.LNKTYPE, "./sub/data"),
        ],
    )
    safe_extract(tar_path, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "alias").read_bytes() == (out / "sub" / "back").read_bytes() == b"payload"
    assert (out / "hard").read_bytes() == b"payload"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_own_checks_work_without_stdlib_data_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "_HAS_DATA_FILTER", False)
    src = tmp_path / "src"
    src.mkdir()
    _build_tree(src)
    pack_directory(src, tmp_path / "ok.tar")
    safe_extract(tmp_path / "ok.tar", tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    for case in ("symlink-up", "hardlink-abs", "symlink-escape-via-dot-link"):
        entries, _, _ = MALICIOUS[case]
        tar_path = _write_tar(tmp_path / f"{case}.tar", entries)
        with pytest.raises(UnsafeArchiveError):
            safe_extract(tar_path, tmp_path / case)
        assert list((tmp_path / case).iterdir()) == []


def test_pack_directory_streams_into_a_file_object(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "note.txt").write_text("hello")

    class Sink:  # write() only: no seek, no tell, as an object-store upload stream
        def __init__(self) -> None:
            self.buffer = io.BytesIO()

        def write(self, data: bytes) -> int:
            return self.buffer.write(data)

    sink = Sink()
    size = pack_directory(src, sink)
    assert size == len(sink.buffer.getvalue()) > 300_000
    archive = tmp_path / "streamed.tar"
    archive.write_bytes(sink.buffer.getvalue())
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "deep" / "er" / "data.bin").read_bytes() == (
        src / "deep" / "er" / "data.bin"
    ).read_bytes()
    assert (tmp_path / "out" / "note.txt").read_text() == "hello"


# ---------------------------------------------------------------------------------------------------------
# Bounds: what extraction writes is bounded by the archive's own size, and by the free space
# ---------------------------------------------------------------------------------------------------------

TIB = 2**40


def _pax_sparse_tar(path: Path, realsize: int = TIB) -> Path:
    """A PAX (GNU sparse 1.0) member declaring ``realsize`` bytes, of which the archive stores four."""
    sparse_map = b"1\n0\n4\n"
    body = sparse_map + b"\0" * (512 - len(sparse_map)) + b"DATA"
    info = tarfile.TarInfo("GNUSparseFile.0/huge.bin")
    info.size = len(body)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "huge.bin",
        "GNU.sparse.realsize": str(realsize),
    }
    return _write_tar(path, [_file("benign.txt", b"fine"), (info, body)])


def _gnu_tar_sparse(tmp_path: Path, fmt: str) -> Path:
    """GNU tar's own sparse archive of a 1 TiB file holding one byte."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge.bin", "wb") as fh:
        fh.truncate(TIB)
        fh.seek(2**20)
        fh.write(b"x")
    out = tmp_path / f"{fmt}.tar"
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(src), "huge.bin"], check=True
    )
    return out


@pytest.mark.parametrize("maker", ["pax-crafted", "gnu", "posix"])
def test_sparse_member_is_refused(tmp_path: Path, maker: str) -> None:
    if maker == "pax-crafted":
        tar_path = _pax_sparse_tar(tmp_path / "sparse.tar")
    else:
        tar_path = _gnu_tar_sparse(tmp_path, maker)
    assert tar_path.stat().st_size < 64 * 1024  # a 1 TiB member in a few blocks
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=r"sparse member declaring 1099511627776 bytes") as excinfo:
        safe_extract(tar_path, dest)
    assert excinfo.value.member == "huge.bin"
    assert list(dest.iterdir()) == []


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


@pytest.mark.parametrize("codec", ["gz", "bz2", "xz"])
def test_compressed_archive_is_refused_before_decompressing(tmp_path: Path, codec: str) -> None:
    """A 64 MiB file of zeros compresses to a few KiB: compressed archives can expand without bound."""
    bomb = tmp_path / f"bomb.tar.{codec}"
    info = tarfile.TarInfo("zeros.bin")
    info.size = (
        64 * 2**20 if codec == "gz" else 2**20
    )  # bz2 and xz are slow to build; the magic is what counts
    with tarfile.open(bomb, f"w:{codec}", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BufferedReader(_Zeros(info.size)))
    assert bomb.stat().st_size * 100 < info.size
    dest = tmp_path / "dest"
    names = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}
    with pytest.raises(UnsafeArchiveError, match=rf"{names[codec]}-compressed archive") as excinfo:
        safe_extract(bomb, dest)
    assert excinfo.value.member == bomb.name
    assert list(dest.iterdir()) == []


def test_member_declaring_more_than_the_archive_holds_is_refused(tmp_path: Path) -> None:
    info, data = _file("liar.bin", b"x" * 100)
    info.pax_headers = {"size": str(10**12)}  # PAX overrides the header's size on reading
    tar_path = _write_tar(tmp_path / "liar.tar", [_file("benign.txt", b"fine"), (info, data)])
    dest = tmp_path / "dest"
    with pytest.raises(
        UnsafeArchiveError, match=r"declares 1000000000000 bytes, but the \d+-byte archive"
    ) as e:
        safe_extract(tar_path, dest)
    assert e.value.member == "liar.bin"
    assert list(dest.iterdir()) == []


def test_truncated_archive_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    tar_path = _write_tar(
        tmp_path / "whole.tar", [_file("a.txt", b"fine"), _file("big.bin", os.urandom(100_000))]
    )
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_path.read_bytes()[: 4 * 512 + 10_000])  # inside big.bin's data
    dest = tmp_path / "dest"
    with pytest.raises(
        UnsafeArchiveError, match=r"declares 100000 bytes, but the 12048-byte archive"
    ) as excinfo:
        safe_extract(cut, dest)
    assert excinfo.value.member == "big.bin"
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("data", [b"", b"this is not a tar archive" * 40], ids=["empty", "garbage"])
def test_unreadable_archive_is_refused(tmp_path: Path, data: bytes) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    with pytest.raises(UnsafeArchiveError, match="unreadable tar archive") as excinfo:
        safe_extract(bad, tmp_path / "dest")
    assert excinfo.value.member == "bad.tar"


_EXTRACT_ON_SMALL_FS = """
import errno, json, os, sys
from pathlib import Path
from stalwart.checkpoint.archive import safe_extract

mount, results = Path(sys.argv[1]), {}
for name in sys.argv[2:]:
    dest = mount / Path(name).stem
    try:
        safe_extract(Path(name), dest)
        results[name] = {"ok": True}
    except OSError as exc:
        results[name] = {"errno": exc.errno, "message": str(exc)}
    results[name]["written"] = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
print(json.dumps(results))
"""


def test_extraction_stops_before_writing_when_the_free_space_is_short(tmp_path: Path) -> None:
    """On a real 1 MiB tmpfs (a private mount namespace), an honest 1.8 MB archive is refused whole."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    big = _write_tar(tmp_path / "big.tar", [_file(f"part{i}.bin", os.urandom(600_000)) for i in range(3)])
    small = _write_tar(tmp_path / "small.tar", [_file("part.bin", os.urandom(200_000))])
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"'
    cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(mount)]
    probe = (
        subprocess.run([*cmd, "true"], capture_output=True, text=True) if shutil.which("unshare") else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs in a private namespace here: {probe and probe.stderr}")
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", _EXTRACT_ON_SMALL_FS, str(mount), str(big), str(small)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(archive.__file__).resolve().parents[2])},
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results[str(small)] == {"ok": True, "written": ["part.bin"]}  # the check is not over-cautious
    refused = results[str(big)]
    assert refused["errno"] == errno.ENOSPC, refused
    assert "bytes are free there; nothing was extracted" in refused["message"]
    assert refused["written"] == []
