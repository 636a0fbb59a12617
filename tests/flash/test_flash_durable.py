"""The flash tier's durable copy under faults: nothing lost, nothing rewritten, nothing unbounded.

Through the public FlashCheckpointer with real parts: a file:// store, a moto S3 server on loopback that
the test stops and starts again (an outage), and a 64 MiB tmpfs of its own (a full flash root).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import stalwart as sw
from stalwart.flash.durable import DurableTier

MiB = 2**20
LOGGER = "stalwart.flash"


def state_of(step: int, n: int = 2 * MiB) -> dict[str, Any]:
    """Every byte depends on the step (n float32 elements: 8 MiB by default)."""
    return {"w": torch.full((n,), float(step)), "meta": {"step": step}}


def blank(n: int = 2 * MiB) -> dict[str, Any]:
    return {"w": torch.full((n,), -1.0), "meta": {"step": -1}}


def assert_step(state: dict[str, Any], step: int) -> None:
    assert state["meta"] == {"step": step}
    assert bool((state["w"] == float(step)).all()), f"the tensor is not step {step}'s"


def _flip_data_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(4096 + 12345)
        byte = fh.read(1)
        fh.seek(4096 + 12345)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job_bytes(flash: sw.FlashCheckpointer) -> int:
    """tmpfs pages this job holds on this node (every buffer, free or committed). Retention and the
    background commit go on meanwhile: a file listed, then dropped before its lstat, holds nothing."""
    total = 0
    for folder, _, files in os.walk(flash.job_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


# 1. restore takes the newest intact step of any tier; committed durable steps are never rewritten


def test_restore_takes_the_newest_intact_step_of_any_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = (tmp_path / "durable").as_uri()
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, durable_every_n_steps=2) as flash:
        for step in range(1, 5):  # flash keeps 3 and 4; the durable store holds 2 and 4
            flash.save(step, state_of(step))
    _flip_data_byte(flash.layout.object_path(4, 0))
    durable_object = tmp_path / "durable" / "step-000000000004" / "rank-00000.obj"
    before = _digest(durable_object)

    state = blank()
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, durable_every_n_steps=2) as flash,
    ):
        # not step 3 from tmpfs: the durable store holds step 4 intact
        assert flash.restore(state) == 4 and flash.restored_from == "durable"
        assert_step(state, 4)
        for step in range(5, 7):  # training goes on; step 6 goes to the durable store
            flash.save(step, state_of(step))
    assert "not loading step 4 from tmpfs" in caplog.text
    assert _digest(durable_object) == before  # the committed durable step 4 was not rewritten
    assert DurableTier(url).complete_steps(1) == [4, 6]
    with sw.FlashCheckpointer("job", root=tmp_path / "flash") as flash:
        state = blank()
        assert flash.restore(state) == 6 and flash.restored_from == "flash"
        assert_step(state, 6)


def test_an_upload_never_rewrites_a_committed_durable_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = (tmp_path / "durable").as_uri()
    with sw.FlashCheckpointer("job", root=tmp_path / "a", durable=url, async_save=False) as flash:
        flash.save(1, state_of(1), durable=True)
    committed = tmp_path / "durable" / "step-000000000001" / "rank-00000.obj"
    before = _digest(committed)
    # another process of the same job on a fresh flash root, saving without restoring first
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        flash = sw.FlashCheckpointer("job", root=tmp_path / "b", durable=url, async_save=False)
        assert flash.save(1, state_of(7), durable=True)  # the flash save is made...
        with pytest.raises(sw.FlashError, match="already holds a committed step 1 of rank 0"):
            flash.close()  # ...the durable copy is refused, and close() says so
    assert "already holds a committed step 1" in caplog.text
    assert _digest(committed) == before
    state = blank()
    with sw.FlashCheckpointer("job", root=tmp_path / "c", durable=url) as again:
        assert again.restore(state) == 1
    assert_step(state, 1)


def test_a_restore_drops_the_durable_steps_of_the_abandoned_timeline(tmp_path: Path) -> None:
    url = (tmp_path / "durable").as_uri()
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, async_save=False) as flash:
        flash.save(1, state_of(1), durable=True)
        flash.save(2, state_of(2), durable=True)
    # step 2's durable copy is corrupt and its flash copy is gone: step 1 is the newest intact state
    (tmp_path / "flash" / "job").rename(tmp_path / "lost")
    _flip_data_byte(tmp_path / "durable" / "step-000000000002" / "rank-00000.obj")
    state = blank()
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, async_save=False) as flash:
        assert flash.restore(state) == 1
        assert_step(state, 1)
        assert DurableTier(url).complete_steps(1) == [1]  # the corrupt step 2 is gone: a new 2 can be saved
        flash.save(2, state_of(22), durable=True)
    with sw.FlashCheckpointer("job", root=tmp_path / "fresh", durable=url) as flash:
        state = blank()
        assert flash.restore(state) == 2 and flash.restored_from == "durable"
        assert bool((state["w"] == 22.0).all())


# 2. a checkpoint that exists but cannot be read is an error, never "no checkpoint"


def test_no_room_for_the_durable_copy_is_an_error_not_a_fresh_start(
    small_tmpfs: Path, tmp_path: Path
) -> None:
    url = (tmp_path / "durable").as_uri()
    n = 6 * MiB  # 24 MiB of float32
    with sw.FlashCheckpointer("job", root=tmp_path / "big", durable=url, async_save=False) as flash:
        flash.save(3, state_of(3, n), durable=True)
    filler = small_tmpfs / "filler"  # another tenant of the node's tmpfs leaves 16 MiB
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 48 * MiB)
    state = blank(n)
    with sw.FlashCheckpointer("job", root=small_tmpfs, durable=url) as flash:
        with pytest.raises(
            sw.FlashRestoreError, match=r"step 3 .* could not be read.*no room in the flash root"
        ):
            flash.restore(state)
        assert flash.restored_from is None
    assert state["meta"] == {"step": -1}  # nothing was half-loaded
    filler.unlink()  # once there is room, the same restore works
    with sw.FlashCheckpointer("job", root=small_tmpfs, durable=url) as flash:
        assert flash.restore(state) == 3 and flash.restored_from == "durable"
    assert_step(state, 3)


@pytest.mark.parametrize("damage", ["unknown-field", "truncated"])
def test_a_commit_record_that_cannot_be_read_is_an_error_and_its_object_is_kept(
    tmp_path: Path, damage: str
) -> None:
    url = (tmp_path / "durable").as_uri()
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, async_save=False) as flash:
        flash.save(10, state_of(10, 1000), durable=True)
    for record in (
        tmp_path / "durable" / "step-000000000010" / "rank-00000.commit",
        flash.layout.commit_path(10, 0),
    ):
        raw = record.read_bytes()
        # a record from a newer stalwart (a field this one does not know), or a damaged one
        record.write_bytes(raw[:-1] + b',"timeline":"x"}' if damage == "unknown-field" else raw[:20])
    objects = [tmp_path / "durable" / "step-000000000010" / "rank-00000.obj", flash.layout.object_path(10, 0)]
    for root in (tmp_path / "flash", tmp_path / "new-node"):  # from tmpfs, and on an empty flash root
        again = sw.FlashCheckpointer("job", root=root, durable=url)
        with pytest.raises(sw.FlashRestoreError, match="commit records that cannot be read"):
            again.restore(blank(1000))
        again.close()
        assert all(path.exists() for path in objects)  # evidence: never taken for a leftover


def test_a_durable_outage_during_a_restore_never_drops_a_newer_durable_step(
    tmp_path: Path, flaky_s3: tuple[_FlakyS3, str, dict]
) -> None:
    server, url, options = flaky_s3
    with sw.FlashCheckpointer(
        "job", root=tmp_path / "flash", durable=url, storage_options=options, async_save=False
    ) as flash:
        flash.save(10, state_of(10), durable=True)
        flash.save(20, state_of(20), durable=True)
    _flip_data_byte(flash.layout.object_path(20, 0))
    server.down()  # the store cannot be listed during the restore
    again = sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, storage_options=options)
    # not step 10 from tmpfs: the store, which holds 20 intact, could not be asked
    with pytest.raises(sw.FlashRestoreError, match=r"step 20 .* could not be listed"):
        again.restore(blank())
    again.close()
    server.up()
    assert DurableTier(url, options).complete_steps(1) == [10, 20]  # nothing dropped
    state = blank()
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, storage_options=options) as again:
        assert again.restore(state) == 20 and again.restored_from == "durable"
    assert_step(state, 20)


def test_nothing_anywhere_is_none(tmp_path: Path) -> None:
    with sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=(tmp_path / "d").as_uri()) as flash:
        assert flash.restore(blank(10)) is None and flash.restored_from is None


_TWO_RANKS = """
import sys, torch, torch.distributed as dist, stalwart as sw
dist.init_process_group("gloo")
flash = sw.FlashCheckpointer("job", root=sys.argv[1], durable=sys.argv[2], async_save=False)
flash.save(5, {"w": torch.full((10,), float(dist.get_rank()))}, durable=True)
flash.close()
dist.destroy_process_group()
"""


def test_a_checkpoint_of_another_world_size_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    url = (tmp_path / "durable").as_uri()
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
            str(tmp_path / "flash"),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for root in (tmp_path / "flash", tmp_path / "elsewhere"):  # from tmpfs, and from the durable store
        flash = sw.FlashCheckpointer("job", root=root, durable=url, rank=0, world_size=1)
        with pytest.raises(sw.FlashRestoreError, match=r"holds step 5 .* saved by 2 ranks"):
            flash.restore({"w": torch.empty(10)})
        flash.close()
    assert DurableTier(url).complete_steps(2) == [5]  # nothing of it was dropped


# 3. a durable outage: the flash save always happens, memory stays bounded, the lag is said


class _FlakyS3:
    """A moto S3 server of this test's own, on one port, that can go down and come back."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server_class = ThreadedMotoServer
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: Any = None
        self.up()

    def up(self) -> None:
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def down(self) -> None:
        self.server.stop()


