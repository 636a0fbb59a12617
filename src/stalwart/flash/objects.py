"""The byte format of a flash object, and how a state dict becomes tensors plus a skeleton.

An object is one rank's share of one step::

    [0, 4096)                 header: magic, format version, step, rank, sizes, checksums
    [4096, 4096 + data_size)  tensor bytes, each tensor 64-byte aligned
    [meta_offset, +meta_size) pickled skeleton and tensor table, then one xxh3-64 per data chunk

The header holds the checksum of the meta region and of itself; the meta region holds a checksum of
every ``chunk_size`` bytes of data, so chunks can be hashed and verified in parallel and a flipped byte
is located to its chunk. The skeleton is the state dict with each tensor replaced by a ``TensorRef``;
it is unpickled with an allow-list, so a flash object can never run code when loaded.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import xxhash

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


class TensorRef(int):
    """Stands for the tensor at this index of the tensor table inside a pickled skeleton."""

    __slots__ = ()

    @property
    def index(self) -> int:
        return int(self)

    def __reduce__(self) -> tuple:
        return (TensorRef, (int(self),))

    def __repr__(self) -> str:
        return f"TensorRef({int(self)})"


class TensorEntry(NamedTuple):
    """Where a tensor's bytes are in an object (stored as a plain tuple)."""

    offset: int  # from the start of the object
    nbytes: int
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]


_DTYPE_NAMES: dict[Any, str] = {}


def plan_tensors(tensors: Sequence[Any]) -> tuple[list[TensorEntry], list[bool], int]:
    """Offsets of the tensors in an object, whether each can be memmoved as it is (CPU, contiguous,
    no lazy conjugation), and where the data region ends. One pass, a few attribute reads per tensor:
    this runs on every save."""
    entries: list[TensorEntry] = []
    direct: list[bool] = []
    offset = HEADER_SIZE
    for tensor in tensors:
        dtype = tensor.dtype
        name = _DTYPE_NAMES.get(dtype)
        if name is None:
            name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
        nbytes = tensor.nbytes
        entries.append(TensorEntry(offset, nbytes, name, tuple(tensor.shape)))
        direct.append(
            tensor.is_cpu
            and tensor.is_contiguous()
            and not (dtype.is_complex and (tensor.is_conj() or tensor.is_neg()))
        )
        offset = align(offset + nbytes)
    return entries, direct, offset


def dtype_name(tensor: Any) -> str:
    return _DTYPE_NAMES.get(tensor.dtype) or str(tensor.dtype).removeprefix("torch.")


def flatten(state: Any) -> tuple[Any, list]:
    """Split a nested state (dicts, lists, tuples) into a skeleton and its tensors, in order.

    A tensor that appears twice (tied weights) is stored once.
    """
    import torch

    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                raise ValueError(f"flash checkpoints store dense tensors; got a {value.layout} tensor")
            key = id(value)
            if key not in seen:
                seen[key] = len(tensors)
                tensors.append(value)
            return TensorRef(seen[key])
        if isinstance(value, collections.OrderedDict):
            return collections.OrderedDict((k, walk(v)) for k, v in value.items())
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(walk(v) for v in value)
        return value

    return walk(state), tensors


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("builtins", "bytearray"),
    (__name__, "TensorRef"),
    ("torch", "Size"),
    ("torch", "device"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a flash checkpoint; state values must be tensors, numbers, "
            "strings, bytes, None, or dicts/lists/tuples/sets of them"
        )


def _is_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


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
    skeleton, entries = _SafeUnpickler(io.BytesIO(data)).load()
    return skeleton, [TensorEntry(*e) for e in entries]


def pack_hashes(hashes: list[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(raw: bytes | memoryview, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", raw)
