"""Upstream cases that reproduce known stalwart bugs, kept running as strict xfails (an unexpected pass
fails the suite, so the marker goes when the bug is fixed). Both are open work of issue 10:

A. The flash DCP adapter runs collectives of its own inside DCP's steps (the engine's join on a
   writer's first ``write_data``, the survey in ``read_metadata``): a rank that raised before them goes
   on to DCP's gather while the others wait in the adapter's, and every rank dies at the collective
   timeout instead of raising DCP's CheckpointException.
B. After ``dcp.async_save`` with the process executor, the checkpoint process owns the rank (its lock),
   so ``dcp.load`` in the training process is refused ("already written by a live process").
"""

from __future__ import annotations

import pytest

KNOWN = {
    "test_save_error_handling_fail_write_data_2": "bug A: collectives inside write_data",
    "test_load_error_handling_fail_read_metadata_0": "bug A: collectives inside read_metadata",
    "test_load_error_handling_coordinator_1_fail_read_metadata_3": "bug A: collectives inside read_metadata",
    "test_e2e_async_cached_stager_process": "bug B: load after a process-executor save",
    "test_e2e_async_cached_cached_process": "bug B: load after a process-executor save",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name, reason in KNOWN.items():
            if item.name.startswith(name):
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"known stalwart {reason} (issue 10)"))
