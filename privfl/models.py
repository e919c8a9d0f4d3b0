"""Task models: built-in ones that adapt to the data's sample shape, or the user's own.

``model.name`` is ``cnn``, ``mlp``, ``lenet`` or ``"module:factory"``, where
``factory(input_shape, num_classes)`` returns any ``torch.nn.Module`` mapping a batch of
``(N, *input_shape)`` to ``(N, num_classes)`` logits. The built-in models are
Opacus-compatible (no BatchNorm) and take inputs in [0, 1]: images ``(C, H, W)`` (the
CNN and the LeNet) or any shape (the MLP flattens, so it also takes tabular rows
``(d,)``); normalisation, where useful, happens inside the model so that attacks
reconstruct images in pixel space. For MNIST's ``(1, 28, 28)`` they are the layers, in
the order, they always were, so a seed gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from privfl.config import ScenarioError
from privfl.plugins import load_object

INPUT_SHAPE = (1, 28, 28)
BUILTIN_MODELS = ("cnn", "mlp", "lenet")


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``input_shape``, or a ScenarioError saying what ``name`` needs."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 4:
        raise ScenarioError(
            f"model.name: {name!r} takes images of shape (C, H, W) with H, W >= 4; the data's "
            f"samples have shape {shape}: use 'mlp' (any shape) or a 'module:factory' model"
        )
    c, h, w = shape
    return c, h, w


class SmallCNN(nn.Module):
    """Two conv blocks (GroupNorm, ReLU, max-pool) and two dense layers; ~0.2M params
    on 1×28×28."""

    def __init__(
        self,
        num_classes: int = 10,
        hidden: int = 128,
        input_shape: Sequence[int] = INPUT_SHAPE,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("cnn", input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
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
            nn.Linear(32 * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Two hidden ReLU layers on the flattened sample (images or tabular rows)."""

    def __init__(
        self,
        num_classes: int = 10,
        hidden: int = 128,
        input_shape: Sequence[int] = INPUT_SHAPE,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
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

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = INPUT_SHAPE) -> None:
        super().__init__()
        c, h, w = _image_shape("lenet", input_shape)
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        # Two stride-2 convolutions with padding 2 halve each side, rounding up.
        self.fc = nn.Linear(12 * -(-h // 4) * -(-w // 4), num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def build_task_model(
    name: str,
    num_classes: int,
    hidden: int = 128,
    *,
    input_shape: Sequence[int] = INPUT_SHAPE,
) -> nn.Module:
    """The bare task model called ``name`` for samples of ``input_shape``.

    Parameters
    ----------
    name : str
        ``cnn`` | ``mlp`` | ``lenet`` | ``"module:factory"`` (``factory(input_shape,
        num_classes)``, imported from the working directory or ``PYTHONPATH``).
    num_classes : int
        Outputs (logits) of the model.
    hidden : int
        Width of the built-in models' hidden layers (not passed to a factory).
    input_shape : Sequence[int]
        Shape of one sample, e.g. ``(1, 28, 28)``, ``(3, 32, 32)`` or ``(d,)``.

    Raises
    ------
    ScenarioError
        Naming ``model.name``: an unknown name, a built-in model that cannot take the
        shape, or a factory that fails to import, raises, returns no ``nn.Module`` or a
        model whose output is not ``(N, num_classes)``.
    """
    shape = tuple(int(s) for s in input_shape)
    if name == "cnn":
        return SmallCNN(num_classes, hidden, shape)
    if name == "mlp":
        return MLP(num_classes, hidden, shape)
    if name == "lenet":
        return SigmoidLeNet(num_classes, shape)
    if ":" not in name:
        raise ScenarioError(
            f"model.name: unknown model {name!r}; accepted: {', '.join(BUILTIN_MODELS)} or "
            "'module:factory'"
        )
    return _user_model(name, num_classes, shape)


def _user_model(spec: str, num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    factory = load_object(spec, "model.name")
    try:
        model = factory(shape, num_classes)
    except Exception as exc:  # the user's code: any failure is reported against the key
        raise ScenarioError(
            f"model.name: {spec}({shape}, {num_classes}) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ScenarioError(
            f"model.name: {spec}({shape}, {num_classes}) returned a {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    _check_output(spec, model, shape, num_classes)
    return model


def _check_output(spec: str, model: nn.Module, shape: tuple[int, ...], num_classes: int) -> None:
    """Run a batch of two zero samples through ``model`` (eval mode, no gradients, no
    random draws) so a shape mismatch fails here, naming the key, not deep in training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:  # the user's code: any failure is reported against the key
        raise ScenarioError(
            f"model.name: the model of {spec} fails on a batch of shape {(2, *shape)} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ScenarioError(
            f"model.name: the model of {spec} maps a batch of shape {(2, *shape)} to {got}, "
            f"expected logits of shape (2, {num_classes})"
        )
