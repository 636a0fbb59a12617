"""Megatron-LM on the flash tier: ``stalwart.integrations.megatron`` with a real megatron.core GPTModel
(tiny, from a TransformerConfig, on CPU), real ``dist_checkpointing.save/load``, gloo, and two nodes of
two ranks each as torch elastic agents (LocalCluster: each node its own flash root).

One job saves (tensor parallel inside a node, pipeline parallel across the nodes, so every rank holds
shards no other rank has), node 0 is then wiped (a replacement node with an empty tmpfs), and the job
resumes. The first round also runs the side scenarios, each on a flash job of its own, so that megatron
(slow to import) starts in as few processes as possible; the tests below read what the ranks reported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stalwart.testing import LocalCluster

# looked up, not imported: megatron.core is slow to import and changes torch.load's safe globals, so it
# runs only in the workers
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("needs the megatron extra: pip install 'stalwart[megatron]'", allow_module_level=True)

WORKER = Path(__file__).resolve().parents[1] / "support" / "megatron_workers.py"
NODES, PER_NODE = 2, 2


def _round(cluster: LocalCluster, out: Path, mode: str) -> list[dict]:
    cluster.start(mode)
    codes = cluster.wait(300)
    found = [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-rank*.json"))]
    crashes = [r["crash"] for r in found if "crash" in r]
    assert not any(codes.values()) and len(found) == NODES * PER_NODE, (
        f"{mode} round failed {codes}:\n{''.join(crashes[:1])}\n{cluster.logs()}"
    )
    return sorted(found, key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Save (and the side scenarios), wipe node 0, resume: what every rank reported in each round."""
    tmp = tmp_path_factory.mktemp("megatron")
    out = tmp / "out"
    out.mkdir()
    cluster = LocalCluster(tmp / "cluster", NODES, PER_NODE, WORKER, str(out), str(tmp / "long-term"))
    try:
        saved = _round(cluster, out, "save")
        cluster.wipe(0)  # node 0 is replaced: its tmpfs (rank 0's object, with the global metadata) is gone
        assert not cluster.root(0).exists()
        resumed = _round(cluster, out, "resume")
    finally:
        cluster.stop()
    return {"save": saved, "resume": resumed}


def test_a_wiped_node_resumes_bit_exactly_from_its_peers(job: dict) -> None:
    resumed = job["resume"]
    assert all(r["resumed"]["step"] == 3 for r in resumed), resumed
    assert all(r["exact"] for r in resumed), resumed  # GPT shards, ShardedObjects and common state
    # the replaced node's ranks pulled their objects from node 1 (its replicas); node 1's ranks read
    # everything, their node's copy of the common state included, from their own tmpfs
    sources = {r["rank"]: r["resumed"]["source"] for r in resumed}
    assert sources == {0: "peer", 1: "peer", 2: "flash", 3: "flash"}, sources
    assert all(r["resumed"]["path"].endswith("step-000000000003") for r in resumed)
    assert all(r["latest_after_next_save"] == 4 for r in resumed)  # training went on after the resume


def test_common_state_is_stored_on_every_node(job: dict) -> None:
    """``swm.save``: every rank (local rank 0 of each node among them) stores the common state in its
    own object; Megatron's own ``dist_checkpointing.save`` writes it on global rank 0 only, and the
    strategy carries that copy in rank 0's object."""
    for report in job["save"]:
        assert report["copies"]["3"] == {"0": 0, "1": 1, "2": 2, "3": 3}, report["copies"]
        assert report["copies"]["1"] == {"0": 0}, report["copies"]


def test_async_save_completes_the_step_when_finalized(job: dict) -> None:
    """Step 3 went through ``swm.save(async_save=True)`` and stalwart's AsyncCallsQueue; then Megatron's
    own ``dist_checkpointing.load`` read it straight from each node's step directory."""
    for report in job["save"]:
        assert report["latest_before_finalize"] == 2  # the tensors were copied, the step not yet complete
        assert report["finalized"] == [0]
        assert report["latest"] == 3
        assert report["metadata_json"]  # what dist_checkpointing.load checks, on every node
        assert report["plain_load_exact"]


def test_megatrons_own_queue_cannot_finalize_without_cuda(job: dict) -> None:
    """Why stalwart ships an AsyncCallsQueue: Megatron's puts its collectives on the current CUDA device.
    The save it could not finalize stays incomplete (so the previous state is what a restart loads)."""
    for report in job["save"]:
        assert report["megatron_queue"] == "AssertionError: Torch not compiled with CUDA enabled"
        assert report["megatron_queue_latest"] is None


def test_no_complete_flash_step_falls_back_to_the_regular_checkpoint(job: dict) -> None:
    for report in job["save"]:
        assert report["fallback"]["source"] == "checkpoint" and report["fallback"]["step"] is None
        assert report["fallback"]["path"].endswith("long-term")
        assert report["fallback_exact"]
        assert report["nothing"] is None  # no flash job, no regular checkpoint: a first run


@pytest.mark.parametrize(
    "case,expected",
    [
        ("save_not_a_step", "ValueError: checkpoint_dir="),
        ("save_other_job", "is not a step of flash job 'job'"),
        ("save_rewrite", "ValueError: flash step 2 is not newer than step 3"),
        ("writer_type", "TypeError: writer must be a stalwart FlashStorageWriter; got FlashStorageReader"),
        ("reader_type", "TypeError: reader must be a stalwart FlashStorageReader; got FlashStorageWriter"),
        ("load_regular_with_flash", "holds a 'torch_dist' checkpoint, not a stalwart flash step"),
        ("load_incomplete_step", "flash step 1 of job 'megatron-queue' is not complete on any node"),
        ("long_term_not_a_checkpoint", "is not a distributed checkpoint"),
        ("common_missing", "holds no Megatron common state"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(job: dict, case: str, expected: str) -> None:
    for report in job["save"]:
        assert expected in report["errors"][case], (case, report["errors"][case])
