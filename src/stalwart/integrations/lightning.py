"""PyTorch Lightning: flash checkpoints every few steps, a CheckpointIO that routes them, one-call resume.

One call installs both pieces and returns where to resume from (``wrap_trainer``)::

    regular = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=500)
    trainer = L.Trainer(max_steps=10_000, callbacks=[regular])
    ckpt = wrap_trainer(trainer, "/dev/shm/jobs/job-145", every_n_steps=10, skip_every_n_steps=500)
    trainer.fit(model, ckpt_path=ckpt)                                  # None on the first run

The pieces, for more control::

    from stalwart.integrations.lightning import FlashCheckpointCallback, SyncedModelCheckpoint
    from stalwart.integrations.lightning import resume_checkpoint

    flash = sw.FlashCheckpointer(every_n_steps=10, durable_every_n_steps=100)   # in a task: job id = run id
    trainer = L.Trainer(callbacks=[
        FlashCheckpointCallback(flash, skip_every_n_steps=500),          # full state to tmpfs every 10 steps
        SyncedModelCheckpoint(dirpath="ckpt", every_n_train_steps=500),  # files, copied to ctx().checkpoint
    ])
    trainer.fit(model, ckpt_path=resume_checkpoint(trainer))            # newest state, or None: start fresh

The callback saves with ``trainer.save_checkpoint`` to a path under the flash root; the ``FlashCheckpointIO``
it installs around the trainer's own IO sends such paths to the flash tier and every other path to the
wrapped IO, so ``ModelCheckpoint`` keeps writing files. Lightning writes checkpoints from global rank 0
only, so the flash state is rank 0's, one rank of one. ``wrap_trainer`` also runs DDP (processes started
by torchrun or a stalwart ``Elastic`` task): rank 0 chooses the state and sends it to the other ranks.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from ..atomic import replacing
from ..checkpoint.latest import latest_checkpoint
from ..checkpoint.task import Checkpoint
from ..checks import int_at_least
from ..context import ctx
from ..flash import preemption
from ..flash.checkpointer import FlashCheckpointer
from ..flash.preemption import Preempted
from ..metrics import Figures
from ..runtime import events
from . import SOURCES, ResumePoint, default_flash, from_rank_zero, newest_flash_step
from .state import decode_checkpoint, encode_checkpoint, get_rng_state, set_rng_state

if TYPE_CHECKING:
    from .lightning_wrap import wrap_trainer

__all__ = [
    "FlashCheckpointCallback",
    "FlashCheckpointIO",
    "SyncedModelCheckpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "resume_checkpoint",
    "wrap_trainer",
]

_STEP = re.compile(r"^step-(\d+)$")

# the CheckpointIO


class FlashCheckpointIO(_WrappingCheckpointIO):
    """Paths under the flash job directory go to the flash tier; every other path to ``checkpoint_io``.

    Flash saves return once the state is copied into tmpfs (the commit runs in the background); for
    asynchronous regular files wrap Lightning's IO: ``FlashCheckpointIO(flash, AsyncCheckpointIO())``.
    Like Lightning's own wrappers, it lets the strategy supply the innermost IO where none is given.
    A committed flash step is never rewritten: saving its path again is an error. Under DDP only rank 0
    writes, so loading a flash path is a collective there: rank 0 reads the state and sends it to every rank.
    """

    def __init__(
        self, flash: FlashCheckpointer | None = None, checkpoint_io: CheckpointIO | None = None
    ) -> None:
        super().__init__(checkpoint_io)
        flash = flash if flash is not None else default_flash()
        if flash is None:
            raise ValueError(
                "outside a stalwart task, pass one: FlashCheckpointIO(sw.FlashCheckpointer('job-id'))"
            )
        self.flash = flash
        self._held: tuple[int, dict[str, Any]] | None = None
        self.preempting = False  # the next flash save is the preemption save (FlashCheckpointCallback)
        self.preempted: Preempted | None = None  # what that save returned, for the callback to raise

    def _base(self) -> CheckpointIO:
        """The IO for regular paths; used outside a strategy, the innermost IO is Lightning's default."""
        if not self._base_checkpoint_io_configured:
            self.checkpoint_io = TorchCheckpointIO()  # Lightning's setter configures nested wrappers too
        assert self.checkpoint_io is not None
        return self.checkpoint_io

    def path(self, step: int) -> str:
        """The path that names ``step`` in the flash tier (its step directory)."""
        return str(self.flash.layout.step_dir(step))

    def step_of(self, path: str | os.PathLike[str]) -> int | None:
        """The step a flash path names, or None for any other path."""
        candidate = Path(os.fspath(path)).expanduser().absolute()
        if candidate.parent != self.flash.layout.steps_dir.absolute():
            return None
        m = _STEP.match(candidate.name)
        return int(m.group(1)) if m else None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        step = self.step_of(path)
        if step is None:
            self._base().save_checkpoint(checkpoint, os.fspath(path), storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported for the flash path "
                f"{os.fspath(path)}: the flash tier takes no storage options (its durable copies take "
                "theirs from FlashCheckpointer(storage_options=...))"
            )
        if self.preempting:  # returns instead of raising: Lightning's barrier follows on every rank
            self.preempted = self.flash.save_preempted(step, encode_checkpoint(checkpoint))
            return
        if not self.flash.save(step, encode_checkpoint(checkpoint)):
            raise ValueError(
                f"flash step {step} of job {self.flash.job_id!r} is already committed, and committed steps "
                "are never rewritten; save this state to a regular .ckpt path, or under a newer step"
            )

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        step = self.step_of(path)
        if step is None:
            kwargs = {"map_location": map_location} if map_location is not None else {}
            if weights_only is not None:  # (Lightning before 2.4 has no weights_only)
                kwargs["weights_only"] = weights_only
            return self._base().load_checkpoint(os.fspath(path), **kwargs)
        if _distributed():  # DDP: rank 0 alone holds the flash state (Lightning saves from rank 0 only)
            checkpoint = from_rank_zero(lambda: self._load_flash(step, weights_only), f"flash step {step}")
        else:
            checkpoint = self._load_flash(step, weights_only)
        if isinstance(map_location, (str, torch.device)):
            checkpoint = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.to(map_location))
        return checkpoint

    def _load_flash(self, step: int, weights_only: bool | None) -> dict[str, Any]:
        if self._held is not None and self._held[0] == step:
            state, self._held = self._held[1], None
        else:
            state = {}
            restored = self.flash.restore(state)
            if restored != step:
                raise FileNotFoundError(
                    f"flash step {step} of job {self.flash.job_id!r} is not the newest complete step "
                    f"({restored}); the flash tier restores its newest step: use resume_checkpoint()"
                )
        return decode_checkpoint(state, weights_only=weights_only)

    def hold(self, step: int, state: dict[str, Any]) -> None:
        """Keep a state just restored by ``resume_checkpoint`` for the load that follows (no second read)."""
        self._held = (step, state)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        if self.step_of(path) is None:  # flash steps are retired by the flash tier's own retention
            self._base().remove_checkpoint(os.fspath(path))

    def teardown(self) -> None:
        """Wait for every IO it wraps (an asynchronous IO's teardown waits only for its own thread, not
        for the IOs it wraps in turn), then for the flash commits."""
        for io_ in _wrapped(self.checkpoint_io):
            io_.teardown()
        self.flash.wait()


