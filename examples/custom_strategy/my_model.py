"""A user's own model: ``build(input_shape, num_classes) -> torch.nn.Module``."""

from __future__ import annotations

import math

from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-layer perceptron over the flattened sample (no BatchNorm: DP-ready)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )
