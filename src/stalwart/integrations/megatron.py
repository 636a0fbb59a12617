"""Megatron-LM: save and load strategies for ``megatron.core.dist_checkpointing`` on the flash tier.

::

    import stalwart as sw
    from stalwart.integrations import megatron as swm

    writer = sw.FlashStorageWriter(job_id, replicas=1, durable="s3://bucket/job", durable_every_n_steps=100)
    strategy = swm.FlashSaveStrategy(writer)
    queue = swm.AsyncCallsQueue()                 # Megatron's queue, with collectives that also run on CPU
    for step in ...:
        request = swm.save(model.sharded_state_dict(), step, strategy, async_save=True)
        queue.schedule_async_request(request)     # the copy into tmpfs is done: training goes on
        queue.maybe_finalize_async_calls()        # the step is complete once finalized on every rank

    reader = sw.FlashStorageReader(job_id, durable="s3://bucket/job")
    resumed = swm.load(model.sharded_state_dict(), reader, long_term_dir="/ckpt/iter_0001000")
    if resumed is not None:                      # the newest complete flash step, else the regular one
        state_dict, where = resumed              # where.source: "flash", "peer", "durable" or "checkpoint"

Why ``save`` and not ``dist_checkpointing.save``: Megatron writes its common (non-sharded) state to
``common.pt`` on global rank 0 only, so a node without rank 0 could not load it from its own tmpfs.
``save`` mirrors ``dist_checkpointing.save`` but every rank (so local rank 0 of every node, and the
others) puts the common state into its own flash object: checksummed, replicated and copied to the
durable store with the step, and read back from the object the rank reads for its shards anyway (a
replaced node fetches nothing but its ranks' own objects). ``dist_checkpointing.save(...,
sharded_strategy=FlashSaveStrategy(writer))`` works too: the strategy then carries global rank 0's
``common.pt`` in rank 0's object, and every rank reads that copy.

Loading goes through ``dist_checkpointing.load`` with ``FlashLoadStrategy`` and
``FlashCommonLoadStrategy``; ``latest_complete_checkpoint`` (collective) prepares this node's step
directory (Megatron checks it for ``metadata.json``), also on a node that lost its tmpfs. Nothing here
calls CUDA, so all of it runs on CPU with gloo.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CONFIG_FNAME, CheckpointingConfig, CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor, StateDict
from megatron.core.dist_checkpointing.serialization import _CONTENT_METADATA_KEY
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies import async_utils
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.base import (
    AsyncSaveShardedStrategy,
    LoadCommonStrategy,
    LoadShardedStrategy,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.utils import _DistWrapper

from ..atomic import write_atomic
from ..flash.dcp import FlashStorageReader, FlashStorageWriter
from ..flash.dcp.steps import step_of
from . import SOURCES, ResumePoint

__all__ = [
    "BACKEND",
    "AsyncCallsQueue",
    "FlashCommonLoadStrategy",
    "FlashLoadStrategy",
    "FlashSaveStrategy",
    "latest_complete_checkpoint",
    "load",
    "save",
]

BACKEND, VERSION = "stalwart_flash", 1  # what metadata.json names as the sharded backend
COMMON = "__stalwart_megatron_common__/rank-"  # + the rank: its copy of the common state, a bytes item


def _step(checkpoint_dir: object, writer_or_reader: FlashStorageWriter | FlashStorageReader) -> int:
    """The flash step a Megatron checkpoint_dir names (the step directory of this job, or an int)."""
    try:
        return step_of(checkpoint_dir, writer_or_reader.layout)
    except ValueError:
        shown = os.fspath(checkpoint_dir) if isinstance(checkpoint_dir, os.PathLike) else checkpoint_dir
        raise ValueError(
            f"checkpoint_dir={shown!r} is not a step of flash job {writer_or_reader.layout.job_id!r}; give a "
            f"step (int) or its step directory such as {writer_or_reader.layout.step_dir(100)} "
            "(strategy.checkpoint_dir(step)). A regular checkpoint directory is loaded with Megatron's own "
            "strategies (swm.load does that)"
        ) from None


def _whole_world(process_group: Any, what: str) -> None:
    if process_group is not None:
        raise ValueError(
            f"Megatron's dist_checkpointing saves and loads over the whole world; give the {what} no "
            "process_group"
        )


def _prepare_dir(directory: Path) -> Path:
    """This node's step directory, with the metadata.json Megatron looks for before loading (written
    whole, by rename, never rewritten). A rank that opens the job removes step directories without
    objects, so this is done again after each load (which opens it) and after a save commits."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FNAME
    if not path.exists():
        write_atomic(path, json.dumps(asdict(CheckpointingConfig(BACKEND, VERSION))))
    return directory


