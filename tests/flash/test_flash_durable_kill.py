"""kill -9 during durable uploads, each restart on an empty flash root: no committed step is ever lost or
rewritten, and what killed uploads leave behind is collected.

Each trial starts a writer on a new, empty flash root (a replaced node): it restores from the durable
store, checks the state, and saves step after step with a durable copy of each, until it is killed at a
random instant, often in the middle of an upload. Then this process checks that the newest step the
writer knew to be durable is still there, restores it bit-exactly on another empty flash root, and
counts what no commit record covers. All trials share one durable store (file:// or S3 on a moto
server, with 5 MiB parts so uploads are multipart), as the restarts of one job do.

``STALWART_DURABLE_KILL_TRIALS`` (default 12 per store, half sync and half async saves) and
``STALWART_KILL_SEED`` set the trials; ``scripts/soak-durable-kill N`` runs many more.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import stalwart as sw
from stalwart.flash.durable import DurableTier

JOB = "job"
N = 2_000_000  # float32 elements: ~8 MB objects, two multipart parts of 5 MiB on S3


def state_of(step: int) -> dict[str, Any]:
    return {"a": torch.full((N,), float(step)), "b": torch.arange(1000) * step, "meta": {"step": step}}


def blank() -> dict[str, Any]:
    return {
        "a": torch.full((N,), -1.0),
        "b": torch.full((1000,), -1, dtype=torch.int64),
        "meta": {"step": -1},
    }


def is_state_of(state: dict[str, Any], step: int) -> bool:
    expected = state_of(step)
    return (
        state["meta"] == expected["meta"]
        and torch.equal(state["a"], expected["a"])
        and torch.equal(state["b"], expected["b"])
    )


def _mp() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stalwart.flash.checkpointer", __name__])
    return ctx


def _writer(
    root: str,
    url: str,
    options: str,
    blocking: bool,
    started: Any,
    durable: Any,
    attempted: Any,
    errfile: str,
) -> None:
    """Restore from the store, then save and upload steps until killed; ``durable`` is the newest step
    this writer knows the store committed."""
    try:
        torch.set_num_threads(1)
        flash = sw.FlashCheckpointer(
            JOB,
            root=root,
            durable=url,
            storage_options=json.loads(options),
            durable_every_n_steps=1,
            async_save=not blocking,
        )
        state = blank()
        step = flash.restore(state) or 0
        if step and not is_state_of(state, step):
            raise AssertionError(f"restored step {step}, but the state is not step {step}'s")
        durable.value = step
        started.set()
        while True:
            step += 1
            attempted.value = step
            flash.save(step, state_of(step))
            uploader = flash.engine.uploader
            if uploader is not None and uploader.uploaded is not None:
                durable.value = uploader.uploaded
    except BaseException:
        Path(errfile).write_text(traceback.format_exc())
        raise


def _leftovers(tier: DurableTier) -> list[str]:
    """Objects of rank 0 that no commit record covers."""
    records = tier.records()
    return [
        name
        for name in tier.store.glob("step-*/rank-00000.obj")
        if 0 not in records.get(int(name.split("/")[0].removeprefix("step-")), {})
    ]


def _open_uploads(tier: DurableTier) -> int:
    """Open multipart uploads under the store (listed, none aborted)."""
    found: list[str] = []
    tier.store.abort_uploads(lambda name: found.append(name) is not None)
    return len(found)


def _trials() -> int:
    raw = os.environ.get("STALWART_DURABLE_KILL_TRIALS", "12")
    if not raw.isdigit() or int(raw) < 2:
        raise ValueError(f"STALWART_DURABLE_KILL_TRIALS={raw!r} is not accepted; use an int >= 2")
    return int(raw)


def _run_trials(tmp_path: Path, url: str, options: dict) -> None:
    total = _trials()
    seed = int(os.environ.get("STALWART_KILL_SEED", "20261201"))
    rng = random.Random(seed)
    ctx = _mp()
    tier = DurableTier(url, options)
    counts = {"killed with an upload unfinished": 0, "restored": 0, "uncommitted objects seen": 0}
    for trial in range(total):
        blocking = trial % 2 == 0
        where = f"trial {trial} ({'sync' if blocking else 'async'}, STALWART_KILL_SEED={seed}, {url})"
        errfile = tmp_path / f"writer-{trial}.err"
        started, durable, attempted = (
            ctx.Event(),
            ctx.Value("q", 0, lock=False),
            ctx.Value("q", 0, lock=False),
        )
        writer = ctx.Process(
            target=_writer,
            args=(
                str(tmp_path / f"node-{trial}"),
                url,
                json.dumps(options),
                blocking,
                started,
                durable,
                attempted,
                str(errfile),
            ),
            daemon=True,
        )
        writer.start()
        try:
            assert started.wait(120), f"{where}: the writer never restored: {_error(errfile)}"
            target = durable.value + rng.randint(1, 4)  # a few steps after the restore, at a random instant
            deadline = time.monotonic() + 120
            while attempted.value < target and writer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            assert writer.is_alive(), f"{where}: the writer died on its own: {_error(errfile)}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer.pid, signal.SIGKILL)
            writer.join(30)
        assert writer.exitcode == -signal.SIGKILL, f"{where}: exit code {writer.exitcode}: {_error(errfile)}"
        known = durable.value
        complete = tier.complete_steps(1)
        assert known == 0 or (complete and complete[-1] >= known), (
            f"{where}: step {known} was committed to the store, which now holds {complete}"
        )
        orphans = _leftovers(tier)
        counts["uncommitted objects seen"] += len(orphans)
        counts["killed with an upload unfinished"] += bool(orphans) or _open_uploads(tier) > 0
        # a replaced node restores the newest committed step, bit-exactly, from the store
        state = blank()
        with sw.FlashCheckpointer(
            JOB, root=tmp_path / f"check-{trial}", durable=url, storage_options=options
        ) as f:
            restored = f.restore(state)
            assert restored == (complete[-1] if complete else None), (
                f"{where}: restored {restored}, store {complete}"
            )
            if restored is not None:
                assert f.restored_from == "durable", where
                assert is_state_of(state, restored), f"{where}: step {restored} did not restore bit-exactly"
                counts["restored"] += 1
    orphans = _leftovers(tier)
    mpus = _open_uploads(tier)
    print(f"\n{total} kill -9 trials during durable uploads to {url} (seed {seed}): {counts}")
    print(
        f"left in the store after the last kill: {len(orphans)} uncommitted object(s), {mpus} open upload(s)"
    )
    # what earlier kills left was collected by the next writer; only the last kill's can remain
    assert len(orphans) <= 1 and mpus <= 1, (orphans, mpus)
    assert counts["restored"] >= total // 2, counts
    # one more upload by this rank collects the rest
    with sw.FlashCheckpointer(
        JOB, root=tmp_path / "final", durable=url, storage_options=options, async_save=False
    ) as flash:
        step = flash.restore(blank()) or 0
        flash.save(step + 1, state_of(step + 1), durable=True)
    orphans = _leftovers(tier)
    assert orphans == [] and _open_uploads(tier) == 0, orphans
    print("left after one more upload: nothing")


def _error(errfile: Path) -> str:
    return errfile.read_text() if errfile.exists() else "(no traceback written)"


def test_kill_9_during_uploads_to_a_file_store(tmp_path: Path) -> None:
    _run_trials(tmp_path, (tmp_path / "durable").as_uri(), {})


def test_kill_9_during_multipart_uploads_to_s3(tmp_path: Path, s3_bucket: tuple[str, dict]) -> None:
    url, options = s3_bucket
    _run_trials(tmp_path, f"{url}/job", {**options, "default_block_size": 5 * 2**20})


@pytest.mark.parametrize("leftover", ["object", "multipart"])
def test_retention_collects_what_a_killed_upload_left(
    tmp_path: Path, s3_bucket: tuple[str, dict], leftover: str
) -> None:
    url, options = s3_bucket
    url = f"{url}/job"
    tier = DurableTier(url, options)
    fs, root = tier.store.fs, tier.store.root
    with sw.FlashCheckpointer(
        JOB, root=tmp_path / "a", durable=url, storage_options=options, async_save=False
    ) as f:
        f.save(1, state_of(1), durable=True)
    # what uploads killed half-way leave: of this rank, and of another rank (not this rank's to collect)
    if leftover == "object":
        fs.pipe_file(f"{root}/step-000000000002/rank-00000.obj", b"half an object")
    else:
        bucket, key, _ = fs.split_path(f"{root}/step-000000000002/rank-00000.obj")
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.pipe_file(f"{root}/step-000000000002/rank-00001.obj", b"another rank's")
    assert _open_uploads(tier) == (leftover == "multipart")
    with sw.FlashCheckpointer(
        JOB, root=tmp_path / "b", durable=url, storage_options=options, async_save=False
    ) as f:
        assert f.restore(blank()) == 1
        f.save(2, state_of(2), durable=True)
        f.save(3, state_of(3), durable=True)
    orphans = _leftovers(tier)
    assert orphans == [] and _open_uploads(tier) == 0
    assert fs.exists(f"{root}/step-000000000002/rank-00001.obj")  # another rank's is left to that rank
    assert tier.complete_steps(1) == [2, 3]
