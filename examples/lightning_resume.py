"""stalwart with PyTorch Lightning: a training killed mid-way resumes from the flash tier.

The first attempt dies by SIGKILL after step 96 (as a crash or an OOM kill would). The runner starts a
second attempt in a fresh process; ``resume_checkpoint(trainer)`` finds the newest state (tmpfs, its
durable copy, or the ModelCheckpoint files copied to the task checkpoint) and Lightning continues from
it. Run it with ``pip install -e ".[lightning]" && python examples/lightning_resume.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stalwart as sw
from stalwart.integrations.lightning import FlashCheckpointCallback, SyncedModelCheckpoint, resume_checkpoint

env = sw.TaskEnvironment(name="lightning-resume", resources=sw.Resources(cpu=1, memory="2Gi"))


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=64)  # 16 steps an epoch


class CrashOnce(pl.Callback):
    """Attempt 0 kills itself after step ``at``, once the flash save of that step is committed."""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if sw.ctx().attempt == 0 and trainer.global_step == self.at:
            self.flash.wait()
            print(f"attempt 0: step {self.at} is in the flash tier; simulating a crash (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


@env.task(retries=2)
def train(max_steps: int = 160, crash_at_step: int = 96) -> float:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    context = sw.ctx()
    torch.manual_seed(0)
    flash = sw.FlashCheckpointer(every_n_steps=8, durable_every_n_steps=32)  # job id: the run id
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            FlashCheckpointCallback(
                flash, skip_every_n_steps=64
            ),  # tmpfs every 8 steps, not ModelCheckpoint's
            SyncedModelCheckpoint(  # files every 64 steps, copied to ctx().checkpoint
                dirpath=Path(tempfile.gettempdir()) / "stalwart-lightning" / str(context.run_id),
                every_n_train_steps=64,
            ),
            CrashOnce(crash_at_step, flash),
        ],
    )
    ckpt = resume_checkpoint(trainer)  # None on the first attempt
    if ckpt is not None:
        print(f"attempt {context.attempt}: resuming at step {ckpt.step} from the {ckpt.source} tier")
    model = Regressor()
    trainer.fit(model, train_dataloaders=loader(), ckpt_path=ckpt)
    loss = float(trainer.callback_metrics["loss"])
    print(f"attempt {context.attempt}: finished at step {trainer.global_step}, loss {loss:.4f}")
    flash.close()
    return round(loss, 6)


if __name__ == "__main__":
    run = sw.run(train)
    print()
    print(f"run {run.id}: {run.status}, final loss {run.output}")
    for attempt in run.attempts:
        print(f"  attempt {attempt.number}: {attempt.error or attempt.status}")