def install_io(trainer: Trainer, flash: FlashCheckpointer | None = None) -> FlashCheckpointIO:
    """The trainer's FlashCheckpointIO, wrapped around its current IO if it has none yet."""
    current = trainer.strategy.checkpoint_io
    if isinstance(current, FlashCheckpointIO):
        if flash is not None and current.flash.job_dir != flash.job_dir:
            raise ValueError(
                f"the trainer's FlashCheckpointIO writes {current.flash.job_dir}, the callback's flash "
                f"{flash.job_dir}: give both the same FlashCheckpointer"
            )
        return current
    installed = FlashCheckpointIO(flash, current)
    trainer.strategy.checkpoint_io = installed
    return installed


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _wrapped(io_: CheckpointIO | None) -> list[CheckpointIO]:
    """``io_`` and the IOs it wraps, outermost first (the order in which saves are handed inwards)."""
    chain = []
    while io_ is not None:
        chain.append(io_)
        io_ = io_.checkpoint_io if isinstance(io_, _WrappingCheckpointIO) else None
    return chain


def _flush_files(trainer: Trainer) -> None:
    """Wait for asynchronous regular files (flash commits need no wait: they are found only once whole)."""
    for io_ in _wrapped(trainer.strategy.checkpoint_io):
        if isinstance(io_, AsyncCheckpointIO):
            io_.teardown()  # waits for its thread; its next save starts a new one


