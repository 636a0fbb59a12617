"""DCP through the flash tier with ranks spread over nodes: torch elastic agents on localhost, each
node its own flash root (stalwart.testing.LocalCluster), replicas on the next node, a durable copy on
disk. A node is lost by killing its agent and wiping its root; the job restarts and ``dcp.load``
restores each rank bit-exactly, from the cheapest tier that holds what its read plan needs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stalwart.testing import LocalCluster

WORKER = Path(__file__).resolve().parents[2] / "support" / "dcp_node_worker.py"
STEPS = 10
# Steps a node may hold at the end, by the documented memory bound: the writer's keep=2, the step being
# written, 2 while replication lags and 2 while the durable copy does. A rank's retention runs at its own
# saves, replications and uploads: a step another rank's progress made safe afterwards waits for its next.
# Which steps: the newest 2 *safe* ones (replicated everywhere), and under load replication skips steps
# for newer ones, so an old safe step may rightly stay.
HELD = 2 + 1 + 2 + 2


def run_job(tmp_path: Path, nnodes: int, nproc: int, executor: str) -> tuple[LocalCluster, Path]:
    """Save steps 1..STEPS with every node alive, then hold until the test takes nodes away."""
    out = tmp_path / "out"
    out.mkdir(parents=True)
    cluster = LocalCluster(
        tmp_path / "cluster",
        nnodes,
        nproc,
        WORKER,
        str(out),
        (tmp_path / "durable").as_uri(),
        str(STEPS),
        executor,
    )
    cluster.start("--hold")
    deadline = time.monotonic() + 240
    while len(list(out.glob("holding-rank*"))) < nnodes * nproc or not replicated(cluster):
        if time.monotonic() > deadline or any(a.poll() is not None for a in cluster.agents.values()):
            cluster.stop()
            pytest.fail(f"the job did not save and replicate step {STEPS}:\n{cluster.logs()}")
        time.sleep(0.2)
    return cluster, out


def replicated(cluster: LocalCluster) -> bool:
    """Every rank's object of the last step is committed on its own node and the next one (replication
    runs in the background, in the checkpoint process with the process executor)."""
    nnodes, nproc = cluster.nnodes, cluster.nproc_per_node
    for rank in range(nnodes * nproc):
        for node in (rank // nproc, (rank // nproc + 1) % nnodes):
            step_dir = cluster.root(node) / "job" / "steps" / f"step-{STEPS:012d}"
            if not (step_dir / f"rank-{rank:05d}.commit").exists():
                return False
    return True


def reports(out: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{kind}-*.json"))]


def lose_and_restart(cluster: LocalCluster, out: Path, lost: list[int]) -> list[dict]:
    for node in lost:
        cluster.kill(node)
    cluster.stop()  # the survivors' workers fail without their peers
    for node in lost:
        cluster.wipe(node)  # a replacement node starts with an empty tmpfs
    for report in out.glob("*"):
        report.unlink()
    cluster.start()
    codes = cluster.wait(240)
    assert not any(codes.values()), f"restart failed {codes}:\n{cluster.logs()}"
    found = reports(out, "restore")
    assert len(found) == cluster.nnodes * cluster.nproc_per_node, found
    return found


@pytest.mark.parametrize(
    "nnodes,nproc,executor,lost",
    [(2, 2, "sync", [1]), (3, 1, "process", [0]), (2, 2, "thread", [0])],
    ids=["2x2-sync-lose-node-1", "3x1-process-executor-lose-node-0", "2x2-thread-executor-lose-node-0"],
)
def test_a_lost_node_is_restored_from_its_peers(
    tmp_path: Path, nnodes: int, nproc: int, executor: str, lost: list[int]
) -> None:
    cluster, out = run_job(tmp_path, nnodes, nproc, executor)
    latest = {r["latest"] for r in reports(out, "saved")}
    assert latest == {STEPS}, latest  # every node answers "latest complete step" the same way
    for node in range(nnodes):  # retention across nodes: own objects and replicas alike
        held = {int(p.parent.name[5:]) for p in (cluster.root(node) / "job" / "steps").glob("*/*.commit")}
        assert held and len(held) <= HELD, (node, sorted(held))
    found = lose_and_restart(cluster, out, lost)
    assert all(r["restored"] == STEPS and r["exact"] for r in found), found
    assert all(set(r["sources"]) <= {"flash", "peer"} for r in found), found  # no durable read
    # the replaced node pulled from its peers what its ranks read; what one of its ranks pulled first
    # and kept (its own object) another of its ranks then found on the node
    replaced = [r for r in found if r["node"] in {f"node-{n}" for n in lost}]
    assert replaced and "peer" in {s for r in replaced for s in r["sources"]}, replaced
    # training went on from there: 2 more steps, saved through the same executor on every node
    assert {r["latest"] for r in reports(out, "saved")} == {STEPS + 2}


def test_every_node_lost_falls_back_to_the_durable_copy(tmp_path: Path) -> None:
    cluster, out = run_job(tmp_path, 2, 2, "sync")
    found = lose_and_restart(cluster, out, [0, 1])
    # durable every 2nd step: the newest step is durable, loaded whole from the store
    assert all(r["restored"] == STEPS and r["exact"] for r in found), found
    sources = {s for r in found for s in r["sources"]}
    assert "durable" in sources and sources <= {"durable", "flash"}, found  # flash: fetched by a node-mate


RESHARD = Path(__file__).resolve().parents[2] / "support" / "dcp_reshard_worker.py"


def _round(tmp_path: Path, nnodes: int, nproc: int, mode: str) -> list[dict]:
    out = tmp_path / f"out-{mode}-{nnodes}x{nproc}"
    out.mkdir()
    cluster = LocalCluster(
        tmp_path / "cluster", nnodes, nproc, RESHARD, str(out), (tmp_path / "durable").as_uri(), mode
    )
    cluster.start()
    codes = cluster.wait(240)
    assert not any(codes.values()), f"{mode} failed {codes}:\n{cluster.logs()}"
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-rank*.json"))]


@pytest.mark.parametrize(
    "load_nodes,load_nproc,wiped,tiers",
    [(3, 2, [1], {"flash", "peer"}), (2, 1, [0, 1], {"flash", "durable"})],
    ids=["4-ranks-to-6-node-replaced-from-peers", "4-ranks-to-2-every-node-replaced-from-durable"],
)
def test_dtensors_saved_by_one_world_load_resharded_into_another(
    tmp_path: Path, load_nodes: int, load_nproc: int, wiped: list[int], tiers: set[str]
) -> None:
    """Saved by 2 nodes x 2 ranks with one set of placements; nodes replaced; loaded by another number of
    ranks with other placements: each rank reads the shards its plan needs from the cheapest tier that
    holds them (its node, a peer, the durable store), bit-exactly."""
    assert len(_round(tmp_path, 2, 2, "save")) == 4
    for node in wiped:
        LocalCluster(tmp_path / "cluster", 2, 2, RESHARD).wipe(node)
    found = _round(tmp_path, load_nodes, load_nproc, "load")
    assert len(found) == load_nodes * load_nproc
    assert all(r["exact"] for r in found), found
    sources = {s for r in found for s in r["sources"]}
    assert sources <= tiers and tiers - {"flash"} <= sources, found