@pytest.fixture
def flaky_s3(s3_endpoint: str) -> Iterator[tuple[_FlakyS3, str, dict]]:
    """(server, bucket URL, storage options) with few retries, so an outage fails fast."""
    import s3fs

    pytest.importorskip("moto")
    server = _FlakyS3()
    options = {
        "endpoint_url": server.endpoint,
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}},
    }
    bucket = f"outage-{os.getpid()}-{server.port}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    try:
        yield server, f"s3://{bucket}/job", options
    finally:
        server.down()


def test_a_durable_outage_costs_no_save_and_no_unbounded_memory(
    tmp_path: Path, flaky_s3: tuple[_FlakyS3, str, dict], caplog: pytest.LogCaptureFixture
) -> None:
    server, url, options = flaky_s3
    keep, steps = 2, 30
    flash = sw.FlashCheckpointer(
        "job",
        root=tmp_path / "flash",
        durable=url,
        storage_options=options,
        keep=keep,
        durable_every_n_steps=1,
    )
    flash.save(1, state_of(1))
    flash.wait()  # step 1 reached the store
    object_size = flash.layout.object_path(1, 0).stat().st_size
    server.down()
    peak = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(2, steps + 1):
            assert flash.save(step, state_of(step))  # never raises for the durable store
            peak = max(peak, _job_bytes(flash))
        with pytest.raises(sw.FlashError, match=r"the durable copy of flash step .* failed"):
            flash.wait()  # the lag is an error here, once
        flash.wait()
    lag_warnings = [r.getMessage() for r in caplog.records if "the durable copy lags" in r.getMessage()]
    assert lag_warnings, caplog.text
    # keep + 1 buffers, plus one uploading and the newest waiting: never one per step
    assert peak <= (keep + 3) * object_size + MiB, (peak, object_size)
    assert flash.layout.complete_steps(1) == [steps - 1, steps]  # every flash save was made

    # a new process on an empty flash root cannot tell whether a checkpoint exists: an error, not None
    other = sw.FlashCheckpointer("job", root=tmp_path / "empty", durable=url, storage_options=options)
    with pytest.raises(sw.FlashRestoreError, match="could not be listed"):
        other.restore(blank())
    other.close()

    server.up()  # the store is back: the next durable save catches up
    flash.save(steps + 1, state_of(steps + 1))
    flash.wait()
    assert flash.engine.uploader is not None and flash.engine.uploader.lag == 0
    flash.close()
    assert DurableTier(url, options).complete_steps(1)[-1] == steps + 1


