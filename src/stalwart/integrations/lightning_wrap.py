"""One call for Lightning users: flash checkpoints installed on a trainer, and the path to resume from.

``wrap_trainer`` is what ML Flashpoint's ``wrap_trainer_and_auto_resume_with_mlflashpoint`` is for NeMo,
built from the pieces of ``stalwart.integrations.lightning`` (the callback, the CheckpointIO and
``resume_checkpoint``); import it from there::

    from stalwart.integrations.lightning import wrap_trainer

    regular = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=500)
    trainer = L.Trainer(max_steps=10_000, callbacks=[regular])
    ckpt = wrap_trainer(trainer, "/dev/shm/jobs/job-145", every_n_steps=10, skip_every_n_steps=500)
    trainer.fit(model, ckpt_path=ckpt)                                  # None on the first run
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..checks import int_at_least
from ..context import ctx
from ..flash.checkpointer import FlashCheckpointer
from ..flash.layout import check_job_id
from . import ResumePoint, from_rank_zero
from .lightning import (
    FlashCheckpointCallback,
    FlashCheckpointIO,
    install_io,
    resume_checkpoint,
)

__all__ = ["wrap_trainer"]

_FLASH_OPTIONS = ("keep", "replicas", "storage_options", "durable_keep", "chunk_size", "on_durable_error")


def wrap_trainer(
    trainer: Trainer,
    base: str | os.PathLike[str] | None = None,
    *,
    job_id: str | None = None,
    every_n_steps: int,
    skip_every_n_steps: int | None = None,
    async_save: bool = True,
    threads: int | None = None,
    durable: str | os.PathLike[str] | None = None,
    durable_every_n_steps: int | None = None,
    dirpath: str | os.PathLike[str] | None = None,
    **flash_options: Any,
) -> ResumePoint | None:
    """Give ``trainer`` flash checkpoints; return the ``ckpt_path`` for ``trainer.fit`` (None: start fresh).

    ::

        regular = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=500)
        trainer = L.Trainer(max_steps=10_000, callbacks=[regular])
        ckpt = wrap_trainer(trainer, "/dev/shm/jobs/job-145", every_n_steps=10, skip_every_n_steps=500)
        trainer.fit(model, ckpt_path=ckpt)

    Adds a ``FlashCheckpointCallback`` (a save every ``every_n_steps``, none on multiples of
    ``skip_every_n_steps``: give ModelCheckpoint's ``every_n_train_steps``) and the ``FlashCheckpointIO``
    around the trainer's IO, then returns ``resume_checkpoint(trainer)``: the newest of the flash tier
    (tmpfs, else its durable copy) and the ``.ckpt`` files of the trainer's ModelCheckpoint directories and
    ``dirpath`` (in a task, else the task checkpoint's copy); ``.source`` and ``.step`` say which.

    Where the flash state lives: ``base`` is the job's directory, whose name is the job id and whose parent
    the flash root (ML Flashpoint's base container), or ``job_id`` names a directory under the default root
    (``$STALWART_FLASH_ROOT``, else /dev/shm/stalwart). Either must be unique to the job and the same across
    its restarts. In a stalwart task both may be left out: the job id is the run id, and ``durable``
    defaults to the run's checkpoint store. ``async_save`` and ``threads`` (copy threads) and
    ``flash_options`` (keep, replicas, storage_options, durable_keep, chunk_size, on_durable_error) go to
    the ``FlashCheckpointer``, which is ``trainer.strategy.checkpoint_io.flash`` afterwards.

    Call it once per trainer, before ``fit``. With several processes (DDP) call it on every rank, in
    processes started before it (torchrun, a stalwart ``Elastic`` task, SLURM): it sets up the process
    group, rank 0 chooses and every rank gets the same path; the flash state is rank 0's.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer={trainer!r} is not accepted; use a lightning.pytorch.Trainer")
    _refuse_wrapped(trainer)
    int_at_least("every_n_steps", every_n_steps, 1)
    int_at_least("threads", threads, 1, optional=True, note=" (one per core, to 4)")
    unknown = sorted(set(flash_options) - set(_FLASH_OPTIONS))
    if unknown:
        raise TypeError(
            f"wrap_trainer() got {', '.join(map(repr, unknown))}; it passes only {', '.join(_FLASH_OPTIONS)} "
            "to the FlashCheckpointer (the flash state is rank 0's, one rank of one: no rank or world_size)"
        )
    root, job = _job(base, job_id)
    _check_processes(trainer)
    flash = FlashCheckpointer(
        job,
        root,
        durable,
        every_n_steps,
        durable_every_n_steps,
        async_save=async_save,
        threads=threads,
        rank=0,
        world_size=1,
        **flash_options,
    )
    callback = FlashCheckpointCallback(flash, every_n_steps, skip_every_n_steps)
    unplaced = [c for c in trainer.checkpoint_callbacks if not getattr(c, "dirpath", None)]
    if dirpath is None and unplaced:
        rank_zero_warn(
            f"{type(unplaced[0]).__name__} has no dirpath yet, so wrap_trainer cannot look for its files "
            "when it chooses where to resume: give it dirpath=..., or give wrap_trainer(dirpath=...)"
        )
    if trainer.world_size > 1:
        trainer.strategy.setup_environment()  # the process group: the ranks must agree before fit
    checkpoints = trainer.checkpoint_callbacks  # Lightning runs them last: the flash save goes before
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors
    index = callbacks.index(checkpoints[0]) if checkpoints else len(callbacks)
    callbacks.insert(index, callback)
    install_io(trainer, flash)
    if trainer.world_size == 1:
        return resume_checkpoint(trainer, flash=flash, dirpath=dirpath)
    return _agree_on(lambda: resume_checkpoint(trainer, flash=flash, dirpath=dirpath))


def _refuse_wrapped(trainer: Trainer) -> None:
    if isinstance(trainer.strategy.checkpoint_io, FlashCheckpointIO) or any(
        isinstance(c, FlashCheckpointCallback)
        for c in trainer.callbacks  # type: ignore[attr-defined]
    ):
        raise RuntimeError(
            "this trainer has flash checkpoints already (wrap_trainer was called, or a "
            "FlashCheckpointCallback or FlashCheckpointIO was given): call wrap_trainer once per trainer, "
            "on a trainer without them; resume_checkpoint(trainer) looks for the newest state again"
        )


def _job(base: object, job_id: str | None) -> tuple[Path | None, str | None]:
    """The flash root and job id from ``base`` (the job's directory) or ``job_id`` (None: the run id)."""
    if base is not None and job_id is not None:
        raise ValueError(
            "give base= (the job's flash directory, e.g. '/dev/shm/jobs/job-145') or job_id= (a directory "
            "under the default flash root), not both"
        )
    if base is None:
        if job_id is None and not ctx().in_task:
            raise ValueError(
                "outside a stalwart task, give base='/dev/shm/jobs/<job id>' (the job's flash directory) or "
                "job_id='<job id>': unique to the job and the same across its restarts"
            )
        return None, job_id
    if not isinstance(base, (str, os.PathLike)) or not os.fspath(base):
        raise ValueError(
            f"base={base!r} is not accepted; use the job's flash directory, e.g. '/dev/shm/jobs/job-145'"
        )
    path = Path(os.fspath(base)).expanduser().absolute()
    try:
        check_job_id(path.name)
    except ValueError as exc:
        raise ValueError(
            f"base={os.fspath(base)!r} is not accepted: its last part {path.name!r} is the job id. {exc}"
        ) from None
    return path.parent, path.name


def _check_processes(trainer: Trainer) -> None:
    """Several processes must all be running before ``wrap_trainer`` (the ranks agree on where to resume),
    and save a full checkpoint from rank 0 (DDP; sharded strategies save from every rank)."""
    if trainer.world_size == 1:
        return
    strategy = trainer.strategy
    if type(strategy) is not DDPStrategy:
        raise ValueError(
            f"strategy {type(strategy).__name__} is not accepted with {trainer.world_size} processes; "
            "wrap_trainer supports DDPStrategy ('ddp') or one process per trainer"
        )
    environment = strategy.cluster_environment
    if environment is None or not environment.creates_processes_externally:
        raise ValueError(
            f"this trainer would start its {trainer.world_size} processes itself in fit(), after "
            "wrap_trainer: start them before (torchrun, a stalwart Elastic task, SLURM) and call "
            "wrap_trainer in each, or use one process per trainer"
        )


def _agree_on(resolve: Callable[[], ResumePoint | None]) -> ResumePoint | None:
    """Rank 0 resolves the resume point; every rank returns the same path (a flash path is then loaded by
    rank 0 and sent to the others by the FlashCheckpointIO)."""
    chosen = from_rank_zero(
        lambda: None if (point := resolve()) is None else (str(point), point.source, point.step),
        "the checkpoint to resume from",
    )
    return None if chosen is None else ResumePoint(*chosen)
