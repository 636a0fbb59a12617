"""``LocalCluster``: the nodes of one torch elastic job as processes on this machine.

A node is a torch elastic agent (``python -m torch.distributed.run``) with its own flash root and its
own node key; the agents meet through c10d rendezvous on 127.0.0.1. Losing a node is killing its
agent's process group and wiping its flash root; a restart starts every agent again. With
``min_nodes`` the job is elastic (``--nnodes=MIN:MAX``): a node killed for good leaves the others to
restart without it (``max_restarts``), and a node started later with ``join`` makes them restart with it.
Node 0 hosts the rendezvous store, as a job's master does: the job ends with it, so take others away.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .. import config
from ..checks import int_at_least
from ..runtime.elastic_launch import SHARED_STORE_OFF
from ..runtime.processes import kill_tree

__all__ = ["LocalCluster"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """``nnodes`` agents running ``script`` with ``nproc_per_node`` workers each."""

    def __init__(
        self,
        directory: str | os.PathLike,
        nnodes: int,
        nproc_per_node: int,
        script: str | os.PathLike,
        *args: str,
        env: dict[str, str] | None = None,
        join_timeout: int = 60,
        min_nodes: int | None = None,
        max_restarts: int = 0,
    ) -> None:
        """Args:
        directory: where each node's flash root, logs and the rendezvous live.
        nnodes: the nodes to start (each a torch elastic agent).
        nproc_per_node: workers per node.
        script, args: the worker script and its arguments.
        env: extra environment variables for every worker.
        join_timeout: seconds the rendezvous waits for the other nodes.
        min_nodes: with it, an elastic job of ``min_nodes:nnodes`` nodes, whose nodes may leave
            (``kill``) and join (``join``); None: exactly ``nnodes``.
        max_restarts: worker-group restarts each agent allows.
        """
        if nnodes < 1 or nproc_per_node < 1:
            raise ValueError("nnodes and nproc_per_node must be >= 1")
        if min_nodes is not None and not 1 <= min_nodes <= nnodes:
            raise ValueError(f"min_nodes={min_nodes!r} is not accepted; use 1..nnodes ({nnodes}) or None")
        int_at_least("max_restarts", max_restarts, 0)
        self.directory = Path(directory)
        self.nnodes, self.nproc_per_node = nnodes, nproc_per_node
        self.script, self.args, self.env = str(script), list(args), dict(env or {})
        self.join_timeout = join_timeout
        self.min_nodes, self.max_restarts = min_nodes, max_restarts
        self.agents: dict[int, subprocess.Popen] = {}
        self.round = 0
        self._port = 0
        self._extra: tuple[str, ...] = ()

    def root(self, node: int) -> Path:
        """The flash root of ``node`` (its tmpfs, in a real cluster)."""
        return self.directory / f"node-{node}" / "flash"

    def start(self, *extra_args: str, nodes: int | None = None) -> None:
        """Start every agent, or the first ``nodes`` of them (a new rendezvous: the previous round's
        agents must be gone)."""
        self.round += 1
        self._port, self._extra = free_port(), extra_args
        self.agents = {}
        for node in range(self.nnodes if nodes is None else nodes):
            self.join(node)

    def join(self, node: int) -> None:
        """Start ``node``'s agent in the current round's rendezvous (an elastic job admits it)."""
        if not 0 <= node < self.nnodes or (node in self.agents and self.agents[node].poll() is None):
            raise ValueError(f"node {node} is not one of 0..{self.nnodes - 1} without a running agent")
        port, extra_args = self._port, self._extra
        nnodes = self.nnodes if self.min_nodes is None else f"{self.min_nodes}:{self.nnodes}"
        logs = self.directory / f"node-{node}" / f"round-{self.round}"
        logs.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            config.FLASH_ROOT_ENV: str(self.root(node)),
            config.NODE_ENV: f"node-{node}",
            config.REPLICATION_HOST_ENV: "127.0.0.1",
            "OMP_NUM_THREADS": "1",
        }
        if self.min_nodes is not None:  # else a node that joins is never admitted (``elastic_launch``)
            env.setdefault(SHARED_STORE_OFF, "1")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=job-{self.round}",
            # node 0 hosts the rendezvous store, as a job's master does: else whichever agent bound the
            # port first would, and killing that node would end the job for every other
            f"--rdzv-conf=join_timeout={self.join_timeout},last_call_timeout=2,"
            f"is_host={str(node == 0).lower()}",
            f"--max-restarts={self.max_restarts}",
            "--monitor-interval=0.2",
            "--log-dir",
            str(logs / "workers"),
            "--redirects=3",
            self.script,
            *self.args,
            *extra_args,
        ]
        with open(logs / "agent.log", "wb") as out:
            self.agents[node] = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> dict[int, int]:
        """Exit codes of every agent; agents still running at ``timeout`` are killed (code None -> -9)."""
        deadline = time.monotonic() + timeout
        codes: dict[int, int] = {}
        for node, agent in self.agents.items():
            try:
                codes[node] = agent.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(node)
                codes[node] = agent.wait()
        return codes

    def kill(self, node: int) -> None:
        """SIGKILL a node's agent and every process under it (torch elastic starts workers in sessions
        of their own, so the agent's process group alone would leave them running)."""
        agent = self.agents.get(node)
        if agent is not None:
            kill_tree(agent.pid)
            agent.wait()

    def wipe(self, node: int) -> None:
        """The node is replaced: its flash root is empty."""
        shutil.rmtree(self.root(node), ignore_errors=True)

    def logs(self) -> str:
        """Everything the agents and workers of the newest round printed (for failure messages)."""
        parts = []
        for path in sorted(self.directory.glob(f"node-*/round-{self.round}/**/*")):
            if path.is_file() and path.stat().st_size:
                parts.append(
                    f"--- {path.relative_to(self.directory)}\n{path.read_text(errors='replace')[-4000:]}"
                )
        return "\n".join(parts)

    def stop(self) -> None:
        for node in list(self.agents):
            self.kill(node)