def _serialized(common_state_dict: StateDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(common_state_dict, buffer)
    return buffer.getvalue()


class FlashSaveStrategy(AsyncSaveShardedStrategy):
    """Megatron's sharded save strategy on the flash tier, through a ``FlashStorageWriter``.

    ``async_save`` plans with every rank, then copies this rank's shards into its flash buffer before it
    returns (the only part that must wait: training may change the tensors next). The request it returns
    has no ``async_fn`` (nothing is left for a background process: replicas and the durable copy are the
    writer's background work); its finalize step commits the coordinator's object with DCP's global
    metadata, which makes the step complete. ``save`` (Megatron's sync door) runs both at once.
    """

    def __init__(self, writer: FlashStorageWriter) -> None:
        if not isinstance(writer, FlashStorageWriter):
            raise TypeError(f"writer must be a stalwart FlashStorageWriter; got {type(writer).__name__}")
        _whole_world(writer.process_group, "FlashStorageWriter")
        super().__init__(BACKEND, VERSION)
        self.writer = writer

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def checkpoint_dir(self, step: int) -> str:
        """The checkpoint_dir of ``step`` for ``dist_checkpointing.save``, created on this node (Megatron
        lists it on global rank 0 before saving)."""
        directory = self.writer.step_dir(step)
        directory.mkdir(parents=True, exist_ok=True)
        return str(directory)

    def async_save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> AsyncRequest:
        """Megatron's door: global rank 0 also stores the ``common.pt`` Megatron just wrote there."""
        step = _step(checkpoint_dir, self.writer)
        common = None
        if dist.get_rank() == 0:
            written = Path(self.writer.step_dir(step)) / COMMON_STATE_FNAME
            common = written.read_bytes() if written.exists() else None
        return self._async_save(sharded_state_dict, step, common)

    def _async_save(
        self, sharded_state_dict: ShardedStateDict, step: int, common: bytes | None
    ) -> AsyncRequest:
        writer = self.writer
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        state: dict[str, Any] = mcore_to_pyt_state_dict(flat, False)
        if common is not None:
            state[f"{COMMON}{dist.get_rank()}"] = io.BytesIO(common)
        planner = MCoreSavePlanner(flatten_state_dict=False)
        wrapper = _DistWrapper(None, True, 0)
        writer.reset(step)
        found: dict[str, Metadata] = {}

        def local_step() -> Any:
            planner.set_up_planner(state, writer.storage_meta(), wrapper.is_coordinator)
            writer.set_up_storage_writer(wrapper.is_coordinator, rank=wrapper.rank, use_collectives=True)
            return writer.prepare_local_plan(planner.create_local_plan())

        def global_step(plans: list) -> list:
            plans, found["metadata"] = planner.create_global_plan(plans)
            return writer.prepare_global_plan(plans)

        plan = planner.finish_plan(wrapper.reduce_scatter("plan", local_step, global_step))
        try:  # the copy; its failure is raised on every rank at finalize, as DCP does
            outcome: Any = writer.write_data(plan, planner).value()
        except Exception as exc:
            outcome = exc

        def finalize() -> None:
            def written() -> Any:
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome

            def finish(results: list) -> None:
                writer.finish(found["metadata"], results)

            wrapper.all_reduce("write", written, finish)

        return AsyncRequest(None, (), [finalize])


def save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: int | str | Path,
    strategy: FlashSaveStrategy,
    *,
    async_save: bool = False,
    validate_access_integrity: bool = True,
    preprocess_common_before_consistancy_check: Any = None,
    content_metadata: dict | None = None,
) -> AsyncRequest | None:
    """``dist_checkpointing.save`` on the flash tier, with the common state stored by every rank in its
    own object (so each node holds it). ``checkpoint_dir``: a step or its step directory. Collective.

    Returns None once the step is complete, or with ``async_save`` the request to schedule on an
    ``AsyncCallsQueue`` (the tensors are already copied; finalizing it completes the step)."""
    if not isinstance(strategy, FlashSaveStrategy):
        raise TypeError(f"strategy must be a FlashSaveStrategy; got {type(strategy).__name__}")
    step = _step(checkpoint_dir, strategy.writer)
    if content_metadata is not None:
        sharded_state_dict[_CONTENT_METADATA_KEY] = content_metadata
    sharded_part, common_state_dict = save_preprocess(
        sharded_state_dict, validate_access_integrity, preprocess_common_before_consistancy_check
    )
    request = strategy._async_save(sharded_part, step, _serialized(common_state_dict))
    request.add_finalize_fn(lambda: _prepare_dir(strategy.writer.step_dir(step)))  # the step is complete
    if async_save:
        return request
    request.execute_sync()
    return None