# the callbacks


class FlashCheckpointCallback(Callback):
    """Save the full training state to the flash tier every ``every_n_steps`` optimizer steps.

    Multiples of ``skip_every_n_steps`` are left out: set it to the regular ``ModelCheckpoint``'s
    ``every_n_train_steps``, which saves those steps anyway (a second save would only make them longer).
    The callback's own state holds the RNG states (Lightning checkpoints have none); they are put back
    before the first batch after a resume, so dropout continues exactly as in an uninterrupted run.
    ``enabled=False`` makes the callback do nothing, e.g. to compare runs. With ``log_metrics`` (the
    default), what checkpointing cost goes to the trainer's loggers as it happens
    (``stalwart/save_blocked_ms``, ``save_mb``, ``restore_ms``, ``restore_step``, ``restore_source``
    (0 flash, 1 peer, 2 durable), ``steps_lost``; see ``stalwart.metrics``).
    """

    def __init__(
        self,
        flash: FlashCheckpointer | None = None,
        every_n_steps: int | None = None,
        skip_every_n_steps: int | None = None,
        enabled: bool = True,
        log_metrics: bool = True,
    ) -> None:
        if not isinstance(log_metrics, bool):
            raise ValueError(f"log_metrics={log_metrics!r} is not accepted; use True or False")
        self.figures = Figures() if log_metrics else None
        self.enabled = bool(enabled)
        if flash is None and self.enabled:
            flash = default_flash(every_n_steps or 1)
            if flash is None:
                raise ValueError(
                    "outside a stalwart task, pass flash=sw.FlashCheckpointer('job-id', ...): an id unique "
                    "to the job and the same across its restarts"
                )
        self.flash = flash
        default = flash.every_n_steps if flash else 1
        self.every_n_steps = int_at_least("every_n_steps", every_n_steps or default, 1)
        self.skip_every_n_steps = int_at_least("skip_every_n_steps", skip_every_n_steps, 1, optional=True)
        self._last_step: int | None = None
        self._pending_rng: dict[str, Any] | None = None

    def should_save(self, step: int) -> bool:
        skip = self.skip_every_n_steps
        return (
            self.enabled and step > 0 and step % self.every_n_steps == 0 and not (skip and step % skip == 0)
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit":
            install_io(trainer, self.flash)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training starts at the restored step (or 0). That state exists already, so it is not saved
        again; flash steps newer than it (a resume from an older checkpoint) are an abandoned timeline."""
        self._last_step = trainer.global_step  # the same on every rank: they call save_checkpoint together
        if self.enabled and self.flash is not None and self.flash.save_on_preemption:
            preemption.take_back()  # Lightning installed its SIGTERM handler over the checkpointer's
        if self.enabled and trainer.is_global_zero:  # Lightning writes checkpoints from global rank 0
            assert self.flash is not None
            self.flash.continue_from(trainer.global_step)
        self._log_figures(trainer)  # the restore, if fit resumed from a checkpoint

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        events.progress(step)  # how far training got: the work a failure throws away (stalwart show)
        if self.enabled and self.flash is not None and self._preempted(trainer, step):
            self._stop(trainer, step)
        if step == self._last_step or not self.should_save(step):
            return  # (the same step comes back while gradients accumulate)
        self._last_step = step
        trainer.save_checkpoint(install_io(trainer, self.flash).path(step), weights_only=False)
        self._log_figures(trainer)

    def _log_figures(self, trainer: Trainer) -> None:
        """Send the figures of checkpoint events since the last call to every logger (Lightning's loggers
        write on global rank 0 only)."""
        figures = self.figures.new() if self.figures is not None and self.enabled else None
        if figures:
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)

    def _preempted(self, trainer: Trainer, step: int) -> bool:
        """Whether every rank stops at this step after a preemption notice (SIGTERM to any of them),
        asked after every batch, as Lightning's own saves do not come at every step. Several ranks decide
        together with one all-reduce, at this step: Lightning ends the fit with its SIGTERMException
        after this batch on a rank that got the signal."""
        assert self.flash is not None
        if not self.flash.save_on_preemption:
            return False
        if trainer.world_size == 1:
            return self.flash.preempted(step, world_size=1)
        noticed = preemption.notice() is not None
        return bool(trainer.strategy.reduce_boolean_decision(noticed, all=False))

    def _stop(self, trainer: Trainer, step: int) -> NoReturn:
        """Save this step (every rank takes part; global rank 0 writes) and stop every rank."""
        io = install_io(trainer, self.flash)
        io.preempting = True
        trainer.save_checkpoint(io.path(step), weights_only=False)
        raise io.preempted or Preempted(f"preempted by SIGTERM: step {step} saved by global rank 0", step)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_state()} if self.enabled else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled:
            self._pending_rng = state_dict.get("rng")


class SyncedModelCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose directory is copied to the task checkpoint whenever it saved a file
    (checked after each batch, epoch, validation and at the end), so a retry on another machine finds the
    files in ``ctx().checkpoint``; ``resume_checkpoint`` puts them back into ``dirpath``.

    ``checkpoint`` defaults to ``ctx().checkpoint``; outside a task nothing is copied.
    """

    def __init__(self, *args: Any, checkpoint: Checkpoint | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checkpoint = checkpoint
        self._saved: tuple = ()
        self._synced: tuple = ()

    def _saved_files(self) -> tuple:
        return (self.best_model_path, self.last_model_path, tuple(sorted(self.best_k_models)))

    def _fingerprint(self) -> tuple:
        root = Path(self.dirpath or "")
        if not self.dirpath or not root.is_dir():
            return ()
        return tuple(
            sorted(
                (str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file() and (st := p.stat())
            )
        )

    def sync(self, trainer: Trainer) -> None:
        """Copy the directory to the task checkpoint if its files changed since the last copy."""
        checkpoint = self._checkpoint or (ctx().checkpoint if ctx().in_task else None)
        if checkpoint is None or not trainer.is_global_zero:
            return
        _flush_files(trainer)
        self._saved = self._saved_files()
        fingerprint = self._fingerprint()
        if fingerprint and fingerprint != self._synced:
            checkpoint.save_sync(Path(self.dirpath))  # type: ignore[arg-type]
            self._synced = fingerprint

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved = self._saved_files()  # as restored from a checkpoint: nothing new to copy yet

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kw: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kw)
        if self._saved_files() != self._saved:
            self.sync(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.sync(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.sync(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.sync(trainer)


# resuming


def _file_step(path: Path) -> int | None:
    """The global step of a Lightning checkpoint file, from the file (mmap: no tensor is read) or its name."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception:
        m = re.search(r"step=(\d+)", path.name)
        return int(m.group(1)) if m else None


def _copy_missing(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _file_candidates(
    trainer: Trainer | None, dirpath: Any, glob_pattern: str, task_checkpoint: bool
) -> list[tuple[int, str, Path]]:
    """Regular checkpoint files: the newest of each directory; the task checkpoint only when no local
    directory has one (it copies a local directory: a retry on the same machine needs no download)."""
    callbacks = trainer.checkpoint_callbacks if trainer is not None else []
    dirs = [Path(d) for d in [dirpath, *(getattr(c, "dirpath", None) for c in callbacks)] if d]
    found = []
    for directory in dirs:
        if (path := latest_checkpoint(directory, glob_pattern)) is not None:
            found.append((_file_step(path), "checkpoint", path))
    if not found and task_checkpoint and ctx().in_task:
        restored = ctx().checkpoint.load_sync()
        if restored is not None and restored.is_dir() and (path := latest_checkpoint(restored, glob_pattern)):
            synced = [c for c in callbacks if isinstance(c, SyncedModelCheckpoint) and c.dirpath]
            if synced:  # put the files back where ModelCheckpoint keeps track of them
                home = Path(synced[0].dirpath)  # type: ignore[arg-type]
                _copy_missing(restored, home)
                path = home / path.relative_to(restored)
            found.append((_file_step(path), "task", path))
    return [(-1 if step is None else step, source, path) for step, source, path in found]


def _find_flash(
    trainer: Trainer | None, flash: FlashCheckpointer | None
) -> tuple[FlashCheckpointIO | None, FlashCheckpointer | None]:
    if trainer is None:
        return None, flash if flash is not None else default_flash()
    current = trainer.strategy.checkpoint_io
    if isinstance(current, FlashCheckpointIO):
        return current, flash or current.flash
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, FlashCheckpointCallback) and callback.enabled:
            return install_io(trainer, callback.flash), flash or callback.flash
    return None, flash


def resume_checkpoint(
    trainer: Trainer | None = None,
    *,
    flash: FlashCheckpointer | None = None,
    dirpath: str | os.PathLike[str] | None = None,
    glob_pattern: str = "**/*.ckpt",
    task_checkpoint: bool = True,
    materialize_dir: str | os.PathLike[str] | None = None,
    weights_only: bool | None = None,
) -> ResumePoint | None:
    """The ``ckpt_path`` for ``trainer.fit``: the newest complete state, or None to start fresh.

    Looks at the flash tier (tmpfs, then its durable copy), the newest file in ``dirpath`` and in the
    trainer's ``ModelCheckpoint`` directories, and else the task checkpoint of an earlier attempt; equal
    steps go to the faster source. The result is a path string whose ``source`` and ``step`` say what was
    found. With a trainer that has a ``FlashCheckpointCallback`` or ``FlashCheckpointIO``, a flash state
    goes to Lightning through the IO, already in memory; otherwise it is written as a ``.ckpt`` file into
    ``materialize_dir`` (a new temporary directory by default).
    """
    io_, flash = _find_flash(trainer, flash)
    files = _file_candidates(trainer, dirpath, glob_pattern, task_checkpoint)
    best = max(files, key=lambda c: (c[0], -SOURCES.index(c[1])), default=None)
    if (
        flash is not None
        and (peek := newest_flash_step(flash)) is not None
        and (best is None or peek >= best[0])
    ):
        state: dict[str, Any] = {}
        step = flash.restore(state)
        if step is not None and (best is None or step >= best[0]):
            source = flash.restored_from or "flash"
            if io_ is not None:
                io_.hold(step, state)
                return ResumePoint(io_.path(step), source, step)
            target = Path(materialize_dir or tempfile.mkdtemp(prefix="stalwart-resume-"))
            target.mkdir(parents=True, exist_ok=True)
            path = target / f"flash-step={step}.ckpt"
            with replacing(path) as fh:
                torch.save(decode_checkpoint(state, weights_only=weights_only), fh)
            return ResumePoint(path, source, step)
    if best is None:
        return None
    return ResumePoint(best[2], best[1], best[0] if best[0] >= 0 else None)


def __getattr__(name: str) -> Any:
    """``wrap_trainer``, from ``lightning_wrap``: built from the pieces of this module, it imports them."""
    if name == "wrap_trainer":
        from .lightning_wrap import wrap_trainer

        return wrap_trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
