"""Pre-allocated, pre-faulted, mmap'd tmpfs buffers, reused save after save.

Writing a *new* tmpfs file runs at about 1.2 GB/s on the development machine, because the kernel
allocates and zeroes every page; memcpy into memory that is already mapped runs at 13-20 GB/s
(DESIGN decision 1). So each rank keeps a pool of buffer files whose pages are reserved with
``posix_fallocate`` (a full tmpfs then fails with ENOSPC up front, instead of a SIGBUS in the middle of
a copy) and mapped with their page tables populated. A buffer moves into a step directory by rename
when its step commits and back into the pool when retention drops that step, so its pages are
allocated once for the life of the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import FlashSpaceError

__all__ = ["Buffer", "BufferPool", "FlashSpaceError", "Mappings"]

log = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
GRANULE = 64 * 2**10  # capacities round up to 64 KiB: room for metadata that varies from save to save


class Buffer:
    """One tmpfs file mapped into this process, with its base address for memmove."""

    def __init__(self, path: Path, capacity: int, *, populate: bool = True) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(self._fd, capacity, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise
        if populate:
            _populate(self.mm, capacity)
        self.pinned = False  # registered with CUDA for direct device-to-host copies
        self._expose()

    def _expose(self) -> None:
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.address = ctypes.addressof(self._anchor)
        self.view = memoryview(self.mm)

    @classmethod
    def allocate(cls, path: Path, capacity: int) -> Buffer:
        """Create a new buffer file with every page reserved and mapped."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _reserve(fd, capacity, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return cls(path, capacity)

    def file_size(self) -> int:
        """The file's size now: touching a mapped page beyond it would kill the process with SIGBUS."""
        return os.fstat(self._fd).st_size

    def stands_for(self, path: Path) -> bool:
        """Whether this mapping is as good as mapping ``path`` anew: ``path`` names the very file it maps
        (same inode, which cannot be reused while this buffer holds it open) at the mapped size."""
        if self._fd < 0:
            return False
        try:
            named = os.stat(path)
        except OSError:
            return False
        mapped = os.fstat(self._fd)
        same = (named.st_dev, named.st_ino) == (mapped.st_dev, mapped.st_ino)
        return same and named.st_size == self.capacity

    def grow(self, capacity: int) -> None:
        """Make room for a larger state in place: only the new pages are allocated and faulted."""
        if capacity <= self.capacity:
            return
        if self.pinned:
            raise RuntimeError("a buffer registered with CUDA cannot grow")
        _reserve(self._fd, capacity, self.path)
        self.view.release()
        del self._anchor
        self.mm.resize(capacity)  # mremap: the mapping may move, so the address is taken again
        old, self.capacity = self.capacity, capacity
        self._expose()
        _populate(self.mm, capacity, start=old)

    def move(self, target: Path) -> None:
        """Rename the file; the mapping stays valid (it is bound to the inode, not the name).

        Another process's cleanup may remove the (still empty) step directory between the mkdir and the
        rename: the directory is made again then."""
        for attempt in range(5):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self.path, target)
            except FileNotFoundError:
                if attempt == 4 or not self.path.exists():
                    raise
                continue
            self.path = target
            return

    def close(self) -> None:
        if self._fd < 0:
            return
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.pinned = False
        self.view.release()
        del self._anchor
        with contextlib.suppress(BufferError):  # a view still alive (in a traceback): unmapped when it dies
            self.mm.close()
        os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"Buffer({self.path}, {human_bytes(self.capacity)})"


class Mappings:
    """Buffers an earlier holder of a rank in this process left mapped (``BufferPool.detach``), offered to
    the next holder: mapping and faulting in a large file again costs about as much as copying into it."""

    def __init__(self, buffers: Sequence[Buffer] = ()) -> None:
        self._buffers = list(buffers)

    def take(self, path: Path) -> Buffer | None:
        """The mapping that stands for ``path``, if one does (it is then the caller's)."""
        for buffer in self._buffers:
            if buffer.stands_for(path):
                self._buffers.remove(buffer)
                buffer.path = Path(path)
                return buffer
        return None

    def close(self) -> None:
        """Unmap what nobody took (the files themselves are left alone)."""
        for buffer in self._buffers:
            buffer.close()
        self._buffers.clear()


