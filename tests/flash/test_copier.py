"""The copier's one pass: tensor bytes into a buffer, each chunk hashed as its bytes land.

The hashes a save returns are the object's checksums, so they must equal a hash of the finished buffer
for every layout: tensors that cross chunk and hot-piece boundaries, empty and odd-sized tensors,
tensors copied by torch first, chunks smaller than a hot piece, and padding the buffer held before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash

from stalwart.flash.buffers import Buffer
from stalwart.flash.copier import HOT_PIECE, Copier
from stalwart.flash.objects import HEADER_SIZE, plan_tensors


def _layout() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    big = torch.randint(0, 256, (3 * HOT_PIECE + 12345,), dtype=torch.uint8, generator=g)
    return [
        torch.randn(3, generator=g),  # 12 bytes, then padding to the next 64
        torch.empty(0),
        big,  # crosses several hot pieces and, at small chunk sizes, several chunks
        torch.randn(300, 700, generator=g).t(),  # not contiguous: copied by torch first
        torch.randint(0, 2**31, (1,), dtype=torch.int64, generator=g),
        torch.randn(HOT_PIECE // 4 - 1, generator=g),  # 4 bytes shorter than a hot piece
        torch.arange(17, dtype=torch.int16),
    ]


@pytest.mark.parametrize("chunk_size", [4096, 65536 + 64, HOT_PIECE, HOT_PIECE + 4096, 4 * 2**20])
@pytest.mark.parametrize("threads", [1, 2])
def test_copy_in_hashes_are_the_hashes_of_the_finished_buffer(
    tmp_path: Path, chunk_size: int, threads: int
) -> None:
    tensors = _layout()
    entries, direct, data_end = plan_tensors(tensors)
    data_size = data_end - HEADER_SIZE
    buffer = Buffer.allocate(tmp_path / "buffer", data_end)
    buffer.view[:] = bytes([0xA5]) * data_end  # what an earlier save left in the padding
    copier = Copier(threads)
    try:
        hashes = copier.copy_in(tensors, entries, direct, buffer, data_size, chunk_size, hash_chunks=True)
        expected = [
            xxhash.xxh3_64_intdigest(buffer.view[at : min(at + chunk_size, data_end)])
            for at in range(HEADER_SIZE, data_end, chunk_size)
        ]
        assert hashes == expected
        assert hashes == copier.hash_data(buffer.view, data_size, chunk_size)
        for tensor, entry in zip(tensors, entries, strict=True):
            if entry.nbytes:
                landed = torch.frombuffer(
                    buffer.mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset
                )
                assert torch.equal(landed.view(tensor.dtype).view(tensor.shape), tensor)
    finally:
        copier.close()
        del buffer


def test_copy_in_without_hashing_copies_the_same_bytes(tmp_path: Path) -> None:
    tensors = _layout()
    entries, direct, data_end = plan_tensors(tensors)
    buffers = [Buffer.allocate(tmp_path / name, data_end) for name in ("hashed", "plain")]
    copier = Copier(2)
    try:
        for buffer, hash_chunks in zip(buffers, (True, False), strict=True):
            result = copier.copy_in(
                tensors, entries, direct, buffer, data_end - HEADER_SIZE, 4096, hash_chunks=hash_chunks
            )
            assert (result is None) == (not hash_chunks)
        assert bytes(buffers[0].view) == bytes(buffers[1].view)
    finally:
        copier.close()