# loading


class FlashLoadStrategy(LoadShardedStrategy):
    """Megatron's sharded load strategy on the flash tier, through a ``FlashStorageReader``: each rank
    reads the shards it needs from the cheapest tier holding them (its node, a peer, the durable store),
    verified; shapes and world sizes may differ from the save (DCP reshards)."""

    def __init__(self, reader: FlashStorageReader) -> None:
        if not isinstance(reader, FlashStorageReader):
            raise TypeError(f"reader must be a stalwart FlashStorageReader; got {type(reader).__name__}")
        _whole_world(reader.process_group, "FlashStorageReader")
        super().__init__()
        self.reader = reader
        self.restored_from: dict[int, str] = {}  # rank -> tier, of the objects the last load read

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def checkpoint_dir(self, step: int) -> str:
        """The checkpoint_dir of ``step`` for ``dist_checkpointing.load``, prepared on this node (also on
        one that never held the step: the reader fetches it). ``latest_complete_checkpoint`` does this
        for the newest step; call it on every rank."""
        return str(_prepare_dir(self.reader.step_dir(step)))

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> StateDict:
        step = _step(checkpoint_dir, self.reader)
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        planner = MCoreLoadPlanner(
            shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
            allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch},
        )
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        state = mcore_to_pyt_state_dict(flat, True)
        dcp.load(state, checkpoint_id=step, storage_reader=self.reader, planner=planner)
        self.restored_from = dict(self.reader.restored_from)
        _prepare_dir(self.reader.step_dir(step))
        loaded = {key: _unwrap_pyt_sharded_tensor(value) for key, value in state.items()}
        loaded = _replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        _restore_dict_types(loaded, sharded_state_dict)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir: str | Path, metadata: Metadata | None = None) -> dict:
        metadata = metadata if metadata is not None else _metadata(self.reader, checkpoint_dir)
        return {
            key: ShardedTensor.from_rank_offsets(
                key, torch.empty(md.size, **md.properties.__dict__, device="meta")
            ).without_data()
            for key, md in metadata.state_dict_metadata.items()
            if not isinstance(md, BytesStorageMetadata)
        }

    def load_sharded_metadata(self, checkpoint_dir: str | Path) -> dict:
        metadata = _metadata(self.reader, checkpoint_dir)
        found: dict[str, Any] = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata) and not key.startswith(COMMON):
                obj = ShardedObject.empty_from_unique_key(key)
                found[obj.unique_key] = obj
        found.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return found

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        _check_backend(loaded_backend)

    def check_version_compatibility(self, loaded_version: int) -> None:
        if loaded_version != VERSION:
            raise CheckpointingException(f"flash Megatron format version {loaded_version} is not {VERSION}")


