"""How long the ``stalwart`` command takes to answer, against a bare Python start.

    python benchmarks/cli_startup.py [--repeats 10]

Each row is the median wall time of a fresh process, and its ratio to ``python -c pass`` measured
in the same run. The task's own ``--help`` imports the script (here a tiny one without torch).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = '''
import stalwart as sw
env = sw.TaskEnvironment(name="bench")

@env.task
def train(epochs: int, lr: float = 0.1, layers: list[int] = [64]) -> int:
    """Train nothing."""
    return epochs
'''


def wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, timeout=120)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    repeats = parser.parse_args().repeats
    cli = [sys.executable, "-m", "stalwart.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "bench_tasks.py")
        script.write_text(SCRIPT)
        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("stalwart --version", [*cli, "--version"]),
            ("stalwart --help", [*cli, "--help"]),
            ("stalwart run --help", [*cli, "run", "--help"]),
            ("stalwart run FILE.py TASK --help", [*cli, "run", str(script), "train", "--help"]),
        ]
        results = [(name, wall(argv, repeats)) for name, argv in rows]
    base = results[0][1]
    print(f"| command | median s ({repeats} runs) | x python -c pass |")
    print("|---|---|---|")
    for name, seconds in results:
        print(f"| `{name}` | {seconds:.3f} | {seconds / base:.1f} |")


if __name__ == "__main__":
    main()
