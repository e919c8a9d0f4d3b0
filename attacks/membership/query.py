"""The attacker's whole view of a target (:class:`QueryAPI`: images in, logits out) and the
scores membership attacks compute from logits (hinge, LOSS)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn


class LabelledImages(Protocol):
    """Anything with ``images`` (N, ...) and ``labels`` (N,) tensors (e.g. ``ImageSet``)."""

    images: torch.Tensor
    labels: torch.Tensor


# --------------------------------------------------------------------------- the view


class QueryAPI:
    """The attacker's view of a model: images in, logits out, nothing else.

    The model is copied when the API is built (later training does not leak through) and
    kept only inside a closure; the object has no attribute holding the model, its
    parameters, gradients or training data. Answers are detached float64 numpy arrays.

    Parameters
    ----------
    model : nn.Module
        The model to serve; it is deep-copied and put in eval mode.
    device : torch.device or str
        Where the copy runs.
    batch_size : int
        Images per forward pass.
    """

    __slots__ = ("_answer", "queries")

    def __init__(
        self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 1024
    ) -> None:
        served = copy.deepcopy(model).to(device).eval()
        for p in served.parameters():
            p.requires_grad_(False)

        @torch.no_grad()
        def answer(images: torch.Tensor) -> np.ndarray:
            outs = [
                served(images[i : i + batch_size].to(device)).double().cpu()
                for i in range(0, images.shape[0], batch_size)
            ]
            return torch.cat(outs).numpy() if outs else np.zeros((0, 0))

        self._answer = answer
        self.queries = 0

    def query(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The model's logits on ``images`` as a (N, num_classes) float64 array."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        x = x.detach().to(torch.float32)
        self.queries += int(x.shape[0])
        return self._answer(x)

    def __repr__(self) -> str:
        return f"QueryAPI(queries={self.queries})"


# --------------------------------------------------------------------------- scores


def hinge_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correct-class logit minus the largest other logit, per row.

    Parameters
    ----------
    logits : np.ndarray
        (N, C) model outputs, C >= 2.
    labels : np.ndarray
        (N,) integer labels.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] != y.size:
        raise ValueError(f"hinge_score: logits (N, C>=2) and labels (N,), got {z.shape}, {y.shape}")
    rows = np.arange(y.size)
    correct = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return correct - others.max(axis=1)


def loss_attack(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LOSS attack statistic: the negated cross-entropy (higher = more likely a member)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"loss_attack: logits (N, C) and labels (N,), got {z.shape}, {y.shape}")
    rows = np.arange(y.size)
    # log p_y = -log(1 + sum_{j != y} exp(z_j - z_y)): written with logaddexp (log1p
    # inside) it stays distinct for margins beyond ~37, where z_y - logsumexp(z) rounds
    # to exactly 0 and ties the most confident records.
    d = z - z[rows, y][:, None]
    d[rows, y] = -np.inf
    return -np.logaddexp(0.0, np.logaddexp.reduce(d, axis=1))


@dataclass(frozen=True, eq=False)
class LabelledTensors:
    """Images and labels as two tensors: the simplest :class:`LabelledImages`."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])
