"""A worker of a 2-node x 2-rank Megatron job on the flash tier (started by LocalCluster's agents).

    megatron_workers.py OUT_DIR LONG_TERM_DIR save|resume

A tiny GPTModel from megatron.core (built from a TransformerConfig on CPU: tensor parallel 2 inside a
node, pipeline parallel 2 across the nodes, so every rank holds shards no other rank holds) plus a
ShardedObject per rank and common state. Every rank writes what it saw to OUT_DIR/<mode>-rank<r>.json.

``save``: step 1 through Megatron's own ``dist_checkpointing.save`` with ``FlashSaveStrategy``, step 2
through ``swm.save``, step 3 through ``swm.save(async_save=True)`` on stalwart's ``AsyncCallsQueue``;
then the side scenarios, each on a job of its own (Megatron's own queue on CPU, the fallback to a
regular checkpoint, bad input). ``resume`` (after the test wiped node 0): ``swm.load`` of the newest
step, compared bit for bit with the state saved, then step 4 saved on top (async, on the queue's
persistent caller). Every writer waits for its replicas before the process ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 3
TP, PP = 2, 2


def build_model(seed: int):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
    )
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=64,
        max_sequence_length=16,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def trained(step: int):
    """The model as training left it after ``step`` steps (deterministic on every rank)."""
    model = build_model(0)
    with torch.no_grad():
        for s in range(1, step + 1):
            for param in model.parameters():
                param.mul_(0.75).add_(0.125 * s)
    return model


def sharded_state(model, step: int) -> dict:
    """What a Megatron training loop saves: the model's ShardedTensors, a ShardedObject per (pp, tp) rank
    (its RNG state), and common state."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rng = {"step": step, "where": (pp, tp), "state": torch.Generator().manual_seed(100 * step + pp * TP + tp)}
    rng["state"] = rng["state"].get_state()
    return {
        "model": model.sharded_state_dict(),
        "rng_state": ShardedObject(
            "rng_state", rng, (PP, TP), (pp, tp), replica_id=ps.get_data_parallel_rank()
        ),
        "iteration": step,
        "args": {"lr": 0.5, "layers": [2, 32], "name": "tiny-gpt"},
    }


