"""Flipped and truncated bytes in a flash object are detected, never loaded: the restore falls back to
an older step or the durable copy, or says why it cannot.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from flash_faults import (
    JOB,
    LOGGER,
    assert_state,
    assert_unchanged,
    blank,
    child_error,
    engine_on,
    load_after_truncation,
    mp_context,
    restore,
    snapshot,
    state_of,
)

from stalwart.flash.durable import DurableTier
from stalwart.flash.errors import FlashRestoreError
from stalwart.flash.layout import FlashLayout
from stalwart.flash.objects import HEADER_SIZE, PACKED_HEADER_SIZE, Header

# 2. corruption


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        assert len(byte) == 1, f"offset {offset} is past the end of {path}"
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def _header(path: Path) -> Header:
    with open(path, "rb") as fh:
        return Header.unpack(fh.read(PACKED_HEADER_SIZE), where=str(path))


def corrupt(path: Path, kind: str) -> None:
    header = _header(path)
    if kind == "data":
        _flip(path, HEADER_SIZE + 1_234_567)
    elif kind == "data-last-byte":
        _flip(path, header.data_offset + header.data_size - 1)
    elif kind == "header-magic":
        _flip(path, 0)
    elif kind == "header-step":
        _flip(path, 16)  # inside the step field
    elif kind == "metadata":
        _flip(path, header.meta_offset + 5)
    elif kind == "chunk-hashes":
        _flip(path, header.end - 1)
    elif kind == "truncated-mid-data":
        os.truncate(path, HEADER_SIZE + 1000)
    elif kind == "truncated-last-byte":
        os.truncate(path, header.end - 1)
    else:
        raise AssertionError(kind)


KINDS = [
    "data",
    "data-last-byte",
    "header-magic",
    "header-step",
    "metadata",
    "chunk-hashes",
    "truncated-mid-data",
    "truncated-last-byte",
]


def _warned_about(caplog: pytest.LogCaptureFixture, path: Path) -> bool:
    return any(
        r.name.startswith(LOGGER) and r.levelno == logging.WARNING and str(path) in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_object_falls_back_to_the_older_step(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        engine.save(2, state_of(2))
    bad = layout.object_path(2, 0)
    corrupt(bad, kind)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, state, source = restore(layout)
    assert (step, source) == (1, "flash")
    assert_state(state, 1)
    assert _warned_about(caplog, bad), caplog.text
    # the corrupt step was forgotten: training goes on from step 1
    with engine_on(layout) as engine:
        assert engine.load(blank()) == 1
        assert engine.save(2, state_of(2))
    step, state, _ = restore(layout)
    assert step == 2
    assert_state(state, 2)


@pytest.mark.parametrize("kind", ["data", "header-step", "metadata", "truncated-mid-data"])
def test_corrupt_only_step_restores_from_the_durable_copy(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    url = (tmp_path / "durable").as_uri()
    with engine_on(layout, durable=DurableTier(url)) as engine:
        engine.save(1, state_of(1), durable=True)
    bad = layout.object_path(1, 0)
    corrupt(bad, kind)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, state, source = restore(layout, durable=DurableTier(url))
    assert (step, source) == (1, "durable")
    assert_state(state, 1)
    assert _warned_about(caplog, bad), caplog.text
    # the downloaded copy is a good flash object now
    step, state, source = restore(layout)
    assert (step, source) == (1, "flash")
    assert_state(state, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_only_step_without_durable_is_an_error_not_a_fresh_start(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
    bad = layout.object_path(1, 0)
    corrupt(bad, kind)
    state = blank()
    state["a"][::1000] = 3.25  # the caller's own values, which nothing may overwrite
    before = snapshot(state)
    for _ in range(2):  # the next attempt finds the same checkpoint, not "nothing": it fails again
        with caplog.at_level(logging.WARNING, logger=LOGGER), engine_on(layout) as engine:
            with pytest.raises(FlashRestoreError, match="failed verification") as info:
                engine.load(state)
            assert engine.restored_from is None
        assert str(bad) in str(info.value) and str(layout.job_dir) in str(info.value)
        assert_unchanged(state, before)
        assert _warned_about(caplog, bad), caplog.text


@pytest.mark.parametrize("kind", ["data", "metadata", "header-step"])
def test_corruption_under_the_live_engine_is_caught_on_load(tmp_path: Path, kind: str) -> None:
    """The engine that wrote a step still maps it; a byte flipped in the file shows through the map."""
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, state_of(1))
        engine.save(2, state_of(2), async_save=True)
        engine.wait()
        corrupt(layout.object_path(2, 0), kind)
        state = blank()
        assert engine.load(state) == 1
        assert_state(state, 1)
        assert engine.save(2, state_of(2))
    step, state, _ = restore(layout)
    assert step == 2
    assert_state(state, 2)


def test_truncation_under_the_live_engine_is_caught_on_load(tmp_path: Path) -> None:
    ctx = mp_context()
    errfile = tmp_path / "child.err"
    child = ctx.Process(target=load_after_truncation, args=(str(tmp_path / "flash"), str(errfile)))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"exit code {child.exitcode}: {child_error(errfile)}"


# found along the way


def test_refused_load_leaves_the_state_untouched(tmp_path: Path) -> None:
    layout = FlashLayout(tmp_path / "flash", JOB)
    with engine_on(layout) as engine:
        engine.save(1, {"meta": {"step": 1}, "a": torch.ones(10)})
    state = {"meta": {"step": -1}, "a": torch.zeros(11)}
    with engine_on(layout) as engine, pytest.raises(ValueError, match="shape"):
        engine.load(state)
    assert state["meta"] == {"step": -1}
    assert torch.equal(state["a"], torch.zeros(11))