def _check_backend(loaded_backend: str) -> None:
    if loaded_backend != BACKEND:
        raise CheckpointingException(
            f"this checkpoint directory holds a {loaded_backend!r} checkpoint, not a stalwart flash step; "
            "load it with Megatron's own strategies (sharded_strategy=None), as swm.load does for "
            "long_term_dir"
        )


def _metadata(reader: FlashStorageReader, checkpoint_dir: str | Path) -> Metadata:
    """DCP's global metadata of a flash step (collective); the reader lets go of what it read."""
    reader.reset(_step(checkpoint_dir, reader))
    try:
        return reader.read_metadata()
    finally:
        reader.reset()


class _CommonPlanner(LoadPlanner):
    """Reads one copy of the common state: this rank's own (in the object it reads for its shards), else
    the lowest rank's (a step saved through ``dist_checkpointing.save``, or by a smaller world)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.data: bytes | None = None

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False):
        assert metadata is not None
        copies = {
            metadata.storage_data[MetadataIndex(key)].rank: key
            for key, md in metadata.state_dict_metadata.items()
            if key.startswith(COMMON) and isinstance(md, BytesStorageMetadata)
        }
        self.key = copies.get(dist.get_rank(), copies[min(copies)] if copies else None)

    def create_local_plan(self) -> LoadPlan:
        if self.key is None:
            return LoadPlan([])
        index = MetadataIndex(self.key)
        empty = torch.Size([])
        return LoadPlan([ReadItem(LoadItemType.BYTE_IO, index, empty, index, empty, empty)])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.data = value.read()

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        raise AssertionError("the common state is read as bytes")

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        raise AssertionError("the common state is read as bytes")


class FlashCommonLoadStrategy(LoadCommonStrategy):
    """Megatron's common load strategy on the flash tier: the common state stored with the step (by every
    rank with ``save``, by rank 0 with ``dist_checkpointing.save``), verified."""

    def __init__(self, reader: FlashStorageReader) -> None:
        if not isinstance(reader, FlashStorageReader):
            raise TypeError(f"reader must be a stalwart FlashStorageReader; got {type(reader).__name__}")
        _whole_world(reader.process_group, "FlashStorageReader")
        self.reader = reader
        self.restored_from: dict[int, str] = {}  # rank -> tier, of the object the last load read

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def load_common(self, checkpoint_dir: str | Path) -> StateDict:
        step = _step(checkpoint_dir, self.reader)
        planner = _CommonPlanner()
        dcp.load({}, checkpoint_id=step, storage_reader=self.reader, planner=planner)
        self.restored_from = dict(self.reader.restored_from)
        _prepare_dir(self.reader.step_dir(step))
        if planner.data is None:
            raise CheckpointingException(
                f"flash step {step} of job {self.reader.layout.job_id!r} holds no Megatron common state: it "
                "was not saved through stalwart.integrations.megatron (save, or FlashSaveStrategy)"
            )
        return torch.load(io.BytesIO(planner.data), map_location="cpu", weights_only=False)

    def load_sharded_objects(self, sharded_objects_state_dict: ShardedStateDict, checkpoint_dir: Any) -> None:
        raise CheckpointingException("the ShardedObjects of a flash step are loaded by FlashLoadStrategy")

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        if loaded_backend != "torch":  # the common backend metadata.json names, for any sharded backend
            raise CheckpointingException(f"common backend {loaded_backend!r} is not 'torch'")

    def check_version_compatibility(self, loaded_version: int) -> None:
        pass


def latest_complete_checkpoint(reader: FlashStorageReader) -> ResumePoint | None:
    """The newest step every rank's object of which exists on some node or in the durable store, as this
    node's checkpoint_dir prepared for ``dist_checkpointing.load`` (also on a node that lost its tmpfs);
    None when there is none. Collective."""
    if not isinstance(reader, FlashStorageReader):
        raise TypeError(f"reader must be a stalwart FlashStorageReader; got {type(reader).__name__}")
    step = reader.latest_step()
    if step is None:
        return None
    return ResumePoint(_prepare_dir(reader.step_dir(step)), "flash", step)


def load(
    sharded_state_dict: ShardedStateDict,
    reader: FlashStorageReader,
    long_term_dir: str | Path | None = None,
    *,
    long_term_sharded_strategy: Any = None,
    long_term_common_strategy: Any = None,
    validate_access_integrity: bool = True,
    strict: str | StrictHandling = StrictHandling.ASSUME_OK_UNEXPECTED,
) -> tuple[Any, ResumePoint] | None:
    """Load the newest complete flash step if there is one, else the regular checkpoint in
    ``long_term_dir`` (with Megatron's strategies, or the ones given); None when neither exists (a
    missing or empty ``long_term_dir``: a first run). Collective.

    Returns what ``dist_checkpointing.load`` returns and where it came from: source "flash", "peer" or
    "durable" (the farthest tier this rank read from) with the step, or "checkpoint" with step None."""

    def load_from(directory: Path, sharded: Any, common: Any) -> Any:
        return dist_checkpointing.load(
            sharded_state_dict,
            str(directory),
            sharded_strategy=sharded,
            common_strategy=common,
            validate_access_integrity=validate_access_integrity,
            strict=strict,
        )

    point = latest_complete_checkpoint(reader)
    if point is not None:
        sharded, common = FlashLoadStrategy(reader), FlashCommonLoadStrategy(reader)
        loaded = load_from(Path(point), sharded, common)
        tiers = [*sharded.restored_from.values(), *common.restored_from.values()]
        source = max(tiers, key=SOURCES.index, default="flash")
        return loaded, ResumePoint(point, source, point.step)
    if long_term_dir is None:
        return None
    directory = Path(long_term_dir)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return None
    loaded = load_from(directory, long_term_sharded_strategy, long_term_common_strategy)
    return loaded, ResumePoint(directory, "checkpoint", None)


# Megatron's AsyncCallsQueue on any device


def _collective_device() -> torch.device:
    """Where Megatron's queue should put the tensors of its collectives: the GPU under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _OnGroupDevice:
    def sync_all_async_calls(self, is_alive: int) -> bool:
        flag = torch.tensor([is_alive], dtype=torch.int, device=_collective_device())
        dist.all_reduce(flag)
        return bool(flag[0] == 0)


