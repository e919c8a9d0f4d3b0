"""What a gradient-inversion attacker is handed besides the model and its weights
(:class:`AttackerKnowledge`) and what an attack returns (:class:`Reconstruction`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

Method = Literal["dlg", "idlg", "inverting-gradients", "feature-span"]
MultiStep = Literal["average", "simulate"]
LabelRecovery = Literal["analytic", "joint"]


@dataclass(frozen=True)
class AttackerKnowledge:
    """What the attacker is assumed to know besides the model and its weights.

    Attributes
    ----------
    batch_size : int
        Samples in the party's (single) batch.
    labels_known : bool
        Whether the true labels are handed to the attack (strongest attacker).
    local_steps : int
        Local SGD steps the party took on that batch.
    lr : float
        The party's SGD learning rate.
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)``.
    num_classes : int
        Number of output classes.
    auxiliary_images : Tensor, optional
        Public images of the task's distribution that the attacker holds (the server's
        public data), used only to estimate the batch's mean prediction when counting
        labels (LLG*-style); never the party's data.
    samples : int
        Distinct samples behind the update when the local steps are simulated (each step
        then takes ``batch_size`` of them, in turn); 0 means ``batch_size``.
    momentum, weight_decay : float
        The party's SGD momentum (heavy ball, no dampening) and L2 weight decay, as
        ``torch.optim.SGD`` applies them; the server set both with lr.
    """

    batch_size: int
    labels_known: bool = False
    local_steps: int = 1
    lr: float = 1.0
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    auxiliary_images: Tensor | None = field(default=None, compare=False, repr=False)
    samples: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.samples < 0:
            raise ValueError(f"samples: must be >= 0 (0 = batch_size), got {self.samples}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps: must be >= 1, got {self.local_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    @property
    def images(self) -> int:
        """How many images the attack reconstructs."""
        return self.samples or self.batch_size

    @property
    def step_weight(self) -> float:
        """``Σ_s`` of the weight each local step's gradient gets in ``−Δ/lr``.

        Plain SGD: ``S``. With momentum ``μ`` the gradient of step ``k`` is carried into
        the ``S − k`` later steps too, ``(1 − μ^(S−k+1)) / (1 − μ)`` in all, so equal
        gradients sum to ``Σ_j (1 − μ^j) / (1 − μ)``.
        """
        mu, steps = self.momentum, self.local_steps
        if mu == 0.0:
            return float(steps)
        return sum((1.0 - mu**j) / (1.0 - mu) for j in range(1, steps + 1))


@dataclass
class Reconstruction:
    """Outcome of one inversion: images in [0, 1] (CPU, float32), labels, the best
    gradient-matching objective reached (lower is better) and the wall time."""

    images: Tensor
    labels: Tensor
    objective: float
    seconds: float
