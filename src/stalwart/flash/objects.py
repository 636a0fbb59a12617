"""The byte format of a flash object: its layout, header, tensor table, sizes, alignment and checksums,
and how it is sealed and verified. (How a state dict becomes tensors plus a skeleton is ``tree``'s.)

An object is one rank's share of one step::

    [0, 4096)                 header: magic, format version, step, rank, sizes, checksums
    [4096, 4096 + data_size)  tensor bytes, each tensor 64-byte aligned
    [meta_offset, +meta_size) pickled skeleton and tensor table, then one xxh3-64 per data chunk

The header holds the checksum of the meta region and of itself; the meta region holds a checksum of
every ``chunk_size`` bytes of data, so chunks can be hashed and verified in parallel and a flipped byte
is located to its chunk. The skeleton is the state dict with each tensor replaced by a ``TensorRef``
(``tree``), unpickled with an allow-list, so a flash object can never run code when loaded.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import xxhash

from .tree import DTYPE_NAMES, safe_loads

if TYPE_CHECKING:
    from pathlib import Path

    from .layout import CommitRecord

FORMAT_VERSION = 1
MAGIC = b"STALWART"
HEADER_SIZE = 4096
ALIGN = 64
DEFAULT_CHUNK = 4 * 2**20

# magic, version, flags, header_size, step, rank, world, data_offset, data_size, meta_offset,
# meta_size, chunk_size, meta_hash, header_hash
_HEADER = struct.Struct("<8sHHIQIIQQQQQQQ")
PACKED_HEADER_SIZE = _HEADER.size


class CorruptObjectError(ValueError):
    """A flash object's header, metadata or data does not match its checksums."""


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def hash_bytes(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Header:
    step: int
    rank: int
    world_size: int
    data_offset: int
    data_size: int
    meta_offset: int
    meta_size: int
    chunk_size: int
    meta_hash: int
    flags: int = 0

    @property
    def end(self) -> int:
        """Bytes of the object in use (the buffer behind it may be larger)."""
        return self.meta_offset + self.meta_size

    @property
    def chunks(self) -> int:
        return (self.data_size + self.chunk_size - 1) // self.chunk_size

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.flags,
            HEADER_SIZE,
            self.step,
            self.rank,
            self.world_size,
            self.data_offset,
            self.data_size,
            self.meta_offset,
            self.meta_size,
            self.chunk_size,
            self.meta_hash,
            0,
        )
        return body[:-8] + struct.pack("<Q", hash_bytes(body[:-8]))

    @classmethod
    def unpack(cls, raw: bytes | memoryview, *, where: str) -> Header:
        if len(raw) < _HEADER.size:
            raise CorruptObjectError(f"{where}: truncated header ({len(raw)} bytes)")
        fields = _HEADER.unpack_from(raw)
        (
            magic,
            version,
            flags,
            header_size,
            step,
            rank,
            world,
            d_off,
            d_size,
            m_off,
            m_size,
            chunk,
            m_hash,
            h_hash,
        ) = fields
        if magic != MAGIC:
            raise CorruptObjectError(f"{where}: not a stalwart flash object (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise CorruptObjectError(
                f"{where}: format version {version}, this stalwart reads {FORMAT_VERSION}"
            )
        if hash_bytes(bytes(raw[: _HEADER.size - 8])) != h_hash:
            raise CorruptObjectError(f"{where}: header checksum mismatch")
        if header_size != HEADER_SIZE or d_off < HEADER_SIZE or m_off < d_off + d_size or chunk <= 0:
            raise CorruptObjectError(f"{where}: inconsistent header sizes")
        return cls(step, rank, world, d_off, d_size, m_off, m_size, chunk, m_hash, flags)


class TensorEntry(NamedTuple):
    """Where a tensor's bytes are in an object (stored as a plain tuple)."""

    offset: int  # from the start of the object
    nbytes: int
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]


def plan_tensors(tensors: Sequence[Any]) -> tuple[list[TensorEntry], list[bool], int]:
    """Offsets of the tensors in an object, whether each can be memmoved as it is (CPU, contiguous,
    no lazy conjugation), and where the data region ends. One pass, a few attribute reads per tensor:
    this runs on every save."""
    entries: list[TensorEntry] = []
    direct: list[bool] = []
    offset = HEADER_SIZE
    for tensor in tensors:
        dtype = tensor.dtype
        name = DTYPE_NAMES.get(dtype)
        if name is None:
            name = DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
        nbytes = tensor.nbytes
        entries.append(TensorEntry(offset, nbytes, name, tuple(tensor.shape)))
        direct.append(
            tensor.is_cpu
            and tensor.is_contiguous()
            and not (dtype.is_complex and (tensor.is_conj() or tensor.is_neg()))
        )
        offset = align(offset + nbytes)
    return entries, direct, offset


