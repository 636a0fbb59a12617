"""The ``store`` fixture: every test of the task checkpoint runs against file:// and a moto S3 bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_stores import Store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, stalwart_home: Path) -> Store:
    if request.param == "file":
        return Store("file", (tmp_path / "store").as_uri(), None)
    uri, options = request.getfixturevalue("s3_bucket")
    return Store("s3", uri, options)