def exact(loaded: dict, step: int, into) -> bool:
    """Whether ``loaded`` (put into the model ``into``) is the state saved at ``step``, bit for bit."""
    want = sharded_state(trained(step), step)
    into.load_state_dict(loaded["model"])
    ok = all(
        torch.equal(into.state_dict()[k], v) for k, v in trained(step).state_dict().items() if v is not None
    )
    rng, want_rng = loaded["rng_state"], want["rng_state"].data
    ok = ok and rng["step"] == step and tuple(rng["where"]) == tuple(want_rng["where"])
    ok = ok and torch.equal(rng["state"], want_rng["state"])
    return ok and loaded["iteration"] == step and loaded["args"] == want["args"]


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Megatron's torch_dist strategy calls ``torch.cuda.synchronize()`` and puts the tensors of its
    collectives on ``torch.cuda.current_device()``; there is no GPU here, so for Megatron's own regular
    checkpoint (the long-term tier of the fallback scenario) those two go to the CPU."""
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def error_of(fn) -> str:
    """The error ``fn`` raised, as "Type: message" (DCP wraps a rank's error in a CheckpointException)."""
    try:
        fn()
    except BaseException as exc:
        failures = getattr(exc, "failures", None)
        if failures:
            (inner, _), *_ = failures.values()
            exc = inner
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def common_copies(reader, step: int) -> dict:
    """The copies of the common state in a step: the rank named in its key -> the rank whose object
    holds it."""
    from stalwart.integrations import megatron as swm

    reader.reset(step)
    metadata = reader.read_metadata()
    reader.reset()
    return {
        key[len(swm.COMMON) :]: item.rank
        for index, item in metadata.storage_data.items()
        if (key := index.fqn).startswith(swm.COMMON)
    }


def save_round(report: dict, long_term: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue as MegatronQueue

    import stalwart as sw
    from stalwart.integrations import megatron as swm

    writer = sw.FlashStorageWriter("job", replicas=1)
    strategy = swm.FlashSaveStrategy(writer)
    reader = sw.FlashStorageReader("job")
    # step 1: Megatron's own save entry point (common.pt on global rank 0, carried in rank 0's object)
    dist_checkpointing.save(
        sharded_state(trained(1), 1), strategy.checkpoint_dir(1), sharded_strategy=strategy
    )
    swm.save(sharded_state(trained(2), 2), 2, strategy)  # step 2: common state on every node
    queue = swm.AsyncCallsQueue()
    queue.schedule_async_request(swm.save(sharded_state(trained(3), 3), 3, strategy, async_save=True))
    report["latest_before_finalize"] = reader.latest_step()
    report["finalized"] = queue.maybe_finalize_async_calls(blocking=True)
    report["latest"] = reader.latest_step()
    report["metadata_json"] = (writer.step_dir(3) / "metadata.json").exists()  # on this node too
    report["copies"] = {step: common_copies(reader, step) for step in (1, 3)}
    loaded = dist_checkpointing.load(  # Megatron's own entry point, straight on the step directory
        sharded_state(build_model(5), 0),
        str(writer.step_dir(3)),
        sharded_strategy=swm.FlashLoadStrategy(reader),
        common_strategy=swm.FlashCommonLoadStrategy(reader),
    )
    report["plain_load_exact"] = exact(loaded, 3, build_model(6))
    writer.wait()  # replicas on the other node

    # Megatron's own AsyncCallsQueue cannot finalize on a machine without CUDA; the step stays incomplete
    other = swm.FlashSaveStrategy(sw.FlashStorageWriter("megatron-queue", replicas=1))
    megatron_queue = MegatronQueue()
    request = swm.save(sharded_state(trained(1), 1), 1, other, async_save=True)
    report["megatron_queue"] = error_of(
        lambda: (megatron_queue.schedule_async_request(request), megatron_queue.maybe_finalize_async_calls())
    )
    other_reader = sw.FlashStorageReader("megatron-queue")
    report["megatron_queue_latest"] = other_reader.latest_step()
    other.writer.wait()

    # fallback: no complete flash step (the job above) -> the regular checkpoint, saved by Megatron
    if dist.get_rank() == 0:
        os.makedirs(long_term, exist_ok=True)
    dist.barrier()
    with cuda_calls_on_cpu():
        dist_checkpointing.save(sharded_state(trained(2), 2), long_term)
    loaded, where = swm.load(sharded_state(build_model(5), 0), other_reader, long_term)
    report["fallback"] = {"source": where.source, "step": where.step, "path": str(where)}
    report["fallback_exact"] = exact(loaded, 2, build_model(6))
    report["nothing"] = swm.load(
        sharded_state(build_model(5), 0), sw.FlashStorageReader("none"), "/nonexistent"
    )

    bad_input(report, writer, strategy, reader, long_term)


def bad_input(report: dict, writer, strategy, reader, long_term: str) -> None:
    from megatron.core import dist_checkpointing

    import stalwart as sw
    from stalwart.integrations import megatron as swm

    state = sharded_state(trained(4), 4)
    errors = report["errors"] = {}
    errors["save_not_a_step"] = error_of(lambda: swm.save(state, long_term, strategy))
    errors["save_other_job"] = error_of(
        lambda: swm.save(state, sw.FlashStorageWriter("x").step_dir(4), strategy)
    )
    errors["save_rewrite"] = error_of(lambda: swm.save(sharded_state(trained(2), 2), 2, strategy))
    errors["writer_type"] = error_of(lambda: swm.FlashSaveStrategy(reader))
    errors["reader_type"] = error_of(lambda: swm.FlashLoadStrategy(writer))
    errors["load_regular_with_flash"] = error_of(
        lambda: dist_checkpointing.load(
            sharded_state(build_model(5), 0),
            long_term,
            sharded_strategy=swm.FlashLoadStrategy(reader),
            common_strategy=swm.FlashCommonLoadStrategy(reader),
        )
    )
    incomplete = sw.FlashStorageReader("megatron-queue")
    errors["load_incomplete_step"] = error_of(
        lambda: dist_checkpointing.load(
            sharded_state(build_model(5), 0),
            swm.FlashLoadStrategy(incomplete).checkpoint_dir(1),
            sharded_strategy=swm.FlashLoadStrategy(incomplete),
            common_strategy=swm.FlashCommonLoadStrategy(incomplete),
        )
    )
    not_a_checkpoint = Path(long_term).parent / "not-a-checkpoint"
    if dist.get_rank() == 0:
        not_a_checkpoint.mkdir(exist_ok=True)
        (not_a_checkpoint / "notes.txt").write_text("not a checkpoint")
    dist.barrier()
    errors["long_term_not_a_checkpoint"] = error_of(
        lambda: swm.load(sharded_state(build_model(5), 0), sw.FlashStorageReader("none"), not_a_checkpoint)
    )
    import torch.distributed.checkpoint as dcp

    plain = sw.FlashStorageWriter("plain-dcp")  # a flash step that Megatron did not save
    dcp.save({"w": torch.ones(4) * dist.get_rank()}, checkpoint_id=0, storage_writer=plain)
    plain.wait()
    errors["common_missing"] = error_of(
        lambda: swm.FlashCommonLoadStrategy(sw.FlashStorageReader("plain-dcp")).load_common(plain.step_dir(0))
    )


def resume_round(report: dict) -> None:
    import stalwart as sw
    from stalwart.integrations import megatron as swm

    reader = sw.FlashStorageReader("job")
    into = build_model(7)  # other values everywhere: the load must replace every one
    loaded, where = swm.load(sharded_state(into, 0), reader, "/nonexistent-long-term")
    report["resumed"] = {"source": where.source, "step": where.step, "path": str(where)}
    report["exact"] = exact(loaded, where.step, build_model(8))
    strategy = swm.FlashSaveStrategy(sw.FlashStorageWriter("job", replicas=1))
    queue = swm.AsyncCallsQueue(persistent=True)  # Megatron's persistent caller, on CPU
    queue.schedule_async_request(swm.save(sharded_state(trained(4), 4), 4, strategy, async_save=True))
    queue.close()  # finalizes what is pending: training went on from the resumed step
    strategy.writer.wait()  # its replicas are on the other node before the job ends
    report["latest_after_next_save"] = reader.latest_step()


def main() -> None:
    warnings.simplefilter("ignore")
    out, long_term, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    rank = dist.get_rank()
    report: dict = {"rank": rank, "node": os.environ["STALWART_NODE"]}
    try:
        save_round(report, long_term) if mode == "save" else resume_round(report)
    except BaseException:
        report["crash"] = traceback.format_exc()
        raise
    finally:
        Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(report, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
