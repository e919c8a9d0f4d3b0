"""The plain classifier training that shadow models and membership targets share."""

from __future__ import annotations

import torch
from torch import nn

from privfl.attacks.membership.query import LabelledImages
from privfl.config import Scenario
from privfl.training import make_optimizer


def train_classifier(
    model: nn.Module,
    data: LabelledImages,
    scenario: Scenario,
    *,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Plain mini-batch training for ``epochs`` with the scenario's optimiser settings.

    Used for the over-fit single target and for LiRA's shadows; returns ``model``
    (trained in place, left in eval mode).
    """
    model.to(device).train()
    opt = make_optimizer(model, scenario)
    bs = scenario.training.batch_size
    x, y = data.images.to(device), data.labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, order.numel(), bs):
            b = order[i : i + bs]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()
