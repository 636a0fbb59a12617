from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stalwart.checkpoint.progress import NO_PROGRESS_ENV, TransferProgress, transfer_progress

MiB = 2**20


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _progress_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_PROGRESS_ENV, raising=False)


def test_noop_below_threshold() -> None:
    stream = FakeTTY()
    with transfer_progress("upload ckpt", 10 * MiB, stream=stream) as bar:
        assert type(bar) is TransferProgress
        assert not bar.enabled
        bar.update(4 * MiB)
        bar.update(6 * MiB)
        assert bar.completed == 10 * MiB
    assert stream.getvalue() == ""


def test_noop_when_not_a_tty() -> None:
    stream = io.StringIO()
    with transfer_progress("upload ckpt", 10 * 2**30, stream=stream) as bar:
        assert not bar.enabled
        bar.update(123)
    assert stream.getvalue() == ""


def test_noop_when_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_PROGRESS_ENV, "1")
    stream = FakeTTY()
    with transfer_progress("upload ckpt", 100, threshold=0, stream=stream) as bar:
        assert not bar.enabled
    assert stream.getvalue() == ""


def test_default_stream_is_stderr_and_closed_stream_is_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with transfer_progress("x", 10, threshold=0) as bar:
        assert not bar.enabled
    closed = io.StringIO()
    closed.close()
    with transfer_progress("x", 10, threshold=0, stream=closed) as bar:  # isatty() raises ValueError
        assert not bar.enabled
    with transfer_progress("x", 10, threshold=0, stream=object()) as bar:  # type: ignore[arg-type]
        assert not bar.enabled


def test_bar_renders_description_and_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a fake terminal's width comes from the environment: no wrapping
    stream = FakeTTY()
    total = 100 * MiB
    with transfer_progress("uploading step=12.ckpt [shard 0]", total, stream=stream) as bar:
        assert bar.enabled
        for _ in range(10):
            bar.update(total // 10)
        assert bar.completed == total
    out = stream.getvalue()
    assert "uploading step=12.ckpt [shard 0]" in out  # markup characters are shown literally
    assert "100.0/100.0 MiB" in out or "104.9/104.9 MB" in out


def test_bar_shows_complete_on_clean_exit_even_if_under_reported() -> None:
    stream = FakeTTY()
    with transfer_progress("download", 2 * MiB, threshold=0, stream=stream) as bar:
        bar.update(MiB)
    assert "2.1/2.1 MB" in stream.getvalue() or "2.0/2.0 MiB" in stream.getvalue()


def test_only_one_live_bar_at_a_time() -> None:
    outer_stream, inner_stream = FakeTTY(), FakeTTY()
    with (
        transfer_progress("outer", 10, threshold=0, stream=outer_stream) as outer,
        transfer_progress("inner", 10, threshold=0, stream=inner_stream) as inner,
    ):
        assert outer.enabled and not inner.enabled
    assert inner_stream.getvalue() == ""
    with transfer_progress("after", 10, threshold=0, stream=FakeTTY()) as again:
        assert again.enabled  # released on exit


def test_lock_released_when_body_raises() -> None:
    with pytest.raises(RuntimeError), transfer_progress("boom", 10, threshold=0, stream=FakeTTY()):
        raise RuntimeError("transfer failed")
    with transfer_progress("next", 10, threshold=0, stream=FakeTTY()) as bar:
        assert bar.enabled


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total_bytes"):
        transfer_progress("x", -1).__enter__()
    with pytest.raises(TypeError, match="threshold"):
        transfer_progress("x", 1, threshold=1.5).__enter__()  # type: ignore[arg-type]


def test_updates_from_threads_are_counted() -> None:
    with transfer_progress("threads", 8 * 1000, threshold=0, stream=FakeTTY()) as bar:
        threads = [threading.Thread(target=lambda: [bar.update(1) for _ in range(1000)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bar.completed == 8000


def test_importing_progress_does_not_import_rich_or_fsspec() -> None:
    code = (
        "import sys, stalwart.checkpoint.progress, stalwart.checkpoint.archive, stalwart.checkpoint.latest;"
        "bad = [m for m in ('rich', 'fsspec', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})
