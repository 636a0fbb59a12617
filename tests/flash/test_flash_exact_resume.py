"""An exact resume: a run stopped and restored from the flash tier equals an uninterrupted one, bit for
bit, with the data loader's position and every random generator restored with the step."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import stalwart as sw

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class Noisy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DATA = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), float(i % 3)) for i in range(40)]


class ShufflingLoader:
    """Batches of DATA in an order drawn from torch's global generator at each epoch's start, with its
    position as state (what a sampler without a generator of its own does)."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self.order):
            self.order, self.position = torch.randperm(len(DATA)).tolist(), 0
        picked = [DATA[i] for i in self.order[self.position : self.position + 8]]
        self.position += 8
        return torch.stack([x for x, _ in picked]), torch.tensor([y for _, y in picked])

    def state_dict(self) -> dict:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = list(state["order"]), state["position"]


def parts(seed: int, loader: object) -> dict:
    """A model and an optimizer built from ``seed`` (a resumed process builds different ones)."""
    torch.manual_seed(seed)
    model = Noisy()
    return {"model": model, "optim": torch.optim.Adam(model.parameters(), lr=1e-2), "loader": loader}


def train(state: dict, start: int, stop: int, flash: sw.FlashCheckpointer | None) -> list[float]:
    """Steps ``start``..``stop``; each draws from torch (dropout, shuffling), NumPy and Python."""
    losses = []
    loader = state["loader"]
    batches = iter(loader) if isinstance(loader, StatefulDataLoader) else None
    for step in range(start, stop):
        if batches is None:
            x, y = loader.next_batch()
        else:
            x, y = next(batches, (None, None))
            if x is None:  # the next epoch
                batches = iter(loader)
                x, y = next(batches)
        noise = float(np.random.normal()) * 1e-3 + random.random() * 1e-3
        loss = ((state["model"](x).squeeze(1) - y.float()) ** 2).mean() + noise
        state["optim"].zero_grad()
        loss.backward()
        state["optim"].step()
        losses.append(loss.item())
        if flash is not None:
            flash.save(step + 1, state)
    return losses


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_stopped_and_resumed(root: Path, make_loader, stop: int, total: int) -> tuple[list, list, dict, dict]:
    """The uninterrupted run's losses and state, and those of a run stopped after ``stop`` steps and
    resumed in a 'new process' (other seeds everywhere, a fresh model, optimizer and loader)."""
    seed_everything(0)
    whole = parts(0, make_loader(0))
    expected = train(whole, 0, total, None)

    seed_everything(0)
    first = parts(0, make_loader(0))
    with sw.FlashCheckpointer("exact", root=root, async_save=False) as flash:
        before = train(first, 0, stop, flash)
    assert before == expected[:stop]

    seed_everything(1234)
    resumed = parts(99, make_loader(99))
    with sw.FlashCheckpointer("exact", root=root, async_save=False) as flash:
        assert flash.restore(resumed) == stop
        after = train(resumed, stop, total, flash)
    return expected[stop:], after, whole, resumed


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """Stopped mid-epoch; the next epochs' orders, the dropout masks and the NumPy and Python draws all
    come from the generators restored with the step."""
    expected, after, whole, resumed = run_stopped_and_resumed(tmp_path, lambda _: ShufflingLoader(), 7, 17)
    assert after == expected
    for name, value in whole["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[name], value), name
    assert resumed["optim"].state_dict()["state"][0]["step"] == 17


def test_a_stateful_data_loader_resumes_at_its_batch(tmp_path: Path) -> None:
    """torchdata's StatefulDataLoader, stopped 2 batches into an epoch of 5: the rest of the epoch is
    the same batches, none skipped or repeated. (Its own ``generator`` is not in its state_dict, so
    the order of later epochs is its to keep, not stalwart's.)"""

    def loader(seed: int) -> StatefulDataLoader:
        return StatefulDataLoader(
            DATA, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    expected, after, _, resumed = run_stopped_and_resumed(tmp_path, loader, 7, 10)
    assert after == expected
    assert resumed["loader"].state_dict()["_num_yielded"] == 5


def test_without_rng_the_generators_are_left_alone(tmp_path: Path) -> None:
    with sw.FlashCheckpointer("plain", root=tmp_path, async_save=False) as flash:
        flash.save(1, {"w": torch.ones(3)})
    seed_everything(5)
    draws = (random.random(), float(np.random.normal()), torch.rand(1).item())
    seed_everything(5)
    with sw.FlashCheckpointer("plain", root=tmp_path, rng=False) as flash:
        state = {"w": torch.zeros(3)}
        assert flash.restore(state) == 1 and torch.equal(state["w"], torch.ones(3))
    assert (random.random(), float(np.random.normal()), torch.rand(1).item()) == draws

    with sw.FlashCheckpointer("rng", root=tmp_path, async_save=False) as flash:
        seed_everything(7)
        flash.save(1, {"w": torch.ones(3)})
        draws = (random.random(), float(np.random.normal()), torch.rand(1).item())
    seed_everything(8)
    with sw.FlashCheckpointer("rng", root=tmp_path) as flash:
        state = {"w": torch.zeros(3)}
        assert flash.restore(state) == 1
        assert "_stalwart" not in state  # what stalwart adds does not reach the caller's state
    assert (random.random(), float(np.random.normal()), torch.rand(1).item()) == draws


def test_the_reserved_key_and_a_bad_rng_flag_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rng='yes' is not accepted"):
        sw.FlashCheckpointer("bad", root=tmp_path, rng="yes")  # type: ignore[arg-type]
    with sw.FlashCheckpointer("bad", root=tmp_path, async_save=False) as flash:
        with pytest.raises(ValueError, match=r"key '_stalwart'.*rename that key"):
            flash.save(1, {"_stalwart": torch.ones(1)})
        with pytest.raises(ValueError, match="key '_stalwart'"):
            flash.restore({"_stalwart": torch.ones(1)})
        assert flash.steps()["flash"] == []
