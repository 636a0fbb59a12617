"""Shared fixtures: an isolated stalwart home per test and a real S3 API (moto server) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Helper modules (task files, worker scripts, ``processes``) import by bare name, in the tests and in
# the attempt processes they start (which inherit sys.path): they live in tests/support/.
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


@pytest.fixture
def stalwart_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh STALWART_HOME (run records, logs, default checkpoint store) for one test."""
    home = tmp_path / "stalwart-home"
    monkeypatch.setenv("STALWART_HOME", str(home))
    monkeypatch.delenv("STALWART_CHECKPOINT_STORE", raising=False)
    monkeypatch.delenv("STALWART_STORAGE_OPTIONS", raising=False)
    monkeypatch.setenv("STALWART_NO_PROGRESS", "1")
    monkeypatch.setenv("STALWART_FLASH_ROOT", str(tmp_path / "flash"))
    return home


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session (as s3fs's own tests run it)."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> tuple[str, dict]:
    """A new empty bucket: (``s3://bucket``, storage_options for fsspec)."""
    import s3fs

    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing", secret="testing")
    bucket = f"stalwart-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}", options


@pytest.fixture
def run_example(tmp_path: Path):
    """Run ``examples/NAME`` as a user would: a fresh interpreter, its own home and flash root."""
    examples = Path(__file__).resolve().parents[1] / "examples"

    def run(name: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "STALWART_HOME": str(tmp_path / "home"),
            "STALWART_FLASH_ROOT": str(tmp_path / "flash"),
            "TMPDIR": str(tmp_path),
        }
        proc = subprocess.run(
            [sys.executable, str(examples / name)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    return run


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a 64 MiB tmpfs to fill up ({exc}); needs root or CAP_SYS_ADMIN")
    if done.returncode:
        pytest.skip(
            f"cannot mount a 64 MiB tmpfs to fill up ({done.stderr.strip() or done.returncode}); "
            "needs root or CAP_SYS_ADMIN"
        )
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)
