"""The harness of the adapted upstream DCP tests leaves the rest of the suite as it found it."""

from __future__ import annotations

import torch
import upstream_harness  # noqa: F401  (imports torch's test utilities, as the upstream tests do)


def test_importing_the_upstream_tests_leaves_torch_backends_flags_settable() -> None:
    """torch's common_utils freezes torch.backends' flags on import; pytest imports every test module
    before running any test, and Lightning's Trainer then could not set torch.backends.cudnn's flags."""
    assert not torch.backends.flags_frozen()
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not before  # what Lightning's Trainer(benchmark=...) does
    torch.backends.cudnn.benchmark = before
