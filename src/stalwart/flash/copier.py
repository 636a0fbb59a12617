"""The one copy: tensor bytes into a mapped buffer (hashing each chunk while it is hot in cache), and
back out into the training tensors after verifying every chunk.

Copies of contiguous CPU tensors are ``memmove`` calls through ctypes, which release the GIL, spread over
a few threads that take chunks from a shared counter. Each chunk's hash is fed 512 KiB at a time, right
after those bytes land, so it reads them from the core's own cache (L2 is 2 MiB a core on the development
machine) rather than from memory. There, copying and hashing 1 GiB on one thread takes 0.071 s, about
what a bare memmove of it takes (0.065-0.082 s); hashing each whole 4 MiB chunk after its copy took
0.082 s, and copy-then-hash ~1.5x the copy. Other tensors (non-contiguous, conjugate views, CUDA) go
through ``Tensor.copy_`` first.

CUDA (untested here: no GPU on the development machines): the device-to-host copy lands straight in
the tmpfs buffer, which is registered with ``cudaHostRegister`` so the DMA engine can reach it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import xxhash

from ..checks import int_at_least
from .objects import HEADER_SIZE, TensorEntry, plan_tensors

if TYPE_CHECKING:
    import torch

    from .buffers import Buffer

__all__ = ["Copier"]

log = logging.getLogger(__name__)

_memmove = ctypes.memmove
_xxh3 = xxhash.xxh3_64_intdigest
_xxh3_state = xxhash.xxh3_64
HOT_PIECE = 512 * 2**10  # hashed right after it is copied, while it is still in the core's cache


class Copier:
    """Parallel copies and checksums between tensors and buffers."""

    def __init__(self, threads: int | None = None) -> None:
        int_at_least("threads", threads, 1, optional=True, note=" (one per core, up to 4)")
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="stalwart-copy") if self.threads > 1 else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # saving

    def copy_in(
        self,
        tensors: Sequence[torch.Tensor],
        entries: Sequence[TensorEntry],
        direct: Sequence[bool],
        buffer: Buffer,
        data_size: int,
        chunk_size: int,
        *,
        hash_chunks: bool,
    ) -> list[int] | None:
        """Copy every tensor into ``buffer`` at its entry's offset; with ``hash_chunks``, return the
        xxh3-64 of each ``chunk_size`` piece of the data region, computed as the piece lands.
        ``direct`` says which tensors can be memmoved as they are (``objects.plan_tensors``)."""
        pieces = _pieces(
            [(t.data_ptr(), e) for t, e, d in zip(tensors, entries, direct, strict=True) if d],
            buffer.address,
            data_size,
            chunk_size,
            to_buffer=True,
        )
        others = [(t, e) for t, e, d in zip(tensors, entries, direct, strict=True) if not d and e.nbytes]
        if others:
            self._copy_with_torch(others, buffer)
        view, base = buffer.view, buffer.address
        hashes = [0] * len(pieces)

        def chunk(i: int) -> None:
            if not hash_chunks:
                for dst, src, n in pieces[i]:
                    _memmove(dst, src, n)
                return
            start = HEADER_SIZE + i * chunk_size
            end = start + min(chunk_size, data_size - i * chunk_size)
            moves = iter(pieces[i])  # in buffer order, as plan_tensors lays the tensors out
            move = next(moves, None)
            state = _xxh3_state()
            for at in range(start, end, HOT_PIECE):
                upto = min(at + HOT_PIECE, end)
                limit = base + upto
                while move is not None and move[0] < limit:  # the copies that land before upto
                    dst, src, n = move
                    part = min(n, limit - dst)
                    _memmove(dst, src, part)
                    move = (dst + part, src + part, n - part) if part < n else next(moves, None)
                state.update(view[at:upto])
            hashes[i] = state.intdigest()

        self._parallel(len(pieces), chunk)
        return hashes if hash_chunks else None

    def _copy_with_torch(self, items: list[tuple[torch.Tensor, TensorEntry]], buffer: Buffer) -> None:
        import torch

        if any(t.device.type == "cuda" for t, _ in items):
            _register_pinned(buffer)
        for tensor, entry in items:
            target = torch.frombuffer(buffer.mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
            target.view(tensor.dtype).view(tensor.shape).copy_(tensor)

    def hash_data(
        self, view: memoryview, data_size: int, chunk_size: int, *, parallel: bool = True
    ) -> list[int]:
        """xxh3-64 of every chunk of the data region."""
        count = (data_size + chunk_size - 1) // chunk_size
        hashes = [0] * count

        def chunk(i: int) -> None:
            start = HEADER_SIZE + i * chunk_size
            hashes[i] = _xxh3(view[start : start + min(chunk_size, data_size - i * chunk_size)])

        if parallel:
            self._parallel(count, chunk)
        else:
            for i in range(count):
                chunk(i)
        return hashes

    # loading

    def copy_out(
        self, buffer: Buffer, entries: Sequence[TensorEntry], targets: Sequence[torch.Tensor]
    ) -> None:
        """Copy each entry's bytes from ``buffer`` into its target tensor, in place."""
        import torch

        _, movable, _ = plan_tensors(targets)
        direct = [(t.data_ptr(), e) for t, e, d in zip(targets, entries, movable, strict=True) if d]
        chunks = _pieces(direct, buffer.address, None, 4 * 2**20, to_buffer=False)

        def run(i: int) -> None:  # threads take chunks in order: neighbouring memory, not interleaved
            for dst, src, n in chunks[i]:
                _memmove(dst, src, n)

        self._parallel(len(chunks), run)
        for target, entry, d in zip(targets, entries, movable, strict=True):
            if not d and entry.nbytes:
                source = torch.frombuffer(
                    buffer.mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset
                )
                target.copy_(source.view(target.dtype).view(target.shape))

    # threads

    def _parallel(self, count: int, fn: Callable[[int], None]) -> None:
        if self._pool is None or count < 2:
            for i in range(count):
                fn(i)
            return
        counter = itertools.count()

        def worker() -> None:
            while (i := next(counter)) < count:
                fn(i)

        futures = [self._pool.submit(worker) for _ in range(min(self.threads, count))]
        for future in futures:
            future.result()


