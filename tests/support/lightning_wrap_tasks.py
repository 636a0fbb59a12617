"""Lightning trainings set up by ``wrap_trainer``, for tests/integrations/test_integration_lightning_wrap.py.

``main`` trains outside any stalwart task (as a script: ``python lightning_wrap_tasks.py BASE CKPT_DIR
MAX_STEPS CRASH_AT OUT``); ``ddp_fit`` is a 2-process DDP task on torch elastic (inside a task).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_tasks import Regressor, make_trainer

import stalwart as sw
from stalwart.integrations.lightning import wrap_trainer

env = sw.TaskEnvironment(name="lightning-wrap-tests")


class CrashAt(pl.Callback):
    """SIGKILL when the batch after global step ``at`` starts (every hook of step ``at`` has run, the
    flash save included), once that save is committed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            trainer.strategy.checkpoint_io.flash.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def _weights(model: pl.LightningModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def main(base: str, ckpt_dir: str, max_steps: int, crash_at: int, out: str) -> None:
    """Flash every 5 steps except ModelCheckpoint's (every 20); notes where it resumed from in OUT.resumes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=20, save_top_k=-1)]
    if crash_at:
        callbacks.append(CrashAt(crash_at))
    trainer = make_trainer(max_steps, callbacks)
    ckpt = wrap_trainer(trainer, base, every_n_steps=5, skip_every_n_steps=20)
    with open(f"{out}.resumes", "a") as fh:
        print(json.dumps(None if ckpt is None else [ckpt.source, ckpt.step]), file=fh)
    trainer.fit(model, ckpt_path=ckpt)
    trainer.strategy.checkpoint_io.flash.close()
    torch.save({"global_step": trainer.global_step, "weights": _weights(model)}, out)


def ddp_trainer(max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """Two DDP processes on gloo, started by torch elastic (a stalwart Elastic task)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        deterministic=True,
        callbacks=callbacks,
    )


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=1, monitor_interval=0.2))
def ddp_fit(max_steps: int = 60, crash_at: int = 35) -> dict:
    """Rank 0 dies by SIGKILL after step ``crash_at`` in the first round; torch elastic restarts both ranks,
    which resume with the same one call (job id = run id). Each rank saves what it ended with."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    context = sw.ctx()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    callbacks = [CrashAt(crash_at)] if restarts == 0 and context.rank == 0 else []
    trainer = ddp_trainer(max_steps, callbacks)
    ckpt = wrap_trainer(trainer, every_n_steps=5)
    trainer.fit(model, ckpt_path=ckpt)
    result = {
        "rank": context.rank,
        "restarts": restarts,
        "resumed": None if ckpt is None else [ckpt.source, ckpt.step],
        "global_step": trainer.global_step,
        "weights": _weights(model),
    }
    torch.save(result, Path(os.environ["STALWART_HOME"]) / f"ddp-rank-{context.rank}.pt")
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


class TermAt(pl.Callback):
    """SIGTERM to this process as the batch after global step ``at`` starts (a node preempted alone)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=0.2), retries=1)
def ddp_fit_preempted(max_steps: int = 40, term_at: int = 22) -> dict:
    """Rank 1 alone gets SIGTERM during step ``term_at`` + 1 of the first attempt: both ranks save that
    step (not a multiple of 5) and stop; the retry resumes both. Each rank saves what it ended with."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    context = sw.ctx()
    callbacks = [TermAt(term_at)] if context.attempt == 0 and context.rank == 1 else []
    trainer = ddp_trainer(max_steps, callbacks)
    ckpt = wrap_trainer(trainer, every_n_steps=5)
    trainer.fit(model, ckpt_path=ckpt)
    result = {
        "rank": context.rank,
        "resumed": None if ckpt is None else [ckpt.source, ckpt.step],
        "global_step": trainer.global_step,
        "weights": _weights(model),
    }
    torch.save(result, Path(os.environ["STALWART_HOME"]) / f"ddp-preempted-rank-{context.rank}.pt")
    return result
