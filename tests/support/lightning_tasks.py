"""A small Lightning training run as a stalwart task by tests/integrations/test_integration_lightning.py."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from processes import sigkill_after_events
from torch import nn

import stalwart as sw
from stalwart.integrations.lightning import FlashCheckpointCallback, SyncedModelCheckpoint, resume_checkpoint

env = sw.TaskEnvironment(name="lightning-tests")

STEPS_PER_EPOCH = 16


def make_batch(step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


class StepBatches:
    """Batch k of the training is a function of k alone, and each pass runs from the trainer's global step
    to the end of its epoch: the loader resumes mid-epoch exactly (as Megatron's sampler resumes from the
    consumed samples). Its position is the global step, which the checkpoint holds already."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __len__(self) -> int:
        return STEPS_PER_EPOCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self.module.trainer.global_step
        for step in range(start, (start // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH):
            yield make_batch(step)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Regressor(pl.LightningModule):
    def __init__(self, dropout: float = 0.1, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> StepBatches:
        return StepBatches(self)


class Crash(pl.Callback):
    """Dies by SIGKILL after global step ``at``, once the flash save of that step committed."""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            self.flash.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(max_steps: int, callbacks: list, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        **{"logger": False, **kwargs},
    )


def uninterrupted(max_steps: int = 60) -> list[torch.Tensor]:
    """The twin: the same training with no checkpoint at all (saves neither change weights nor RNG)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    make_trainer(max_steps, [], enable_checkpointing=False).fit(model)
    return [p.detach().clone() for p in model.parameters()]


@env.task(retries=3)
def fit(max_steps: int = 60, crashes: str = "35,47,52") -> dict:
    """Flash every 5 steps with a durable copy each time, except ModelCheckpoint's steps (every 20).

    Attempt i dies by SIGKILL at the i-th step of ``crashes``. Before resuming, attempt 2 loses tmpfs
    (another machine: the durable copy remains) and attempt 3 also the durable copy and the local
    checkpoint directory (only the task checkpoint remains). Each attempt notes where it resumed from.
    """
    torch.set_num_threads(1)
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=5, durable_every_n_steps=5)
    home = Path(os.environ["STALWART_HOME"])
    local = home / "lightning-ckpt" / str(context.run_id)
    if context.attempt >= 2:
        shutil.rmtree(flash.job_dir)
    if context.attempt >= 3:
        shutil.rmtree(urlparse(str(flash.durable_url)).path)
        shutil.rmtree(local)
    torch.manual_seed(0)
    model = Regressor()
    crash_at = [int(s) for s in crashes.split(",")]
    callbacks = [
        FlashCheckpointCallback(flash, skip_every_n_steps=20),
        SyncedModelCheckpoint(dirpath=local, every_n_train_steps=20, save_top_k=-1),
    ]
    if context.attempt < len(crash_at):
        callbacks.append(Crash(crash_at[context.attempt], flash))
    trainer = make_trainer(max_steps, callbacks)
    ckpt = resume_checkpoint(trainer)
    notes = home / f"{context.run_id}.resumes"
    with notes.open("a") as fh:
        print(context.attempt, ckpt.source if ckpt else None, ckpt.step if ckpt else None, file=fh)
    trainer.fit(model, ckpt_path=ckpt)
    flash.close()
    return {
        "resumes": [line.split() for line in notes.read_text().splitlines()],
        "global_step": trainer.global_step,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


class Term(pl.Callback):
    """SIGTERM to this process as the batch after global step ``at`` starts: a preemption notice in the
    middle of a step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _flash_every_5() -> tuple:
    """The task's context, a checkpointer saving every 5 steps, a fresh model and its flash callback."""
    torch.set_num_threads(1)
    flash = sw.FlashCheckpointer(every_n_steps=5)
    torch.manual_seed(0)
    return sw.ctx(), flash, Regressor(), [FlashCheckpointCallback(flash)]


@env.task(retries=1)
def fit_preempted(max_steps: int = 30, term_at: int = 12) -> dict:
    """Flash every 5 steps; attempt 0 gets SIGTERM during step ``term_at`` + 1, which the callback saves
    (not a multiple of 5) before the process stops. Returns where the last attempt resumed from."""
    context, flash, model, callbacks = _flash_every_5()
    if context.attempt == 0:
        callbacks.append(Term(term_at))
    trainer = make_trainer(max_steps, callbacks, enable_checkpointing=False)
    ckpt = resume_checkpoint(trainer)
    trainer.fit(model, ckpt_path=ckpt)
    flash.close()
    return {
        "resumed": [ckpt.source, ckpt.step] if ckpt else None,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


class CrashAfter(pl.Callback):
    """SIGKILL after global step ``at`` (not a saved step), once the newest save has committed and the
    progress is on disk: the steps since that save are the work the failure throws away. (Without the
    wait, a busy machine still commits the save in the background at the kill, and the retry restores
    the save before it, as it should.)"""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            self.flash.wait()
            sigkill_after_events()


@env.task(retries=1)
def fit_logged(max_steps: int = 30, crash_at: int = 23) -> str:
    """Flash every 5 steps, figures to a CSVLogger; attempt 0 dies at ``crash_at``. Returns the
    directory of the last attempt's metrics.csv."""
    from lightning.pytorch.loggers import CSVLogger

    context, flash, model, callbacks = _flash_every_5()
    if context.attempt == 0:
        callbacks.append(CrashAfter(crash_at, flash))
    logs = Path(os.environ["STALWART_HOME"]) / "lightning-logs" / str(context.run_id)
    logger = CSVLogger(logs, name="run", version=context.attempt)
    trainer = make_trainer(max_steps, callbacks, enable_checkpointing=False, logger=logger)
    trainer.fit(model, ckpt_path=resume_checkpoint(trainer))
    flash.close()
    return logger.log_dir
