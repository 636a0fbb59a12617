"""Hugging Face Trainer: mirror each ``checkpoint-N`` directory, and rebuild the newest one to resume.

::

    from stalwart.integrations.transformers import CheckpointMirrorCallback, resume_checkpoint

    mirror = CheckpointMirrorCallback(flash=sw.FlashCheckpointer(durable_every_n_steps=1000))  # optional
    trainer = Trainer(model, args, train_dataset=data, callbacks=[mirror])
    trainer.train(resume_from_checkpoint=resume_checkpoint(args.output_dir, flash=mirror.flash))

The Trainer writes ``output_dir/checkpoint-N`` itself every ``save_steps`` (weights, optimizer, scheduler,
RNG states, trainer state) and resumes from such a directory exactly. The callback copies each one, once
complete, to the task checkpoint (a durable store, for a retry on another machine) and, if given a
FlashCheckpointer, to the flash tier (each file as a uint8 tensor: tmpfs now, a durable copy every
``durable_every_n_steps``). ``resume_checkpoint`` puts the newest copy back as ``checkpoint-N``.

Under DDP the main process alone writes the model and optimizer, so the flash tier is its one-rank job
(``FlashCheckpointer.as_one_rank``): each save waits until every rank has put its files (its RNG state)
into ``checkpoint-N``, and ``resume_checkpoint`` rebuilds the directory on global rank 0 and tells the
others where it is (``output_dir`` is shared, as the Trainer itself assumes). After a preemption
notice to any rank, every rank stops at the same step once the main process has saved it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint.task import Checkpoint
from ..context import ctx
from ..flash.checkpointer import FlashCheckpointer
from ..flash.preemption import Preempted
from ..metrics import Figures
from ..runtime import events
from . import SOURCES, ResumePoint, from_rank_zero, newest_flash_step

__all__ = ["CheckpointMirrorCallback", "pack_directory", "resume_checkpoint", "unpack_directory"]

log = logging.getLogger(__name__)

_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STATE_FILE = "trainer_state.json"  # the Trainer writes it after the weights, optimizer and RNG states


def pack_directory(directory: Path) -> dict[str, Any]:
    """A checkpoint directory as a flash state: each file's bytes as a uint8 tensor, by relative path."""
    files: dict[str, torch.Tensor] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = bytearray(path.stat().st_size)
            with open(path, "rb") as fh:
                fh.readinto(data)
            key = path.relative_to(directory).as_posix()
            files[key] = (
                torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            )
    return {"files": files}


def unpack_directory(state: dict[str, Any], target: Path) -> Path:
    """Write a packed directory to ``target``, whole or not at all (built aside, then renamed)."""
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    for name, tensor in state["files"].items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"refusing to write {name!r} outside {target}")
        path = scratch.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tensor.numpy().data)
    scratch.mkdir(parents=True, exist_ok=True)  # an empty directory stays a directory
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def _task_checkpoint(checkpoint: Checkpoint | bool | None) -> Checkpoint | None:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return ctx().checkpoint if checkpoint and ctx().in_task else None


