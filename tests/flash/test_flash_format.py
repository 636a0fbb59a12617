"""The flash object format on its own (``flash/objects.py``): sizes, sealing, verification, and the
skeleton's pickles (``flash/tree.py``), without a rank, a pool or tmpfs."""

from __future__ import annotations

import pickle
import pickletools

import pytest
import torch

from stalwart.flash.layout import CommitRecord
from stalwart.flash.objects import (
    HEADER_SIZE,
    PACKED_HEADER_SIZE,
    CorruptObjectError,
    Header,
    chunk_count,
    dump_meta,
    hash_bytes,
    load_meta,
    meta_offset,
    object_size,
    plan_tensors,
    seal,
    verify_view,
)
from stalwart.flash.tree import TensorRef, flatten

CHUNK = 4096


def _hash_chunks(view: memoryview, data_size: int, chunk_size: int) -> list[int]:
    return [
        hash_bytes(view[HEADER_SIZE + start : HEADER_SIZE + min(start + chunk_size, data_size)])
        for start in range(0, data_size, chunk_size)
    ]


def _object(state: dict) -> tuple[bytearray, CommitRecord]:
    """A sealed object of ``state`` in memory, and the commit record that vouches for it."""
    skeleton, tensors = flatten(state)
    entries, _, data_end = plan_tensors(tensors)
    data_size = data_end - HEADER_SIZE
    meta = dump_meta(skeleton, entries)
    raw = bytearray(object_size(data_size, len(meta), CHUNK))
    view = memoryview(raw)
    for entry, tensor in zip(entries, tensors, strict=True):
        view[entry.offset : entry.offset + entry.nbytes] = (
            tensor.contiguous().view(torch.uint8).numpy().tobytes()
        )
    hashes = _hash_chunks(view, data_size, CHUNK)
    end, header_hash = seal(view, 7, 1, 2, data_size=data_size, meta=meta, chunk_size=CHUNK, hashes=hashes)
    assert end == len(raw)  # object_size is exact
    record = CommitRecord(
        step=7, rank=1, world_size=2, objects=[{"name": "o", "size": end, "header_hash": header_hash}]
    )
    return raw, record


STATE = {"w": torch.arange(3000, dtype=torch.float32), "b": torch.ones(5, dtype=torch.int64), "step": 7}


def test_sizes_add_up_to_the_sealed_object() -> None:
    assert chunk_count(0, CHUNK) == 0 and chunk_count(1, CHUNK) == 1 and chunk_count(CHUNK + 1, CHUNK) == 2
    assert meta_offset(1) == HEADER_SIZE + 64 and meta_offset(64) == HEADER_SIZE + 64
    assert object_size(100, 10, CHUNK) == meta_offset(100) + 10 + 8
    raw, record = _object(STATE)
    header, meta = verify_view(memoryview(raw), len(raw), record, _hash_chunks, where="mem")
    assert (header.step, header.rank, header.world_size, header.chunk_size) == (7, 1, 2, CHUNK)
    skeleton, entries = load_meta(meta)
    assert skeleton["step"] == 7 and isinstance(skeleton["w"], TensorRef)
    assert [e.dtype for e in entries] == ["float32", "int64"]
    assert all(e.offset % 64 == 0 for e in entries)  # every tensor aligned


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (HEADER_SIZE + 5000, "data checksum mismatch in 1 chunk(s), the first at bytes 8192-12288"),
        (-3, "metadata checksum mismatch"),
        (20, "header does not match its commit record"),
    ],
)
def test_a_flipped_byte_is_found_and_placed(where: int, message: str) -> None:
    raw, record = _object(STATE)
    raw[where] ^= 0xFF
    with pytest.raises(CorruptObjectError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify_view(memoryview(raw), len(raw), record, _hash_chunks, where="mem")


def test_a_truncated_object_and_a_record_of_another_step_are_refused() -> None:
    raw, record = _object(STATE)
    with pytest.raises(CorruptObjectError, match="more than the object holds"):
        verify_view(memoryview(raw), len(raw) - 1, record, _hash_chunks, where="mem")
    other = CommitRecord(step=8, rank=1, world_size=2, objects=record.objects)
    with pytest.raises(CorruptObjectError, match="header names step 7, rank 1"):
        verify_view(memoryview(raw), len(raw), other, _hash_chunks, where="mem")
    header = Header.unpack(bytes(raw[:PACKED_HEADER_SIZE]), where="mem")
    assert header.end == len(raw)


def test_seal_refuses_a_buffer_too_small() -> None:
    with pytest.raises(ValueError, match="does not fit its"):
        seal(
            memoryview(bytearray(HEADER_SIZE + 10)),
            1,
            0,
            1,
            data_size=8,
            meta=b"x" * 100,
            chunk_size=CHUNK,
            hashes=[1],
        )


def test_skeletons_of_objects_saved_before_the_tree_module_still_load() -> None:
    """Objects written before ``TensorRef`` moved to ``flash.tree`` name it ``stalwart.flash.objects``."""
    # protocol 2 names classes by a newline-ended GLOBAL opcode, so the module name can be swapped
    current = pickle.dumps(({"w": TensorRef(0)}, [(HEADER_SIZE, 4, "float32", (1,))]), protocol=2)
    assert b"cstalwart.flash.tree\nTensorRef\n" in current
    old = current.replace(b"cstalwart.flash.tree\n", b"cstalwart.flash.objects\n")
    assert "stalwart.flash.objects" in str(list(pickletools.genops(old)))
    skeleton, entries = load_meta(old)
    assert isinstance(skeleton["w"], TensorRef) and skeleton["w"].index == 0
    assert entries[0].shape == (1,)


def test_what_could_run_code_is_refused_when_saving_and_when_loading() -> None:
    with pytest.raises(ValueError, match="is not allowed in a flash checkpoint"):
        dump_meta({"f": pickle.loads}, [])
    evil = pickle.dumps(({"x": pickle.loads}, []))
    with pytest.raises(pickle.UnpicklingError, match="is not allowed in a flash checkpoint"):
        load_meta(evil)
