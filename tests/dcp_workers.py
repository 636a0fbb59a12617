"""Worker functions for the multi-process DCP tests (importable by ``spawn`` children)."""

from __future__ import annotations

import datetime
import json
import os
import traceback
import warnings
from pathlib import Path


def _model():
    import torch

    torch.manual_seed(0)  # the same on every rank: a replicated model
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _fresh_model_state() -> dict:
    import torch

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return model.state_dict()


def save_and_load_two_ranks(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Save a replicated model plus a per-rank entry at steps 10 (dcp.save) and 11 (dcp.async_save),
    then load both into fresh tensors; write what was checked to ``out/result-<rank>.json``."""
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from stalwart import FlashStorageReader, FlashStorageWriter

    result: dict = {"rank": rank, "ok": False}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        model = _model()
        key = f"rank{rank}"
        expected = {
            10: {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                key: torch.full((100,), rank),
            }
        }
        writer = FlashStorageWriter("job", root=root)
        try:
            dcp.save(
                {"model": model.state_dict(), key: torch.full((100,), rank)},
                checkpoint_id=writer.step_dir(10),
                storage_writer=writer,
            )
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-2.0).add_(0.5)  # the same on both ranks: still replicated
            entry = torch.full((100,), 1000 + rank)
            expected[11] = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                key: entry.clone(),
            }
            future = dcp.async_save(
                {"model": model.state_dict(), key: entry},
                checkpoint_id=writer.step_dir(11),
                storage_writer=writer,
            )
            future.result(timeout=60)
        finally:
            writer.close()
        dist.barrier()

        reader = FlashStorageReader("job", root=root)
        result["latest_step"] = reader.latest_step()
        checks: dict[str, bool] = {}
        for step, checkpoint_id in ((10, 10), (11, reader.step_dir(11))):
            target = {"model": _fresh_model_state(), key: torch.full((100,), -7)}
            dcp.load(target, checkpoint_id=checkpoint_id, storage_reader=reader)
            for name, want in expected[step]["model"].items():
                got = target["model"][name]
                checks[f"{step}/model.{name}"] = bool(got.dtype == want.dtype and torch.equal(got, want))
            got = target[key]
            want = expected[step][key]
            checks[f"{step}/{key}"] = bool(got.dtype == want.dtype and torch.equal(got, want))
        result["checks"] = checks
        # which ranks' objects hold the items of step 11 (DCP spreads replicated items over ranks)
        metadata = reader.read_metadata()
        result["item_ranks"] = sorted({item.rank for item in metadata.storage_data.values()})
        dist.barrier()
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        Path(out, f"result-{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0 if result["ok"] else 1)  # no lingering threads keep the child alive
