"""Task models for 28×28 single-channel images.

All models are Opacus-compatible (no BatchNorm) and take inputs in [0, 1] of shape
(N, 1, 28, 28); normalisation, where useful, happens inside the model so that attacks
reconstruct images in pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

from privfl.config import Scenario

INPUT_SHAPE = (1, 28, 28)


class SmallCNN(nn.Module):
    """Two conv blocks (GroupNorm, ReLU, max-pool) and two dense layers; ~0.2M params."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Two hidden ReLU layers."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SigmoidLeNet(nn.Module):
    """The LeNet variant of Zhu et al. (DLG, NeurIPS 2019): sigmoid activations, strided
    5×5 convolutions and no pooling, which keeps the gradient twice differentiable and
    informative — the model DLG was demonstrated on.

    Weights and biases are drawn uniform(−0.5, 0.5), as in the DLG reference code
    (``weights_init`` of mit-han-lab/dlg), from torch's global RNG (``build_model`` seeds
    it). With PyTorch's default fan-in scaling the sigmoids sit in their linear middle and
    the untrained network is nearly constant in its input, so images sharing a label enter
    the gradient almost only through their sum; the wider initialisation makes every
    layer strongly input-dependent.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * 7 * 7, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def build_task_model(name: str, num_classes: int, hidden: int = 128) -> nn.Module:
    """The bare task model called ``name`` (cnn | mlp | lenet)."""
    if name == "cnn":
        return SmallCNN(num_classes, hidden)
    if name == "mlp":
        return MLP(num_classes, hidden)
    if name == "lenet":
        return SigmoidLeNet(num_classes)
    raise ValueError(f"model.name: unknown model {name!r}; accepted: cnn, mlp, lenet")


def build_model(scenario: Scenario, num_classes: int) -> nn.Module:
    """The model every party of ``scenario`` trains, seeded by the scenario's seed.

    When the scenario's attack ships a rigged model (imprint), the task model is wrapped
    here so that the server and all parties agree on the architecture.
    """
    torch.manual_seed(scenario.scenario.seed)
    model = build_task_model(scenario.model.name, num_classes, scenario.model.hidden)
    if scenario.attack.kind == "imprint":
        from privfl.attacks.imprint import rig_model

        model = rig_model(model, scenario, num_classes)
    return model
