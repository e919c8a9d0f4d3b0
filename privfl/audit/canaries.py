"""The canaries and their scores: Dirac gradients, canary parties, mislabelled records."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privfl.audit.keys import _distinct, subkey
from privfl.dp import KeyStream


@dataclass(frozen=True, eq=False)
class DiracCanaries:
    """Gradient canaries: canary j is the vector ``clip`` · e_{coordinates[j]} in R^dim.

    Coordinates index the model's parameters flattened in ``model.parameters()`` order.
    """

    coordinates: np.ndarray
    dim: int
    clip: float

    def __len__(self) -> int:
        return int(self.coordinates.size)

    def gradient(self, selected: np.ndarray) -> torch.Tensor:
        """The summed gradient of the canaries at ``selected`` (indices), float32 (dim,)."""
        out = torch.zeros(self.dim)
        out[torch.from_numpy(self.coordinates[selected])] = self.clip
        return out

    def scores(self, update: np.ndarray | torch.Tensor) -> np.ndarray:
        """Each canary's inner product with a flat ``update``, over ``clip``: its
        coordinate there."""
        u = torch.as_tensor(update).reshape(-1)
        return u[torch.from_numpy(self.coordinates)].double().numpy()


def dirac_canaries(
    m: int,
    dim: int,
    key: bytes,
    *,
    clip: float = 1.0,
    within: tuple[int, int] | None = None,
) -> DiracCanaries:
    """``m`` distinct Dirac directions in R^dim, each of norm ``clip``.

    Nasr et al. (USENIX Security 2023): a white-box auditor who sees every released
    (noisy) sum of clipped gradients can insert any gradient of norm at most the clip;
    one coordinate each keeps the canaries orthogonal to each other. ``within = (start,
    stop)`` draws the coordinates from that slice only, e.g. one large weight matrix where
    the data's own gradients are small next to the noise.
    """
    if clip <= 0:
        raise ValueError(f"dirac_canaries: clip must be > 0, got {clip}")
    start, stop = within if within is not None else (0, dim)
    if not 0 <= start < stop <= dim:
        raise ValueError(f"dirac_canaries: within must be a slice of [0, {dim}), got {within}")
    coords = _distinct(KeyStream(subkey(key, "dirac")), m, stop - start) + start
    return DiracCanaries(coords, dim, float(clip))


def parameter_slice(model: nn.Module, name: str) -> tuple[int, int]:
    """Where parameter ``name`` sits in the flat ``model.parameters()`` vector."""
    pos = 0
    for n, p in model.named_parameters():
        if n == name:
            return pos, pos + p.numel()
        pos += p.numel()
    names = [n for n, _ in model.named_parameters()]
    raise KeyError(f"parameter_slice: no parameter {name!r}; the model has {names}")


@dataclass(frozen=True, eq=False)
class CanaryParties:
    """Canary parties: party j's update is ``clip`` · u_j for a fixed unit direction u_j.

    u_j is sparse (``support`` random coordinates with random signs ±1/sqrt(support)): m
    directions over d weights then cost m·support numbers rather than m·d, and two of
    them share support²/d coordinates on average, so they stay nearly orthogonal to each
    other and to the real updates, which is all the cosine test needs.
    """

    coordinates: np.ndarray
    signs: np.ndarray
    dim: int
    clip: float

    def __len__(self) -> int:
        return int(self.coordinates.shape[0])

    def update_sum(self, selected: np.ndarray) -> np.ndarray:
        """Sum of the updates of the canary parties at ``selected``, float64 (dim,)."""
        out = np.zeros(self.dim)
        np.add.at(out, self.coordinates[selected].ravel(), self.clip * self.signs[selected].ravel())
        return out

    def cosines(self, aggregate: np.ndarray) -> np.ndarray:
        """cos(u_j, ``aggregate``) for every canary party (0 for a zero aggregate)."""
        a = np.asarray(aggregate, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(a))
        if norm == 0:
            return np.zeros(len(self))
        return (a[self.coordinates] * self.signs).sum(axis=1) / norm


def canary_party_directions(
    m: int, dim: int, key: bytes, *, clip: float = 1.0, support: int = 256
) -> CanaryParties:
    """``m`` canary parties with random unit directions (Andrew et al., ICLR 2024)."""
    if not 1 <= support <= dim:
        raise ValueError(f"support must be in [1, {dim}], got {support}")
    stream = KeyStream(subkey(key, "canary-parties"))
    coords = np.stack([_distinct(stream, support, dim) for _ in range(m)])
    signs = np.where(stream.uint64(m * support) & np.uint64(1), 1.0, -1.0).reshape(m, support)
    return CanaryParties(coords, signs / math.sqrt(support), dim, float(clip))


def mislabelled_canaries(labels: torch.Tensor, key: bytes, num_classes: int) -> torch.Tensor:
    """Input-space canaries: each record's label replaced by a different class, uniformly.

    A model that trained on such a record fits its wrong label far better than one that
    did not, so the loss on the wrong label is the black-box score (:func:`loss_scores`).
    """
    if num_classes < 2:
        raise ValueError(f"mislabelled_canaries: need >= 2 classes, got {num_classes}")
    shift = KeyStream(subkey(key, "mislabel")).uint64(labels.numel()) % np.uint64(num_classes - 1)
    return (labels + 1 + torch.from_numpy(shift.astype(np.int64))) % num_classes


def loss_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Black-box score of each record: minus its cross-entropy loss (high: included)."""
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(images), labels, reduction="none")
    return -losses.double().cpu().numpy()
