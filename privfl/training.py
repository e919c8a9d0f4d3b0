"""Local training and evaluation, with batches that evaluators can rebuild.

A party's batches in a round are a pure function of (scenario seed, party, round), so
an attack's evaluator can recover the ground truth a party trained on without the
attacker ever being handed it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from privfl.config import Scenario, ScenarioError
from privfl.data import ImageSet, load_federation
from privfl.seeding import derive_seed


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator, and the CUDA ones once CUDA is in use.

    ``torch.manual_seed`` also queues seeding for every accelerator backend that is not
    initialised, formatting a stack trace for each (a third of a millisecond a call,
    which a thousand parties pay every round).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"scenario.device: {name!r} asks for CUDA but torch sees no CUDA device here; "
            "use 'auto' or 'cpu'"
        )
    return torch.device(name)


@dataclass(frozen=True)
class TrainConfig:
    """A party's local-training hyper-parameters (the ``[training]`` section), explicit.

    ``seed`` is the run seed a party's batch order and torch seed are derived from,
    together with its index and the round (:func:`local_batches`): the same config gives
    the same batches, so an evaluator can rebuild what a party trained on.
    """

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: int = 1
    # > 0: exactly this many optimiser steps per round instead of local_epochs.
    local_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"TrainConfig.optimizer: 'sgd' or 'adam', got {self.optimizer!r}")
        if self.batch_size < 1 or self.local_epochs < 1 or self.local_steps < 0:
            raise ValueError(
                "TrainConfig: need batch_size >= 1, local_epochs >= 1, local_steps >= 0, got "
                f"{self.batch_size}, {self.local_epochs}, {self.local_steps}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: must be > 0, got {self.lr}")

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> TrainConfig:
        """The config ``scenario.training`` and ``scenario.seed`` describe."""
        t = scenario.training
        return cls(
            optimizer=t.optimizer,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            batch_size=t.batch_size,
            local_epochs=t.local_epochs,
            local_steps=t.local_steps,
            seed=scenario.scenario.seed,
        )


def train_config(config: TrainConfig | Scenario) -> TrainConfig:
    """``config`` itself, or the :class:`TrainConfig` of a scenario."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_scenario(config)


def local_steps(n: int, config: TrainConfig | Scenario) -> int:
    """Optimiser steps a party with ``n`` training samples takes in one round."""
    t = train_config(config)
    if t.local_steps > 0:
        return t.local_steps
    return t.local_epochs * max(1, -(-n // t.batch_size))


def local_batches(
    n: int, config: TrainConfig | Scenario, party: int, server_round: int
) -> list[torch.Tensor]:
    """Index batches (into the party's train set) for every local step of a round."""
    t = train_config(config)
    if n < 1:
        raise ValueError(f"party {party} has no training data")
    gen = torch.Generator().manual_seed(derive_seed(t.seed, "batches", party, server_round))
    steps = local_steps(n, t)
    batches: list[torch.Tensor] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    while len(batches) < steps:
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = order[pos : pos + t.batch_size]
        pos += t.batch_size
        batches.append(batch)
    return batches


def round_batch_data(scenario: Scenario, party: int, server_round: int) -> ImageSet:
    """Every sample ``party`` trained on in ``server_round``, in batch order (ground truth
    for evaluating attacks; duplicates appear once per use)."""
    train = load_federation(scenario).parties[party].train
    idx = torch.cat(local_batches(len(train), scenario, party, server_round))
    return train.subset(idx)


@dataclass(frozen=True)
class TrainStats:
    num_examples: int
    loss: float
    steps: int


def make_optimizer(model: nn.Module, config: TrainConfig | Scenario) -> torch.optim.Optimizer:
    """The optimiser ``config`` names over ``model``'s parameters."""
    t = train_config(config)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def train_local(
    model: nn.Module,
    data: ImageSet,
    config: TrainConfig | Scenario,
    *,
    party: int,
    server_round: int,
    device: torch.device,
    insert: Callable[[float], torch.Tensor | None] | None = None,
    proximal_mu: float = 0.0,
) -> TrainStats:
    """Plain (non-private) local training for one round; returns the mean batch loss.

    ``insert(rate)`` (an auditor's canary records) may return a flat gradient over
    ``model.parameters()`` summed over the extra records that join a step (each with
    probability ``rate`` = batch / N); it enters the batch mean like theirs would.
    ``proximal_mu`` > 0 adds FedProx's term mu/2·||w − w_global||² to the objective
    (the reported loss stays the data loss). ``config`` may be a scenario (its
    :meth:`TrainConfig.from_scenario`).
    """
    config = train_config(config)
    model.to(device).train()
    opt = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    images, labels = data.images.to(device), data.labels.to(device)
    seed_torch(derive_seed(config.seed, "train", party, server_round))
    total, steps = 0.0, 0
    for batch in local_batches(len(data), config, party, server_round):
        batch = batch.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images[batch]), labels[batch])
        if anchor:
            params = zip(model.parameters(), anchor, strict=True)
            drift = sum((p - a).pow(2).sum() for p, a in params)
            (loss + 0.5 * proximal_mu * drift).backward()
        else:
            loss.backward()
        if insert is not None and (extra := insert(len(batch) / len(data))) is not None:
            _add_flat(model, extra.to(device) / len(batch))
        opt.step()
        total += float(loss.detach())
        steps += 1
    return TrainStats(num_examples=len(data), loss=total / max(steps, 1), steps=steps)


@torch.no_grad()
def _add_flat(model: nn.Module, flat: torch.Tensor) -> None:
    pos = 0
    for p in model.parameters():
        size = p.numel()
        p.grad.add_(flat[pos : pos + size].view_as(p).to(p.dtype))
        pos += size


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        return float("nan"), float("nan")
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / len(data), correct / len(data)