def dump_meta(skeleton: Any, entries: list[TensorEntry]) -> bytes:
    """Pickle the skeleton and tensor table; refuse (now, not at load time) what could not load safely."""
    try:
        data = pickle.dumps((skeleton, [tuple(e) for e in entries]), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ValueError(f"cannot save this state in a flash checkpoint: {exc}") from None
    try:
        load_meta(data)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"cannot save this state in a flash checkpoint: {exc}") from None
    return data


def load_meta(data: bytes | memoryview) -> tuple[Any, list[TensorEntry]]:
    skeleton, entries = safe_loads(data)
    return skeleton, [TensorEntry(*e) for e in entries]


def pack_hashes(hashes: list[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(raw: bytes | memoryview, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", raw)


# Sizes: where each region starts and how large a whole object is.


def chunk_count(data_size: int, chunk_size: int) -> int:
    """How many checksummed chunks the data region has."""
    return -(-data_size // chunk_size)


def meta_offset(data_size: int) -> int:
    """Where the meta region starts: after the data, aligned."""
    return align(HEADER_SIZE + data_size)


def object_size(data_size: int, meta_size: int, chunk_size: int) -> int:
    """Bytes of a whole object: header, data, metadata of ``meta_size`` bytes and the chunk hashes."""
    return meta_offset(data_size) + meta_size + 8 * chunk_count(data_size, chunk_size)


def seal(
    view: memoryview,
    step: int,
    rank: int,
    world_size: int,
    *,
    data_size: int,
    meta: bytes,
    chunk_size: int,
    hashes: list[int],
) -> tuple[int, int]:
    """Write the meta region (metadata, then the chunk hashes) and, last, the header into the object
    whose data is in ``view``; return the object's size and the hash of its header (which the commit
    record keeps)."""
    meta_region = meta + pack_hashes(hashes)
    start = meta_offset(data_size)
    end = start + len(meta_region)
    if end > len(view):
        raise ValueError(f"internal error: object of {end} bytes does not fit its {len(view)}-byte buffer")
    view[start:end] = meta_region
    header = Header(
        step,
        rank,
        world_size,
        HEADER_SIZE,
        data_size,
        start,
        len(meta_region),
        chunk_size,
        hash_bytes(meta_region),
    ).pack()
    view[: len(header)] = header
    return end, hash_bytes(header)


# Verification: against the commit record, then the header's and the meta region's checksums.


def verify_header(raw_header: bytes, record: CommitRecord, where: str) -> Header:
    """An object's packed header, checked against its commit record."""
    if hash_bytes(raw_header) != record.objects[0]["header_hash"]:
        raise CorruptObjectError(f"{where}: header does not match its commit record")
    header = Header.unpack(raw_header, where=where)
    if header.step != record.step or header.rank != record.rank:
        raise CorruptObjectError(f"{where}: header names step {header.step}, rank {header.rank}")
    return header


def verify_meta(meta_region: bytes, header: Header, where: str) -> bytes:
    """The metadata of an object (its meta region checked against the header, chunk hashes cut off):
    what a reader that needs no tensor bytes verifies."""
    if len(meta_region) != header.meta_size or hash_bytes(meta_region) != header.meta_hash:
        raise CorruptObjectError(f"{where}: metadata checksum mismatch")
    return meta_region[: len(meta_region) - 8 * header.chunks]


def verify_view(
    view: memoryview, size: int, record: CommitRecord, hash_data: Any, *, where: str
) -> tuple[Header, bytes]:
    """Check the object of ``size`` bytes mapped at ``view``: header, metadata and every data chunk,
    hashed by ``hash_data(view, data_size, chunk_size)``. Returns the header and the metadata."""
    header = verify_header(bytes(view[:PACKED_HEADER_SIZE]), record, where)  # copies: no view outlives this
    if header.end > size:
        raise CorruptObjectError(f"{where}: header names {header.end} bytes, more than the object holds")
    meta_region = bytes(view[header.meta_offset : header.end])
    meta = verify_meta(meta_region, header, where)
    hashes = unpack_hashes(meta_region[len(meta_region) - 8 * header.chunks :], header.chunks)
    actual = hash_data(view, header.data_size, header.chunk_size)
    bad = [i for i, (a, b) in enumerate(zip(actual, hashes, strict=True)) if a != b]
    if bad:
        first = HEADER_SIZE + bad[0] * header.chunk_size
        raise CorruptObjectError(
            f"{where}: data checksum mismatch in {len(bad)} chunk(s), the first at bytes "
            f"{first}-{first + header.chunk_size}"
        )
    return header, meta


def read_head(path: Path, record: CommitRecord) -> bytes:
    """The verified metadata of the committed object at ``path``, read without its tensor bytes."""
    with open(path, "rb") as file:
        header = verify_header(file.read(PACKED_HEADER_SIZE), record, str(path))
        file.seek(header.meta_offset)
        return verify_meta(file.read(header.meta_size), header, str(path))
