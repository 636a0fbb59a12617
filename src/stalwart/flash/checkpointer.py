"""FlashCheckpointer: when to save to the flash tier, where, and how to come back.

::

    flash = sw.FlashCheckpointer("job-123", durable="s3://bucket/job-123", every_n_steps=5,
                                 durable_every_n_steps=100)
    step = flash.restore(state)                 # newest complete state: tmpfs, then durable; or None
    for step in range(step or 0, total):
        train_one_step()
        flash.maybe_save(step + 1, state)       # async: blocks only for the copy

Steps count completed training steps: ``restore`` returns the step a save recorded, which is where
training resumes. For an exact resume, put the data loader (anything with ``state_dict`` and
``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``) in the state too; every rank's random
generators ride with each step (``rng=True``), so a resumed run equals an uninterrupted one.

Inside a stalwart task the job id defaults to the run id (so a retried attempt on the same machine
finds the flash state of the attempt that died) and the durable store defaults to the run's
checkpoint store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from .. import config, metrics
from ..checks import int_at_least
from ..context import ctx
from ..runtime import events
from . import preemption, stateful
from .engine import EngineSettings, FlashEngine
from .layout import FlashLayout, check_job_id
from .objects import DEFAULT_CHUNK
from .reshard import check_reshard
from .uploader import ON_ERROR

__all__ = ["FlashCheckpointer"]

log = logging.getLogger(__name__)


class FlashCheckpointer:
    """Memory-first checkpoints for a training loop, with a durable copy every so often.

    A durable outage never costs a flash save: the failed copy is a warning with the lag in steps, raised
    as FlashError by ``wait()``/``close()``, or by the next save with ``on_durable_error="raise"``.
    """

    def __init__(
        self,
        job_id: str | None = None,
        root: str | os.PathLike | None = None,
        durable: str | os.PathLike | None = None,
        every_n_steps: int = 1,
        durable_every_n_steps: int | None = None,
        keep: int = 2,
        async_save: bool = True,
        *,
        replicas: int = 1,
        storage_options: dict | None = None,
        durable_keep: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
        threads: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        on_durable_error: str = "warn",
        save_on_preemption: bool = True,
        grace_period: float = preemption.DEFAULT_GRACE_PERIOD,
        rng: bool = True,
    ) -> None:
        """Set up the checkpointer; nothing is opened until the first save or restore.

        Args:
            job_id: names the job in the flash root and the durable store: unique to the job and the
                same across its restarts. Inside a stalwart task, None means the run id.
            root: the flash root, ideally a tmpfs directory; None means ``$STALWART_FLASH_ROOT``, else
                ``/dev/shm/stalwart``.
            durable: a directory or fsspec URL (``s3://...``) for the durable copy; None keeps flash only
                (inside a task: the task's checkpoint store).
            every_n_steps: ``maybe_save`` saves the steps that are multiples of it.
            durable_every_n_steps: every this many steps (a multiple of ``every_n_steps``) the saved
                step is copied to ``durable`` too; None: only what ``save(durable=True)`` asks for.
            keep: complete steps kept in tmpfs; older ones are dropped once a newer one is safe.
            async_save: return once the tensors are copied (checksums, commit, replicas and the durable
                copy follow in the background); False: return once the step is committed.
            replicas: copies of each rank's object on other nodes (a ring), so losing a node loses nothing.
            storage_options: fsspec options for ``durable`` (an S3 endpoint, credentials).
            durable_keep: complete steps kept in the durable store.
            rank, world_size, process_group: this process's place in the job; None reads
                torch.distributed (or one rank alone).
            threads: copy threads per save; None: one per core, up to 4.
            chunk_size: bytes per checksummed chunk (at least 4096).
            on_durable_error: "warn" (a failed durable copy is a warning with the lag in steps, raised at
                ``wait()``/``close()``) or "raise" (the next save raises it).
            save_on_preemption: on SIGTERM, save the step reached and stop at the next step boundary.
            grace_period: seconds that save may take before the process is killed anyway (Kubernetes'
                default is 30 s); too short for one copy is refused at start-up.
            rng: save this rank's random generators (Python, NumPy, torch) with every step and set them
                back on restore, so the draws after a resume are those of an uninterrupted run.
        """
        context = ctx()
        if job_id is None:
            if not context.in_task:
                raise ValueError(
                    "job_id is required outside a stalwart task; use a name unique to the job and the same "
                    "across its restarts, e.g. FlashCheckpointer('job-123')"
                )
            job_id = context.run_id
        self.job_id = check_job_id(job_id)
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise ValueError(
                f"root={root!r} is not accepted; use a directory path (ideally on tmpfs) or None"
            )
        self.every_n_steps = int_at_least("every_n_steps", every_n_steps, 1)
        self.durable_every_n_steps = int_at_least(
            "durable_every_n_steps", durable_every_n_steps, 1, optional=True
        )
        if self.durable_every_n_steps and self.durable_every_n_steps % self.every_n_steps:
            raise ValueError(
                f"durable_every_n_steps={durable_every_n_steps} is not a multiple of "
                f"every_n_steps={every_n_steps}; a durable copy is taken of a flash save, so use a multiple"
            )
        self.keep = int_at_least("keep", keep, 1)
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save={async_save!r} is not accepted; use True or False")
        self.async_save = async_save
        if durable is None and context.in_task and context.checkpoint_uri:
            durable = f"{context.checkpoint_uri.rstrip('/')}/flash"
            storage_options = storage_options or config.storage_options_from_env()
        if isinstance(durable, Path):
            durable = durable.resolve().as_uri()
        if durable is not None and (not isinstance(durable, str) or not durable):
            raise ValueError(f"durable={durable!r} is not accepted; use an fsspec URL or path, or None")
        if self.durable_every_n_steps and durable is None:
            raise ValueError("durable_every_n_steps needs durable= (an fsspec URL such as 's3://bucket/job')")
        self.durable_url = durable
        self._durable_args = (storage_options, int_at_least("durable_keep", durable_keep, 1))
        self.layout = FlashLayout(root, self.job_id)
        self._rank, self._world_size, self._process_group = rank, world_size, process_group
        self._threads, self._chunk_size = threads, chunk_size
        int_at_least("replicas", replicas, 0, note=" (copies on other nodes)")
        self.replicas = replicas
        if on_durable_error not in ON_ERROR:
            raise ValueError(
                f"on_durable_error={on_durable_error!r} is not accepted; use 'warn' (a durable outage is a "
                "warning with the lag, raised at wait()/close()) or 'raise' (raised by the next save)"
            )
        self.on_durable_error = on_durable_error
        if not isinstance(save_on_preemption, bool):
            raise ValueError(f"save_on_preemption={save_on_preemption!r} is not accepted; use True or False")
        self.grace_period = preemption.check_grace_period(grace_period)
        if not isinstance(rng, bool):
            raise ValueError(f"rng={rng!r} is not accepted; use True (save the random generators) or False")
        self.rng = rng
        self._engine: FlashEngine | None = None
        self.last_saved_step: int | None = None
        self._seen_step: int | None = None  # the newest step maybe_save/save was called with
        self._stop = preemption.StopStep(f"stalwart/flash/{self.job_id}/preempted")
        self._grace_checked = False
        self.save_on_preemption = save_on_preemption and preemption.watch(self)
        metrics.serve_from_env()  # STALWART_PROMETHEUS_PORT: figures for a scraper, no code needed

    @property
    def job_dir(self) -> Path:
        return self.layout.job_dir

    @property
    def engine(self) -> FlashEngine:
        """The engine, created at first use, once torch.distributed (if used) is initialised."""
        if self._engine is None:
            rank, world_size = self._rank, self._world_size
            if rank is None or world_size is None:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    rank = dist.get_rank(self._process_group) if rank is None else rank
                    world_size = (
                        dist.get_world_size(self._process_group) if world_size is None else world_size
                    )
                else:
                    rank, world_size = rank or 0, world_size or 1
            options, durable_keep = self._durable_args
            settings = EngineSettings(
                self.keep,
                self.replicas,
                self.durable_url,
                options,
                durable_keep,
                self.on_durable_error,
                self._chunk_size,
                self._threads,
            )
            self._engine = settings.build(self.layout, rank, world_size, process_group=self._process_group)
        return self._engine

    def as_one_rank(self) -> FlashCheckpointer:
        """Save as rank 0 of a one-rank job whatever torch.distributed says, for frameworks whose main
        process alone writes the checkpoint (the Hugging Face Trainer): with the ranks of the training,
        a step would never be complete. Returns ``self``; a ValueError if it was given, or has opened
        as, another rank."""
        opened = None if self._engine is None else (self._engine.rank, self._engine.world_size)
        given = (self._rank, self._world_size)
        if given not in ((None, None), (0, 1)) or opened not in (None, (0, 1)):
            rank, world = opened or given
            raise ValueError(
                f"this FlashCheckpointer is rank {rank} of {world}; the main process saves alone here, so "
                "make it FlashCheckpointer(..., rank=0, world_size=1) or leave rank and world_size unset"
            )
        self._rank, self._world_size = 0, 1
        return self

    def restore(
        self,
        state_dict: MutableMapping[str, Any],
        *,
        step: int | None = None,
        reshard: str | None = None,
    ) -> int | None:
        """Load the newest complete state into ``state_dict`` in place; return its step, or None.
        Stateful values (a module, an optimizer, a data loader) get theirs through ``load_state_dict``,
        and with ``rng`` the random generators are set back as they were at that step.

        The newest step any tier holds intact wins (tmpfs, a peer node, the durable store), and
        ``restored_from`` says which: "flash", "peer" or "durable". None means no tier holds a
        checkpoint of this job; one that exists but cannot be read raises FlashRestoreError instead,
        so training never silently starts over. ``step``: that step instead (to roll back past a loss
        spike; ``steps()`` lists them); FlashRestoreError naming what each tier holds if none holds it.
        Training goes on from the step restored: the steps after it are forgotten in every tier.

        ``reshard="replicated"``: the job may have been saved by another number of ranks (elastic
        training that lost or gained a node) and every rank holds the same state, as with DDP: a step
        saved by N ranks is restored on each of this job's ranks from saved rank 0's object (its random
        generators included, as a checkpoint written by rank 0 restores them), from tmpfs, a peer or the
        durable store. Sharded state (DTensor, FSDP2) reshards through DCP (``FlashStorageReader``).
        Without it, a checkpoint of another world size raises FlashRestoreError saying so.
        """
        int_at_least("step", step, 0, optional=True, note=" (the newest)")
        check_reshard(reshard)
        restored = stateful.restore_into(
            state_dict, lambda target: self.engine.load(target, step=step, reshard=reshard), rng=self.rng
        )
        self.last_saved_step = restored
        return restored

    def steps(self) -> dict[str, list[int]]:
        """The steps each tier holds whole: {"flash": [...], "durable": [...]} ("flash" counts every
        node's tmpfs, replicas on peers included; "durable" only with a durable store). With several
        ranks this is a collective: call it on every rank."""
        return self.engine.steps()

    def continue_from(self, step: int) -> list[int]:
        """Training goes on from ``step``, restored from elsewhere (e.g. a regular checkpoint file): the
        steps this rank saved after it belong to an abandoned timeline, so they are forgotten in every tier
        (as ``restore`` forgets them), with a warning that names them. Returns the flash steps forgotten.
        With several nodes this is a collective: call it on every rank."""
        int_at_least("step", step, 0)
        abandoned = self.engine.continue_from(step)
        self.last_saved_step = max(self.engine.shelf.own, default=None)
        return abandoned

    @property
    def restored_from(self) -> str | None:
        return self._engine.restored_from if self._engine is not None else None

    def save(self, step: int, state_dict: MutableMapping[str, Any], *, durable: bool | None = None) -> bool:
        """Save now (async unless ``async_save=False``); a durable copy follows when ``durable`` or when
        ``step`` is a multiple of ``durable_every_n_steps``. Returns False if the step was already saved."""
        if durable is None:
            every = self.durable_every_n_steps
            durable = every is not None and step % every == 0
        self._seen_step = step
        if self.preempted(step):
            self._save_and_stop(step, state_dict)
        saved = self.engine.save(
            step, stateful.to_saved(state_dict, rng=self.rng), async_save=self.async_save, durable=durable
        )
        if saved:
            self.last_saved_step = step
            self._check_grace()
        return saved

    def _check_grace(self) -> None:
        """Once: a grace period shorter than one save means a preemption save cannot finish."""
        if self._grace_checked or not self.save_on_preemption:
            return
        self._grace_checked = True
        blocked = self.engine.last_save_blocked
        if blocked > self.grace_period:
            log.warning(
                "flash: one save took %.1f s, longer than grace_period=%.0f s: a save on SIGTERM would not "
                "finish before the kill; raise grace_period (and the pod's terminationGracePeriodSeconds)",
                blocked,
                self.grace_period,
            )

    def maybe_save(self, step: int, state_dict: MutableMapping[str, Any]) -> bool:
        """Save if ``step`` is a multiple of ``every_n_steps`` (and not saved yet); True if it saved.
        Call it at every step boundary: after SIGTERM it saves this step whatever its number and raises
        ``Preempted`` (see ``save_on_preemption``)."""
        int_at_least("step", step, 0)
        self._seen_step = step
        events.progress(step)
        if self.preempted(step):
            self._save_and_stop(step, state_dict)
        if step % self.every_n_steps or step == self.last_saved_step:
            return False
        return self.save(step, state_dict)

    # preemption

    def preempted_at(self, at: float) -> None:
        """SIGTERM arrived (called by the signal handler): watch the grace period."""
        if not self.save_on_preemption:
            return
        preemption.start_watchdog(at + self.grace_period, self._late)
        blocked = self._engine.last_save_blocked if self._engine is not None else 0.0
        if blocked > self.grace_period:
            log.error(
                "flash: a save took %.1f s, longer than the %.0f s grace period: the preemption save may not "
                "finish, and the %s since step %s would be lost",
                blocked,
                self.grace_period,
                self._lag(),
                self.last_saved_step,
            )

    def preempted(self, step: int, *, world_size: int | None = None) -> bool:
        """Whether training stops at this step boundary after a preemption notice (SIGTERM). For
        integrations whose saves do not come at every step: ask at each boundary; when True, save this
        step (``save`` then saves it whatever its number, and raises ``Preempted``).

        ``world_size``: of the ranks that stop together, by default the engine's (``StopStep``)."""
        int_at_least("step", step, 0)
        int_at_least("world_size", world_size, 1, optional=True)
        if not self.save_on_preemption:
            return False
        return self._stop.reached(step, world_size if world_size is not None else self.engine.world_size)

    def _lag(self) -> str:
        steps = (self._seen_step or 0) - (self.last_saved_step or 0)
        return f"{steps} step{'s' * (steps != 1)}"

    def _late(self) -> str | None:
        if self._seen_step is not None and self._seen_step == self.last_saved_step:
            return None
        return (
            f"no step boundary (maybe_save) within the {self.grace_period:.0f} s grace period after SIGTERM: "
            f"the {self._lag()} after step {self.last_saved_step} will be lost when the process is killed"
        )

    def _save_and_stop(self, step: int, state_dict: MutableMapping[str, Any]) -> None:
        raise self.save_preempted(step, state_dict)

    def save_preempted(self, step: int, state_dict: MutableMapping[str, Any]) -> preemption.Preempted:
        """The preemption save: this step, now, with its durable copy if there is a store, then wait for
        replicas and uploads (the next attempt may run elsewhere) and close. Returns the ``Preempted`` to
        raise once the caller is done (``save`` raises it at once; an integration may first have to
        leave a collective its other ranks wait in)."""
        if step != self.last_saved_step:
            self.engine.save(
                step,
                stateful.to_saved(state_dict, rng=self.rng),
                async_save=False,
                durable=self.durable_url is not None,
            )
            self.last_saved_step = step
        elif self.durable_url is not None:  # a regular save of this step: its durable copy may be missing
            self.engine.make_durable(step)
        self.wait()
        at = preemption.notice() or 0.0
        took = time.monotonic() - at
        where = (
            "flash"
            + (", its replicas" if self.replicas else "")
            + (" and durable" if self.durable_url else "")
        )
        events.record("preempted", step=step, seconds=round(took, 3) if at else None)
        if at:
            log.warning("flash: preempted: step %d saved to %s %.1f s after SIGTERM", step, where, took)
        else:
            log.warning("flash: preempted: step %d saved to %s (SIGTERM reached another rank)", step, where)
        self.close()  # the process stops: the engine's threads end here, not in the interpreter's teardown
        return preemption.Preempted(f"preempted by SIGTERM: step {step} saved to {where}", step)

    def wait(self) -> None:
        """Block until background commits and uploads finish; raise what failed."""
        if self._engine is not None:
            self._engine.wait()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def __enter__(self) -> FlashCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        root = str(self.layout.root)
        return f"FlashCheckpointer({self.job_id!r}, root={root!r}, durable={self.durable_url!r})"
