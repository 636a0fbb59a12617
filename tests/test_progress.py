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


# ---------------------------------------------------------------------------------------------------------
# fsspec adapter
# ---------------------------------------------------------------------------------------------------------


def test_fsspec_callback_api_forwards_bytes() -> None:
    from fsspec.callbacks import Callback

    with transfer_progress("x", 1000, threshold=10**9, stream=FakeTTY()) as bar:
        cb = bar.as_fsspec_callback()
        assert isinstance(cb, Callback)
        cb.set_size(1000)
        cb.relative_update(100)
        cb.relative_update(50)
        assert bar.completed == 150
        cb.absolute_update(400)
        assert bar.completed == 400
        cb.absolute_update(0)  # transfer restarted
        assert bar.completed == 0
        cb.close()


def test_fsspec_local_put_file_drives_bar(tmp_path: Path) -> None:
    from fsspec.implementations.local import LocalFileSystem

    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"z" * 5000)
    stream = FakeTTY()
    fs = LocalFileSystem()
    with (
        transfer_progress("put ckpt.bin", 5000, threshold=0, stream=stream) as bar,
        bar.as_fsspec_callback() as cb,
    ):
        fs.put_file(str(src), str(tmp_path / "copy.bin"), callback=cb)
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    assert bar.enabled
    # LocalFileSystem copies with shutil and never reports bytes; the bar is still completed on exit.
    assert "put ckpt.bin" in stream.getvalue()
    assert "5.0/5.0 kB" in stream.getvalue()


def test_fsspec_generic_put_file_and_get_file_forward_bytes(tmp_path: Path) -> None:
    # MemoryFileSystem uses AbstractFileSystem.put_file/get_file, the code path of s3fs/gcsfs-style backends.
    from fsspec.implementations.memory import MemoryFileSystem

    payload = bytes(range(256)) * 40
    src = tmp_path / "ckpt.bin"
    src.write_bytes(payload)
    fs = MemoryFileSystem()
    fs.blocksize = 1000  # several updates per file
    try:
        with transfer_progress("put", len(payload), threshold=0, stream=FakeTTY()) as bar:
            fs.put_file(str(src), "/bucket/ckpt.bin", callback=bar.as_fsspec_callback())
            assert bar.completed == len(payload)
        with transfer_progress("get", len(payload), threshold=0, stream=FakeTTY()) as bar:
            fs.get_file("/bucket/ckpt.bin", str(tmp_path / "back.bin"), callback=bar.as_fsspec_callback())
            assert bar.completed == len(payload)
        assert (tmp_path / "back.bin").read_bytes() == payload
    finally:
        fs.rm("/bucket", recursive=True)


def test_fsspec_multi_file_put_counts_bytes_not_files(tmp_path: Path) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    src = tmp_path / "shards"
    src.mkdir()
    sizes = [3000, 1, 777]
    for i, size in enumerate(sizes):
        (src / f"shard{i}.pt").write_bytes(b"s" * size)
    fs = MemoryFileSystem()
    try:
        with transfer_progress("put dir", sum(sizes), threshold=10**9, stream=FakeTTY()) as bar:
            fs.put(str(src), "/bucket/ckpt", recursive=True, callback=bar.as_fsspec_callback())
            assert bar.completed == sum(sizes)
    finally:
        fs.rm("/bucket", recursive=True)


def test_noop_progress_callback_is_cheap_and_works() -> None:
    with transfer_progress("x", 10, stream=io.StringIO()) as bar:
        cb = bar.as_fsspec_callback()
        cb.relative_update(10)
        assert bar.completed == 10


def test_importing_progress_does_not_import_rich_or_fsspec() -> None:
    code = (
        "import sys, stalwart.checkpoint.progress, stalwart.checkpoint.archive, stalwart.checkpoint.latest;"
        "bad = [m for m in ('rich', 'fsspec', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})