class CheckpointMirrorCallback(TrainerCallback):
    """Copy each ``checkpoint-N`` directory the Trainer saves to the task checkpoint and the flash tier.

    ``checkpoint``: a Checkpoint, or True for ``ctx().checkpoint`` inside a task (nothing outside one), or
    False. ``flash``: a FlashCheckpointer, or None; it takes the saves whose step is a multiple of its
    ``every_n_steps``. Only the main process copies, as only it writes the directory.

    With ``log_metrics`` (the default), what checkpointing cost joins the Trainer's next log entry
    (``stalwart/save_blocked_ms``, ``restore_ms``, ``restore_source`` (0 flash, 1 peer, 2 durable),
    ``steps_lost``, ...; see ``stalwart.metrics``): ``state.log_history``, the console, and the
    ``report_to`` integrations that come after this callback in the Trainer's list.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | bool = True,
        flash: FlashCheckpointer | None = None,
        log_metrics: bool = True,
    ) -> None:
        if not isinstance(log_metrics, bool):
            raise ValueError(f"log_metrics={log_metrics!r} is not accepted; use True or False")
        self.checkpoint = checkpoint
        self.flash = flash.as_one_rank() if flash is not None else None
        self.figures = Figures() if log_metrics else None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the figures of checkpoint events since the last log to this one (on the main process,
        which the Trainer logs from)."""
        figures = self.figures.new() if self.figures is not None and state.is_world_process_zero else None
        if figures and logs is not None:
            logs.update(figures)
            if state.log_history:  # the Trainer appended its copy of ``logs`` before calling us
                state.log_history[-1].update(figures)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After a preemption notice (SIGTERM to any rank), every rank saves this step: the Trainer
        writes ``checkpoint-N`` and ``on_save`` stops the process with it in the flash tier."""
        events.progress(state.global_step)  # how far training got (stalwart show, steps lost)
        if self.flash is not None and self.flash.preempted(state.global_step, world_size=args.world_size):
            control.should_save = True

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        stopping = self.flash is not None and self.flash.preempted(step, world_size=args.world_size)
        _barrier(args)  # every rank's files (its RNG state) are in checkpoint-N before it is copied
        if not state.is_world_process_zero:
            if stopping:  # the main process mirrors the step; every other rank stops with it
                _barrier(args)
                raise Preempted(f"preempted by SIGTERM: step {step} saved by the main process", step)
            return
        directory = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        stop: BaseException | None = None
        try:
            if directory.is_dir():
                stop = self._mirror(step, directory, stopping)
            else:
                log.warning("no %s after the Trainer saved step %d; nothing mirrored", directory, step)
                if stopping:
                    stop = Preempted(
                        f"preempted by SIGTERM at step {step}, which the Trainer did not save", step
                    )
        finally:
            if stopping:
                _barrier(args)  # the other ranks stop once the step is saved
        if stop is not None:
            raise stop

    def _mirror(self, step: int, directory: Path, stopping: bool) -> BaseException | None:
        """Copy ``checkpoint-N``; when ``stopping``, the ``Preempted`` to raise once it is saved."""
        checkpoint = _task_checkpoint(self.checkpoint)
        if checkpoint is not None and stopping:
            checkpoint.save_sync(directory)  # first: the flash save below ends the process
        if self.flash is not None and stopping:
            return self.flash.save_preempted(step, pack_directory(directory))
        if self.flash is not None and step % self.flash.every_n_steps == 0:
            self.flash.save(step, pack_directory(directory))
        if checkpoint is not None and not stopping:
            checkpoint.save_sync(directory)
        return None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.flash is not None:
            self.flash.wait()


def _barrier(args: TrainingArguments) -> None:
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _local_steps(output_dir: Path) -> list[int]:
    """Steps of the complete ``checkpoint-N`` directories in ``output_dir``."""
    if not output_dir.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for entry in output_dir.iterdir()
        if (m := _DIR.match(entry.name)) and (entry / _STATE_FILE).is_file()
    )


def _task_step(checkpoint: Checkpoint) -> int | None:
    """The step of the task checkpoint's newest version, from its directory's name (nothing downloaded)."""
    info = checkpoint.previous()
    m = _DIR.match(info.filename or "") if info is not None and info.kind == "directory" else None
    return int(m.group(1)) if m else None


def resume_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    flash: FlashCheckpointer | None = None,
    checkpoint: Checkpoint | bool = True,
) -> ResumePoint | None:
    """The ``resume_from_checkpoint`` for ``trainer.train``: the newest complete ``checkpoint-N``, or None.

    Looks at the flash tier (tmpfs, then its durable copy), the complete ``checkpoint-N`` directories
    already in ``output_dir``, and the task checkpoint of an earlier attempt (``checkpoint`` as in
    ``CheckpointMirrorCallback``); equal steps go to the faster source. The winner is rebuilt as
    ``output_dir/checkpoint-N``; directories of later steps (an abandoned run, perhaps half written) are
    removed so the Trainer's rotation never mixes them in. The result's ``source`` and ``step`` say what
    was found.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return from_rank_zero(  # one rank rebuilds the directory; the others use it (output_dir is shared)
            lambda: _resume_here(Path(output_dir), flash, checkpoint), "the checkpoint to resume from"
        )
    return _resume_here(Path(output_dir), flash, checkpoint)


def _resume_here(
    out: Path, flash: FlashCheckpointer | None, checkpoint: Checkpoint | bool
) -> ResumePoint | None:
    if flash is not None:
        flash.as_one_rank()
    task = _task_checkpoint(checkpoint)
    candidates: list[tuple[int, str]] = []
    if flash is not None and (step := newest_flash_step(flash)) is not None:
        candidates.append((step, "flash"))
    candidates += [(step, "checkpoint") for step in _local_steps(out)[-1:]]
    if task is not None and (step := _task_step(task)) is not None:
        candidates.append((step, "task"))
    for step, source in sorted(candidates, key=lambda c: (-c[0], SOURCES.index(c[1]))):
        point = _materialize(out, step, source, flash, task)
        if point is not None:
            for entry in out.iterdir():
                if (m := _DIR.match(entry.name)) and int(m.group(1)) > (point.step or 0):
                    shutil.rmtree(entry, ignore_errors=True)
            return point
    return None


def _materialize(
    out: Path, step: int, source: str, flash: FlashCheckpointer | None, task: Checkpoint | None
) -> ResumePoint | None:
    target = out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if source == "checkpoint":
        return ResumePoint(target, source, step)
    if source == "flash" and flash is not None:
        state: dict[str, Any] = {}
        restored = flash.restore(state)
        if restored is None:
            return None
        target = unpack_directory(state, out / f"{PREFIX_CHECKPOINT_DIR}-{restored}")
        return ResumePoint(target, flash.restored_from or "flash", restored)
    if source == "task" and task is not None:
        restored_dir = task.load_sync()
        if restored_dir is None or not (restored_dir / _STATE_FILE).is_file():
            return None
        step = int(json.loads((restored_dir / _STATE_FILE).read_text())["global_step"])
        target = out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(restored_dir, scratch)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
        return ResumePoint(target, source, step)
    return None