def _pieces(
    items: list[tuple[int, TensorEntry]],
    base: int,
    data_size: int | None,
    chunk_size: int,
    *,
    to_buffer: bool,
) -> list[list[tuple[int, int, int]]]:
    """Split each (tensor address, entry) copy at chunk boundaries of the data region.

    Returns, per chunk, ``(dst, src, nbytes)`` memmove arguments. With ``data_size`` None, as many chunks
    as the entries need.
    """
    if data_size is None:
        data_size = max((e.offset + e.nbytes - HEADER_SIZE for _, e in items), default=0)
    chunks: list[list[tuple[int, int, int]]] = [[] for _ in range((data_size + chunk_size - 1) // chunk_size)]
    for address, entry in items:
        done = 0
        while done < entry.nbytes:
            at = entry.offset + done - HEADER_SIZE  # position in the data region
            index = at // chunk_size
            n = min(entry.nbytes - done, (index + 1) * chunk_size - at)
            buffer_at, tensor_at = base + entry.offset + done, address + done
            chunks[index].append((buffer_at, tensor_at, n) if to_buffer else (tensor_at, buffer_at, n))
            done += n
    return chunks


def _register_pinned(buffer: Buffer) -> None:
    """Pin the buffer for direct device-to-host copies (untested: no GPU on the development machines)."""
    if buffer.pinned:
        return
    import torch

    try:
        result = torch.cuda.cudart().cudaHostRegister(buffer.address, buffer.capacity, 0)
        buffer.pinned = int(result) == 0
    except Exception as exc:  # pageable copies still work, only slower
        log.warning("could not pin flash buffer %s for CUDA copies: %s", buffer.path, exc)