def test_on_durable_error_raise_raises_after_the_flash_save(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the durable store's directory should be")
    flash = sw.FlashCheckpointer(
        "job", root=tmp_path / "flash", durable=blocker.as_uri(), async_save=False, on_durable_error="raise"
    )
    with pytest.raises(sw.FlashError, match="durable copy of flash step 1"):
        flash.save(1, state_of(1, 10), durable=True)
    assert flash.layout.complete_steps(1) == [1]  # the flash save was made all the same
    flash.save(2, state_of(2, 10))
    flash.close()
    with pytest.raises(ValueError, match="on_durable_error='sometimes' is not accepted"):
        sw.FlashCheckpointer("job", root=tmp_path, on_durable_error="sometimes")


# 4. what a configuration needs is predictable, and checked at the first save


def test_sync_saves_with_a_durable_copy_hold_keep_plus_one_buffers(tmp_path: Path) -> None:
    url = (tmp_path / "durable").as_uri()
    with sw.FlashCheckpointer(
        "job", root=tmp_path / "flash", durable=url, async_save=False, keep=2, durable_every_n_steps=1
    ) as flash:
        for step in range(1, 8):
            flash.save(step, state_of(step, 100_000))
            buffers = list(flash.job_dir.glob("pool/rank-00000/buf-*")) + list(
                flash.job_dir.glob("steps/*/*.obj")
            )
            assert len(buffers) <= 3, (step, buffers)  # keep + 1, whatever the uploads do
            assert DurableTier(url).complete_steps(1)[-1] == step  # uploaded before save returned


def test_a_flash_root_too_small_for_the_configuration_fails_the_first_save(small_tmpfs: Path) -> None:
    n = 6 * MiB  # 24 MiB objects: keep=2 needs 72 MiB, the tmpfs has 64
    with sw.FlashCheckpointer("job", root=small_tmpfs, keep=2) as flash:
        with pytest.raises(sw.FlashSpaceError, match=r"need 72\.\d MiB .*keep=2 \+ 1 objects of 24\.\d MiB"):
            flash.save(1, state_of(1, n))
        assert not flash.layout.steps() and not list(flash.job_dir.glob("pool/*/buf-*"))  # nothing written
    with sw.FlashCheckpointer("job", root=small_tmpfs, keep=1) as flash:  # keep=1 fits: 48 MiB
        assert flash.save(1, state_of(1, n))


def test_flash_errors_are_exported_and_catchable_by_name() -> None:
    assert issubclass(sw.FlashSpaceError, sw.FlashError) and issubclass(sw.FlashSpaceError, OSError)
    assert issubclass(sw.FlashRestoreError, sw.FlashError)


def test_a_failure_after_an_upload_does_not_stop_the_uploader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Housekeeping after an upload (retention) that raises must not kill the uploading thread: wait(),
    load() and close() would then wait for it forever."""
    import threading

    url = (tmp_path / "durable").as_uri()
    flash = sw.FlashCheckpointer("job", root=tmp_path / "flash", durable=url, durable_every_n_steps=1)
    flash.save(1, state_of(1, 1000))
    flash.wait()
    store = flash.engine.shelf
    retain = store.retain
    calls = {"n": 0}

    def fails_once() -> None:  # in the uploader's thread, after its upload
        if threading.current_thread().name == "stalwart-durable" and not calls["n"]:
            calls["n"] += 1
            raise OSError("retention failed")
        retain()

    monkeypatch.setattr(store, "retain", fails_once)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        flash.save(2, state_of(2, 1000))
        waiter = threading.Thread(target=flash.wait, daemon=True)
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive(), "wait() hangs: the uploader thread died"
        flash.save(3, state_of(3, 1000))  # the uploader still uploads
        flash.close()
    assert calls["n"] == 1 and "retention failed" in caplog.text
    assert DurableTier(url).complete_steps(1)[-1] == 3
