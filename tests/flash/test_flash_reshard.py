"""A flash job that comes back with another number of ranks: replicated state restores from saved rank
0's object on every rank, from the node's tmpfs, a peer or the durable store, bit-exactly; the old
world's objects then go; without ``reshard`` (or into state that cannot take it) a clear error
(spawned gloo ranks, one per node)."""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import reshard_workers
from processes import run_all

import stalwart as sw
from stalwart.testing.cluster import free_port


def _round(tmp_path: Path, name: str, mode: str, nodes: list[int], **options: object) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    port, world = free_port(), len(nodes)
    target = functools.partial(reshard_workers.run, mode=mode, nodes=nodes, options=options)
    procs = [
        ctx.Process(target=target, args=(rank, world, port, str(tmp_path), str(out)), daemon=True)
        for rank in range(world)
    ]
    run_all(procs, 240, "rank processes")
    results = [json.loads((out / f"result-{rank}.json").read_text()) for rank in range(world)]
    assert all(r.get("raised") != "worker" for r in results), results
    return results


@pytest.mark.parametrize(
    "saved,loaded,wiped,sources",
    [
        ([0, 1, 2], [0, 1], [], ["flash", "flash"]),  # node 2 left for good
        ([0, 1], [0, 1, 2], [], ["flash", "flash", "peer"]),  # node 2 joined, empty
        ([0, 1, 2], [0, 1], [0], ["peer", "flash"]),  # node 2 left and node 0 was replaced
    ],
    ids=["3-to-2-node-left", "2-to-3-node-joined", "3-to-2-node-left-and-one-replaced"],
)
def test_replicated_state_resumes_at_another_world_size_from_flash_and_peers(
    tmp_path: Path, saved: list[int], loaded: list[int], wiped: list[int], sources: list[str]
) -> None:
    _round(tmp_path, "save", "save", saved)
    for node in wiped:
        shutil.rmtree(tmp_path / f"node-{node}")
    results = _round(tmp_path, "load", "load", loaded, reshard="replicated")
    assert [r["step"] for r in results] == [3] * len(loaded), results
    assert all(r["exact"] for r in results), results
    assert [r["saver"] for r in results] == [0] * len(loaded)  # saved rank 0's object, on every rank
    assert [r["source"] for r in results] == sources
    assert all(r["draw"] == results[0]["draw"] for r in results)  # rank 0's generators everywhere
    # the steps of the new world win over the old world's, and once one is safe the old world's go
    assert all(r["again"] == 5 and r["again_exact"] for r in results), results
    assert all(r["other_after_save"] == [] for r in results), results
    if len(saved) > len(loaded):  # node 1 took part in both: it held the old world until then
        assert results[1]["other_after_restore"], results


def test_every_node_replaced_restores_replicated_state_from_the_durable_store(tmp_path: Path) -> None:
    durable = (tmp_path / "durable").as_uri()
    _round(tmp_path, "save", "save", [0, 1, 2], durable=durable)
    for node in range(3):
        shutil.rmtree(tmp_path / f"node-{node}")
    results = _round(tmp_path, "load", "load", [0, 1], durable=durable, reshard="replicated")
    assert [(r["step"], r["source"], r["exact"], r["saver"]) for r in results] == [
        (3, "durable", True, 0)
    ] * 2


def test_without_reshard_another_world_size_is_a_clear_error(tmp_path: Path) -> None:
    _round(tmp_path, "save", "save", [0, 1, 2])
    results = _round(tmp_path, "load", "load", [0, 1])
    assert all(r.get("raised") == "FlashRestoreError" for r in results), results
    message = results[0]["message"]
    assert "step 3" in message and "saved by 3 ranks" in message and "reshard='replicated'" in message
    assert (tmp_path / "node-0" / "flash" / "job" / "steps" / "step-000000000003" / "rank-00000.obj").exists()


def test_state_that_cannot_take_the_saved_shapes_is_refused_naming_them(tmp_path: Path) -> None:
    _round(tmp_path, "save", "save", [0, 1, 2])
    results = _round(tmp_path, "load", "load", [0, 1], reshard="replicated", shape=[128, 64])
    assert all(r.get("raised") in ("ValueError", "FlashRestoreError") for r in results), results
    by_rank = {r["raised"]: r["message"] for r in results}
    message = by_rank.get("ValueError", "")
    assert "saved by 3 ranks" in message and "[256, 64]" in message and "[128, 64]" in message, results


def test_reshard_argument_is_checked(tmp_path: Path) -> None:
    flash = sw.FlashCheckpointer("job", root=tmp_path, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"reshard='sharded' is not accepted; use None .* or 'replicated'"):
        flash.restore({}, reshard="sharded")
    flash.close()


def test_sharded_state_of_another_global_shape_is_refused_by_dcp_naming_both(tmp_path: Path) -> None:
    """Sharded state reshards through DCP's planner, which refuses a tensor whose global shape changed."""
    import torch
    import torch.distributed.checkpoint as dcp

    writer = sw.FlashStorageWriter("job", root=tmp_path)
    dcp.save({"table": torch.zeros(36, 8)}, checkpoint_id=1, storage_writer=writer)
    writer.close()
    reader = sw.FlashStorageReader("job", root=tmp_path)
    # DCP raises CheckpointException, a BaseException, with the planner's ValueError inside
    with pytest.raises(
        BaseException, match=r"saved torch.Size\(\[36, 8\]\) and current: torch.Size\(\[40, 8\]\)"
    ):
        dcp.load({"table": torch.zeros(40, 8)}, checkpoint_id=1, storage_reader=reader)
    reader.close()
