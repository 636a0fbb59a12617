"""An elastic job (``--nnodes=1:3``) that loses a node for good, or gains one, resumes at its new world
size from the flash tier and its peers, bit-exactly: replicated state (DDP) through
``FlashCheckpointer(reshard="replicated")``, sharded state (DTensor) through DCP's planner."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from stalwart.testing import LocalCluster

WORKER = str(Path(__file__).resolve().parents[1] / "support" / "elastic_reshard_worker.py")


def _progress(out: Path) -> dict | None:
    try:
        return json.loads((out / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for(
    check: Callable[[], bool],
    cluster: LocalCluster,
    what: str,
    timeout: float = 180,
    live: list | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    agents = [cluster.agents[node] for node in (cluster.agents if live is None else live)]
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{cluster.logs()}"
        assert all(a.poll() is None for a in agents), f"an agent ended early:\n{cluster.logs()}"
        time.sleep(0.2)


def _training_at(out: Path, world: int, step: int) -> Callable[[], bool]:
    def check() -> bool:
        progress = _progress(out)
        return progress is not None and progress["world"] == world and progress["step"] >= step

    return check


def _run(
    tmp_path: Path, start_nodes: int, change: Callable[[LocalCluster], None], end_world: int
) -> list[dict]:
    """Train on ``start_nodes`` nodes, ``change`` the cluster, let the new world train a few steps."""
    out = tmp_path / "out"
    out.mkdir()
    cluster = LocalCluster(tmp_path / "cluster", 3, 1, WORKER, str(out), min_nodes=1, max_restarts=4)
    cluster.start(nodes=start_nodes)
    try:
        _wait_for(_training_at(out, start_nodes, 4), cluster, f"{start_nodes} nodes to train")
        change(cluster)
        live = [node for node, agent in cluster.agents.items() if agent.poll() is None]
        _wait_for(_training_at(out, end_world, 1), cluster, f"{end_world} nodes to train", live=live)
        last = _progress(out)["step"] + 4
        (out / "last.json").write_text(json.dumps(last))
        codes = cluster.wait(300)
    finally:
        cluster.stop()
    assert all(codes[node] == 0 for node in live), f"{codes}\n{cluster.logs()}"
    progress = _progress(out)
    assert progress == {**progress, "step": last, "world": end_world}, f"{codes}\n{cluster.logs()}"
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("restore-*.json"))]
    resumed = [r for r in reports if r["step"]]
    assert resumed, reports
    for r in resumed:  # every resume, at whatever world size, is bit-exact in both kinds of state
        assert r["exact"] and r["table_exact"], reports
    return resumed


def test_a_node_leaves_for_good_and_the_two_left_resume_from_flash(tmp_path: Path) -> None:
    resumed = _run(tmp_path, 3, lambda cluster: cluster.kill(2), end_world=2)
    at_two = [r for r in resumed if r["world"] == 2]
    assert {r["rank"] for r in at_two} == {0, 1}, resumed
    # the step came from a world of 3 (or of 1, if one node was alone at a rendezvous in between)
    assert all(r["saved_by"] in (1, 3) and r["saved_by"] != r["world"] for r in resumed), resumed
    assert any(r["saved_by"] == 3 for r in resumed), resumed
    # no durable store: everything came from tmpfs, this node's or a peer's
    assert {r["source"] for r in resumed} <= {"flash", "peer"}, resumed
    assert {s for r in resumed for s in r["table_sources"]} <= {"flash", "peer"}, resumed


def test_a_node_joins_and_the_three_resume_with_its_empty_tmpfs_filled_from_peers(tmp_path: Path) -> None:
    resumed = _run(tmp_path, 2, lambda cluster: cluster.join(2), end_world=3)
    at_three = [r for r in resumed if r["world"] == 3]
    assert {r["rank"] for r in at_three} == {0, 1, 2} and all(r["saved_by"] == 2 for r in at_three), resumed
    newcomer = [r for r in at_three if r["node"] == "node-2"]
    assert newcomer and newcomer[0]["source"] == "peer", resumed  # its flash root was empty
    assert "peer" in newcomer[0]["table_sources"], resumed
