"""A tiny GPT-2 trained by the Hugging Face Trainer in a stalwart task, for the integration tests."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from processes import sigkill_after_events
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import stalwart as sw
from stalwart.integrations.transformers import CheckpointMirrorCallback, resume_checkpoint

env = sw.TaskEnvironment(name="hf-tests")


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences (no tokenizer, no download)."""

    def __init__(self, n: int = 64, length: int = 16) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Crash(TrainerCallback):
    """Dies by SIGKILL once step ``at`` is saved and mirrored (listed after the mirror, it runs after it)."""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_save(self, args: TrainingArguments, state: object, control: object, **kwargs: object) -> None:
        if state.global_step == self.at:  # type: ignore[attr-defined]
            self.flash.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(
    output_dir: Path, max_steps: int, callbacks: list, save: bool = True, logging_steps: int = 0
) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps" if save else "no",
        save_steps=10,
        logging_strategy="steps" if logging_steps else "no",
        logging_steps=logging_steps or 500,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=callbacks)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def uninterrupted(output_dir: Path, max_steps: int = 50) -> tuple[list[torch.Tensor], int]:
    """The twin: the same training without any checkpoint (saving neither changes weights nor RNG)."""
    torch.set_num_threads(1)
    trainer = make_trainer(output_dir, max_steps, [], save=False)
    trainer.train()
    return weights(trainer), trainer.state.global_step


@env.task(retries=3)
def train(max_steps: int = 50, crashes: str = "20,30,40") -> dict:
    """Saves every 10 steps, mirrored to the task checkpoint and to flash (with a durable copy each time).

    Attempt i dies by SIGKILL after saving the i-th step of ``crashes``. Before resuming, attempt 2 loses
    tmpfs (another machine: the durable copy remains) and attempt 3 also the durable copy and the output
    directory (only the task checkpoint remains). Each attempt notes where it resumed from.
    """
    torch.set_num_threads(1)
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=10, durable_every_n_steps=10)
    home = Path(os.environ["STALWART_HOME"])
    output_dir = home / "hf-out" / str(context.run_id)
    if context.attempt >= 2:
        shutil.rmtree(flash.job_dir)
    if context.attempt >= 3:
        shutil.rmtree(urlparse(str(flash.durable_url)).path)
        shutil.rmtree(output_dir)
    crash_at = [int(s) for s in crashes.split(",")]
    callbacks: list = [CheckpointMirrorCallback(flash=flash)]
    if context.attempt < len(crash_at):
        callbacks.append(Crash(crash_at[context.attempt], flash))
    trainer = make_trainer(output_dir, max_steps, callbacks)
    point = resume_checkpoint(output_dir, flash=flash)
    notes = home / f"{context.run_id}.resumes"
    with notes.open("a") as fh:
        print(context.attempt, point.source if point else None, point.step if point else None, file=fh)
    trainer.train(resume_from_checkpoint=point)
    flash.close()
    return {
        "resumes": [line.split() for line in notes.read_text().splitlines()],
        "global_step": trainer.state.global_step,
        "weights": weights(trainer),
    }


class Term(TrainerCallback):
    """SIGTERM to this process as step ``at`` begins: the preemption notice, in the middle of a step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(
        self, args: TrainingArguments, state: object, control: object, **kwargs: object
    ) -> None:
        if state.global_step == self.at:  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGTERM)


@env.task(retries=1)
def train_preempted(max_steps: int = 30, term_at: int = 13) -> dict:
    """Saves every 10 steps; attempt 0 gets SIGTERM during step ``term_at`` + 1, which the mirror saves
    (not a multiple of 10) before the process stops. Returns where the last attempt resumed from."""
    torch.set_num_threads(1)
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=10)
    output_dir = Path(os.environ["STALWART_HOME"]) / "hf-out" / str(context.run_id)
    callbacks: list = [CheckpointMirrorCallback(flash=flash)]
    if context.attempt == 0:
        callbacks.append(Term(term_at))
    trainer = make_trainer(output_dir, max_steps, callbacks)
    point = resume_checkpoint(output_dir, flash=flash)
    trainer.train(resume_from_checkpoint=point)
    flash.close()
    return {
        "resumed": [point.source, point.step] if point else None,
        "global_step": trainer.state.global_step,
        "weights": weights(trainer),
    }


@env.task(elastic=sw.Elastic(nproc_per_node=2, max_restarts=0, monitor_interval=0.2), retries=1)
def ddp_train_preempted(max_steps: int = 30, term_at: int = 13) -> dict:
    """Two DDP processes; in the first attempt rank 1 alone gets SIGTERM during step ``term_at`` + 1
    (``term_at`` < 0: never). Both stop at one saved step and the retry resumes both. Each rank saves
    where it resumed from and what it ended with."""
    torch.set_num_threads(1)
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=10)
    home = Path(os.environ["STALWART_HOME"])
    output_dir = home / "hf-ddp-out" / str(context.run_id)
    callbacks: list = [CheckpointMirrorCallback(flash=flash)]
    if context.attempt == 0 and context.rank == 1 and term_at >= 0:
        callbacks.append(Term(term_at))
    trainer = make_trainer(output_dir, max_steps, callbacks)
    point = resume_checkpoint(output_dir, flash=flash)
    trainer.train(resume_from_checkpoint=point)
    flash.close()
    result = {
        "rank": context.rank,
        "resumed": [point.source, point.step] if point else None,
        "global_step": trainer.state.global_step,
        "weights": weights(trainer),
    }
    torch.save(result, home / f"hf-ddp-{context.run_id}-rank-{context.rank}.pt")
    return result


class CrashAfter(TrainerCallback):
    """SIGKILL at the end of step ``at`` (not a saved step), once the newest save has committed and the
    progress is on disk (see the Lightning twin in lightning_tasks.py)."""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_step_end(self, args: TrainingArguments, state: object, control: object, **kwargs: object) -> None:
        if state.global_step == self.at:  # type: ignore[attr-defined]
            self.flash.wait()
            sigkill_after_events()


@env.task(retries=1)
def train_logged(max_steps: int = 40, crash_at: int = 24) -> list:
    """Saves every 10 steps to flash, logs every 5; attempt 0 dies at ``crash_at``. Returns the last
    attempt's ``log_history``."""
    torch.set_num_threads(1)
    context = sw.ctx()
    flash = sw.FlashCheckpointer(every_n_steps=10)
    output_dir = Path(os.environ["STALWART_HOME"]) / "hf-out" / str(context.run_id)
    callbacks: list = [CheckpointMirrorCallback(checkpoint=False, flash=flash)]
    if context.attempt == 0:
        callbacks.append(CrashAfter(crash_at, flash))
    trainer = make_trainer(output_dir, max_steps, callbacks, logging_steps=5)
    trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir, flash=flash, checkpoint=False))
    flash.close()
    return trainer.state.log_history