class _TemporalCaller(_OnGroupDevice, async_utils.TemporalAsyncCaller):
    pass


class _PersistentCaller(_OnGroupDevice, async_utils.PersistentAsyncCaller):
    pass


class AsyncCallsQueue(async_utils.AsyncCallsQueue):
    persistent_caller: Any  # Megatron's, set in its __init__
    """Megatron's ``AsyncCallsQueue`` with its collectives on the process group's device.

    Megatron's own queue puts them on ``torch.cuda.current_device()``, so it cannot finalize any request
    on a machine without CUDA; this one uses CPU tensors under gloo and the current GPU under NCCL, and is
    otherwise Megatron's (same callers, same order of finalization, same checks)."""

    def _get_async_caller(self) -> async_utils.AsyncCaller:
        if not self.persistent:
            return _TemporalCaller()
        if self.persistent_caller is None:
            self.persistent_caller = _PersistentCaller()
        return self.persistent_caller

    def maybe_finalize_async_calls(self, blocking: bool = False, no_dist: bool = False) -> list[int]:
        finalized = []
        while self.async_calls:
            if not self.async_calls[0].async_caller.is_current_async_call_done(blocking, no_dist):
                break
            call_idx, _, request = self.async_calls.popleft()
            for finalize_fn in request.finalize_fns:
                finalize_fn()
            index = torch.tensor([call_idx], dtype=torch.int, device=_collective_device())
            dist.all_reduce(index, op=dist.ReduceOp.MAX)
            if index.item() != call_idx:
                raise RuntimeError(
                    "unmatched async calls: not every rank takes part in finalizing the async saves"
                )
            finalized.append(call_idx)
        return finalized
