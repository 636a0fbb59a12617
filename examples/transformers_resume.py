"""stalwart with the Hugging Face Trainer: a training killed mid-way resumes from its mirrored checkpoint.

A 2-layer GPT-2 built from a config (nothing is downloaded) learns synthetic tokens. The Trainer saves
``checkpoint-N`` every 10 steps; ``CheckpointMirrorCallback`` copies each one to the flash tier and to the
task checkpoint. The first attempt dies by SIGKILL after saving step 40; the second one rebuilds the
newest ``checkpoint-N`` with ``resume_checkpoint`` and the Trainer continues from it. Run it with
``pip install -e ".[transformers]" && python examples/transformers_resume.py``.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import stalwart as sw
from stalwart.integrations.transformers import CheckpointMirrorCallback, resume_checkpoint

env = sw.TaskEnvironment(name="transformers-resume", resources=sw.Resources(cpu=1, memory="2Gi"))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, length: int = 24) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CrashOnce(TrainerCallback):
    """Attempt 0 kills itself once step ``at`` is saved and mirrored (it is listed after the mirror)."""

    def __init__(self, at: int, flash: sw.FlashCheckpointer) -> None:
        self.at, self.flash = at, flash

    def on_save(self, args: TrainingArguments, state: object, control: object, **kwargs: object) -> None:
        if sw.ctx().attempt == 0 and state.global_step == self.at:  # type: ignore[attr-defined]
            self.flash.wait()
            print(f"attempt 0: checkpoint-{self.at} is mirrored; simulating a crash (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


@env.task(retries=2)
def train(max_steps: int = 60, crash_at_step: int = 40) -> float:
    context = sw.ctx()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    args = TrainingArguments(
        output_dir=str(Path(tempfile.gettempdir()) / "stalwart-transformers" / str(context.run_id)),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_steps=10,
        logging_steps=20,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    mirror = CheckpointMirrorCallback(flash=sw.FlashCheckpointer(durable_every_n_steps=20))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        callbacks=[mirror, CrashOnce(crash_at_step, mirror.flash)],  # type: ignore[arg-type]
    )
    resume = resume_checkpoint(args.output_dir, flash=mirror.flash)  # None on the first attempt
    if resume is not None:
        print(f"attempt {context.attempt}: resuming at step {resume.step} from the {resume.source} tier")
    result = trainer.train(resume_from_checkpoint=resume)
    step, loss = trainer.state.global_step, result.training_loss
    print(f"attempt {context.attempt}: finished at step {step}, loss {loss:.4f}")
    mirror.flash.close()  # type: ignore[union-attr]
    return round(loss, 6)


if __name__ == "__main__":
    run = sw.run(train)
    print()
    print(f"run {run.id}: {run.status}, final loss {run.output}")
    for attempt in run.attempts:
        print(f"  attempt {attempt.number}: {attempt.error or attempt.status}")