class BufferPool:
    """The free buffers of one rank, in ``directory``; adopts what an earlier process left there (reusing
    ``mapped`` where one of those mappings still stands for a file)."""

    def __init__(self, directory: Path, mapped: Mappings | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._free: list[Buffer] = []
        for path in sorted(self.directory.glob("buf-*")):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            if mapped is not None and (reused := mapped.take(path)) is not None:
                self._free.append(reused)
                continue
            try:
                self._free.append(Buffer(path, path.stat().st_size))
            except (OSError, ValueError) as exc:
                log.warning("discarding unusable flash buffer %s: %s", path, exc)
                path.unlink(missing_ok=True)

    def acquire(self, size: int) -> Buffer:
        """A free buffer of at least ``size`` bytes: the smallest that fits, else a free one grown in
        place, else a new one. A failed growth leaves the buffer free and as it was."""
        fitting = [b for b in self._free if b.capacity >= size]
        if fitting:
            best = min(fitting, key=lambda b: b.capacity)
            self._free.remove(best)
            return best
        capacity = (size + GRANULE - 1) // GRANULE * GRANULE
        growable = [b for b in self._free if not b.pinned]
        if growable:  # grow the largest in place rather than keeping a buffer that can never fit
            largest = max(growable, key=lambda b: b.capacity)
            largest.grow(capacity)
            self._free.remove(largest)
            return largest
        return Buffer.allocate(self.directory / f"buf-{secrets.token_hex(6)}", capacity)

    def release(self, buffer: Buffer) -> None:
        """Take a buffer back (its step was dropped): it is renamed into the pool for reuse, unless its
        file was cut short under it (it could not be written through the mapping any more)."""
        if buffer.file_size() < buffer.capacity:
            self._discard(buffer)
            return
        buffer.move(self.directory / f"buf-{secrets.token_hex(6)}")
        self._free.append(buffer)

    def adopt(self, path: Path) -> None:
        """Take over a step object an earlier process left behind, as a free buffer."""
        target = self.directory / f"buf-{secrets.token_hex(6)}"
        os.rename(path, target)
        try:
            self._free.append(Buffer(target, target.stat().st_size, populate=False))
        except (OSError, ValueError):
            target.unlink(missing_ok=True)

    def detach(self) -> list[Buffer]:
        """Give up the free buffers, still mapped; their files stay in the pool for its next holder."""
        free, self._free = self._free, []
        return free

    def close(self) -> None:
        """Unmap and delete the free buffers: their memory goes back to the system."""
        for buffer in self._free:
            self._discard(buffer)
        self._free.clear()

    @staticmethod
    def _discard(buffer: Buffer) -> None:
        buffer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(buffer.path)


def _reserve(fd: int, capacity: int, path: Path) -> None:
    """Allocate every page of the file now: a full tmpfs answers ENOSPC here, not SIGBUS mid-copy."""
    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise FlashSpaceError(
                exc.errno,
                f"no space in {path.parent} for a {human_bytes(capacity)} flash buffer "
                f"({human_bytes(free)} free); "
                "committed checkpoints are intact. Free memory in the flash root, lower keep=, or point "
                "root= / STALWART_FLASH_ROOT at a larger tmpfs",
            ) from None
        raise


def _populate(mm: mmap.mmap, size: int, start: int = 0) -> None:
    """Fault pages in now, so the first save copies at memory speed."""
    start -= start % mmap.PAGESIZE
    if size <= start:
        return
    try:
        mm.madvise(_MADV_POPULATE_WRITE, start, size - start)
        return
    except (OSError, ValueError):
        pass
    view = memoryview(mm)
    try:
        for offset in range(start, size, mmap.PAGESIZE):
            view[offset] = view[offset]
    finally:
        view.release()


def human_bytes(n: float) -> str:
    """A byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
