"""Lightning's CheckpointIO contract on flash paths: a committed step is never rewritten, a resume from an
older checkpoint starts a new timeline, storage_options are refused, wrapped IOs are configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import stalwart as sw

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec")  # a deprecation inside Lightning


@pytest.fixture
def lt() -> Iterator[ModuleType]:
    """The Lightning task module; the test process keeps its torch settings."""
    pytest.importorskip("lightning")
    import lightning_tasks

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield lightning_tasks
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["state_dict"].items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saving_a_committed_flash_step_again_is_refused(tmp_path: Path, lt: ModuleType) -> None:
    from stalwart.integrations.lightning import FlashCheckpointIO

    flash = sw.FlashCheckpointer("again", root=tmp_path / "flash", async_save=False)
    io = FlashCheckpointIO(flash)
    model = lt.Regressor()
    trainer = lt.make_trainer(4, [], plugins=[io], enable_checkpointing=False)
    trainer.fit(model)
    trainer.save_checkpoint(io.path(4))
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError, match=r"flash step 4 of job 'again' is already committed") as info:
        trainer.save_checkpoint(io.path(4))
    assert "never rewritten" in str(info.value)
    assert _same(_weights(io.load_checkpoint(io.path(4))), first)  # the committed content is intact


def test_storage_options_on_a_flash_path_are_refused_like_lightnings_own_io(
    tmp_path: Path, lt: ModuleType
) -> None:
    from stalwart.integrations.lightning import FlashCheckpointIO

    flash = sw.FlashCheckpointer("options", root=tmp_path / "flash")
    io = FlashCheckpointIO(flash)
    trainer = lt.make_trainer(2, [], plugins=[io], enable_checkpointing=False)
    trainer.fit(lt.Regressor())
    with pytest.raises(TypeError, match="storage_options") as info:
        trainer.save_checkpoint(io.path(2), storage_options={"compression": "zstd"})
    assert "flash" in str(info.value)
    assert flash.layout.steps() == []  # nothing was saved
    with pytest.raises(TypeError, match="storage_options"):  # a regular path: the wrapped IO says so
        trainer.save_checkpoint(tmp_path / "x.ckpt", storage_options={"compression": "zstd"})


def test_nested_async_io_inside_flash_io_is_configured(tmp_path: Path, lt: ModuleType) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from stalwart.integrations.lightning import FlashCheckpointCallback, FlashCheckpointIO

    flash = sw.FlashCheckpointer("nested", root=tmp_path / "flash")
    inner = AsyncCheckpointIO()
    io = FlashCheckpointIO(flash, AsyncCheckpointIO(inner))
    regular = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = lt.make_trainer(6, [FlashCheckpointCallback(flash, every_n_steps=2), regular], plugins=[io])
    trainer.fit(lt.Regressor())
    assert isinstance(inner.checkpoint_io, TorchCheckpointIO)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"]
    assert torch.load(tmp_path / "ckpt" / files[1], weights_only=False)["global_step"] == 6
    flash.wait()
    assert flash.layout.complete_steps(1) == [4, 6]


def _nudge_callback() -> object:
    """Moves every weight at the start of training, so the new timeline differs from the abandoned one
    even though training is deterministic."""
    import lightning.pytorch as pl

    class Nudge(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(0.125)

    return Nudge()


# the resumed trainer deliberately has no ModelCheckpoint, which Lightning points out
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resuming_from_an_older_checkpoint_file_abandons_newer_flash_steps(
    tmp_path: Path, lt: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stalwart.integrations.lightning import FlashCheckpointCallback
    from stalwart.integrations.state import decode_checkpoint

    flash = sw.FlashCheckpointer("older", root=tmp_path / "flash", every_n_steps=2, keep=10)
    regular = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    lt.make_trainer(10, [FlashCheckpointCallback(flash), regular]).fit(lt.Regressor())
    flash.wait()
    assert flash.layout.complete_steps(1) == [2, 4, 6, 8, 10]

    model = lt.Regressor()
    callbacks = [FlashCheckpointCallback(flash), _nudge_callback()]
    trainer = lt.make_trainer(10, callbacks, enable_checkpointing=False)
    with caplog.at_level(logging.WARNING, logger="stalwart.flash"):
        trainer.fit(model, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")  # steps 6-10 were newer
    flash.close()
    assert trainer.global_step == 10
    warned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(warned) == 1 and "6, 8, 10" in warned[0] and "step 4" in warned[0], warned
    assert flash.layout.complete_steps(1) == [2, 4, 6, 8, 10]
    state: dict = {}
    again = sw.FlashCheckpointer("older", root=tmp_path / "flash")
    assert again.restore(state) == 10
    restored = _weights(decode_checkpoint(state, weights_only=False))
    assert _same(restored, dict(model.state_dict()))  # the new timeline's step 10


def test_resumed_step_is_not_saved_again_while_gradients_accumulate(tmp_path: Path, lt: ModuleType) -> None:
    """After a resume from flash step 4, the first batch of an accumulation window ends at global step 4
    again: the callback skips it (the step is committed) instead of failing."""
    from stalwart.integrations.lightning import FlashCheckpointCallback, resume_checkpoint

    flash = sw.FlashCheckpointer("accumulate", root=tmp_path / "flash", every_n_steps=2, keep=10)
    lt.make_trainer(
        4, [FlashCheckpointCallback(flash)], enable_checkpointing=False, accumulate_grad_batches=2
    ).fit(lt.Regressor())
    flash.close()

    flash = sw.FlashCheckpointer("accumulate", root=tmp_path / "flash", every_n_steps=2, keep=10)
    trainer = lt.make_trainer(
        8, [FlashCheckpointCallback(flash)], enable_checkpointing=False, accumulate_grad_batches=2
    )
    point = resume_checkpoint(trainer)
    assert (point.source, point.step) == ("flash", 4)
    trainer.fit(lt.Regressor(), ckpt_path=point)
    flash.wait()
    assert trainer.global_step == 8
    assert flash.layout.complete_steps(1) == [2, 4, 6, 8]
