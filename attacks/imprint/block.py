"""The imprint block and the rigged model: the measurement the neurons share, the bin
edges calibrated on the attacker's public data, and :func:`rig_model`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from privfl.attacks.imprint.sizing import imprint_bins_of
from privfl.config import Scenario

FAMILIES = 3
WEIGHT_KEY = "imprint.encoder.weight"
BIAS_KEY = "imprint.encoder.bias"
IMAGE_SHAPE = (1, 28, 28)
# Offsets of the generators drawn from the scenario seed (kept apart from the task model).
_MEASUREMENT_SEED = 7001
_PROBE_SEED = 7002


def measurement_vector(
    kind: str, *, seed: int = 0, image_shape: tuple[int, ...] = IMAGE_SHAPE
) -> torch.Tensor:
    """The linear measurement ``a`` (flattened, float32) the imprint neurons share.

    ``brightness``: the mean pixel (feature); ``random``: a seeded Gaussian direction of
    unit norm; ``dct``: the orthonormal 2-D DCT-II basis image of mode (1, 1), i.e. the
    balance between the image's quadrants, the same in every channel (images only).
    """
    d = math.prod(image_shape)
    if kind == "brightness":
        return torch.full((d,), 1.0 / d)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(d, generator=gen, dtype=torch.float64)
        return (a / a.norm()).float()
    if kind == "dct":
        if len(image_shape) < 2:
            raise ValueError(
                f"attack.imprint.measurement: 'dct' needs images, the samples have shape "
                f"{tuple(image_shape)}; use 'brightness' or 'random'"
            )
        h, w = image_shape[-2], image_shape[-1]
        ch = torch.cos(math.pi * (2 * torch.arange(h, dtype=torch.float64) + 1) / (2 * h))
        cw = torch.cos(math.pi * (2 * torch.arange(w, dtype=torch.float64) + 1) / (2 * w))
        basis = torch.outer(ch, cw) * (2.0 / math.sqrt(h * w))
        return basis.expand(*image_shape).reshape(d).float()
    raise ValueError(
        f"attack.imprint.measurement: unknown {kind!r}; accepted: brightness, random, dct"
    )


def bin_edges(measurements: torch.Tensor, bins: int) -> torch.Tensor:
    """Lower edges ``t_1 < … < t_k`` of ``bins`` equal-mass bins of ``measurements``.

    ``t_1`` lies below every measurement (half the data's range below its minimum), so
    the lowest bin catches the lower tail; ``t_j`` for ``j >= 2`` is the
    ``(j-1)/bins`` quantile; the top bin is open above.
    """
    if bins < 1:
        raise ValueError(f"bin_edges: bins must be >= 1, got {bins}")
    m = measurements.detach().double().flatten()
    if m.numel() < 2:
        raise ValueError(f"bin_edges: need at least 2 measurements, got {m.numel()}")
    lo, hi = m.min(), m.max()
    span = float(hi - lo) or 1.0
    inner = torch.quantile(m, torch.arange(1, bins, dtype=torch.float64) / bins)
    edges = torch.cat([(lo - 0.5 * span).reshape(1), inner])
    # Tied measurements give tied quantiles: spread them so every neuron is distinct
    # in float32 (a tie leaves one bin empty, which costs nothing).
    return (edges + torch.arange(bins, dtype=torch.float64) * span * 1e-6).float()


@dataclass(frozen=True)
class ImprintInfo:
    """What the attacker knows about the block it shipped (and needs to reconstruct).

    Attributes
    ----------
    bins : int
        Neurons per family ``k``.
    families : int
        Probe families ``F`` (rows are stored family-major: row ``f*k + i``).
    image_shape : tuple[int, ...]
        Shape of one input sample (an image ``(C, H, W)`` or a row ``(d,)``).
    weight_key, bias_key : str
        State-dict keys of the encoder's weight ``(F*k, d)`` and bias ``(F*k,)``.
    """

    bins: int
    families: int = FAMILIES
    image_shape: tuple[int, ...] = IMAGE_SHAPE
    weight_key: str = WEIGHT_KEY
    bias_key: str = BIAS_KEY

    @property
    def clip(self) -> bool:
        """Whether readouts are images, clipped to [0, 1] (rows are not)."""
        return len(self.image_shape) > 1

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], image_shape: tuple[int, ...] = IMAGE_SHAPE
    ) -> ImprintInfo:
        """The info of the block whose weights are in ``state`` (a rigged state dict) for
        samples of ``image_shape`` (the attacker knows the data's shape; the weights only
        hold its size)."""
        if WEIGHT_KEY not in state:
            raise KeyError(f"no imprint block in the state dict (missing {WEIGHT_KEY!r})")
        rows, d = state[WEIGHT_KEY].shape
        if rows % FAMILIES or d != math.prod(image_shape):
            raise ValueError(
                f"{WEIGHT_KEY} has shape {(rows, d)}; expected ({FAMILIES}*k, "
                f"{math.prod(image_shape)}) for samples of shape {tuple(image_shape)}"
            )
        return cls(bins=rows // FAMILIES, image_shape=tuple(image_shape))


class ImprintBlock(nn.Module):
    """Imprint block: ``y = x + C · pool(ReLU(A x + b))``, exact identity at the weights
    it is built with.

    Parameters
    ----------
    measurement : Tensor
        ``(d,)`` the measurement direction ``a`` shared by every neuron.
    edges : Tensor
        ``(k,)`` increasing bin lower edges ``t_i`` (biases are ``-t_i``).
    image_shape : tuple[int, ...]
        Shape of one input sample (image or row); ``d`` is its product.
    probe_seed : int
        Seed of the probe columns ``c_A``, ``c_B`` (Gaussian, ``probe_scale`` per entry).
    probe_scale : float
        Standard deviation of the probe entries; larger keeps the bin gradients well
        above the fixed-point step of secure aggregation.
    """

    def __init__(
        self,
        measurement: torch.Tensor,
        edges: torch.Tensor,
        *,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        probe_seed: int = 0,
        probe_scale: float = 1.0,
    ) -> None:
        super().__init__()
        d = math.prod(image_shape)
        k = int(edges.numel())
        if measurement.shape != (d,):
            raise ValueError(f"measurement: expected shape ({d},), got {tuple(measurement.shape)}")
        if k < 1 or bool((edges[1:] <= edges[:-1]).any()):
            raise ValueError("edges: need at least one edge, strictly increasing")
        self.image_shape = tuple(image_shape)
        self.info = ImprintInfo(bins=k, image_shape=self.image_shape)
        self.encoder = nn.Linear(d, FAMILIES * k)
        gen = torch.Generator().manual_seed(probe_seed)
        probes = torch.randn(2, d, generator=gen) * probe_scale
        # Sum pooling and the probe columns are fixed (a buffer, not weights): were they
        # trainable, their own gradients (∝ the family sums, thousands of active neurons)
        # would break the families' cancellation after one local step and with it the
        # task model's training.
        self.register_buffer("probes", torch.stack([probes[0], probes[1], -probes.sum(0)], 1))
        with torch.no_grad():
            self.encoder.weight.copy_(measurement.float().expand(FAMILIES * k, d))
            self.encoder.bias.copy_(-edges.float().repeat(FAMILIES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        h = torch.relu(self.encoder(flat))
        family_sums = h.view(h.shape[0], FAMILIES, -1).sum(-1)
        return (flat + family_sums @ self.probes.T).view_as(x)


class RiggedModel(nn.Module):
    """The task model behind an :class:`ImprintBlock`; an ordinary module whose state
    dict (keys ``imprint.*`` and ``task.*``) travels in Flower ArrayRecords."""

    def __init__(self, imprint: ImprintBlock, task: nn.Module) -> None:
        super().__init__()
        self.imprint = imprint
        self.task = task

    @property
    def info(self) -> ImprintInfo:
        return self.imprint.info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task(self.imprint(x))


def rig_model(model: nn.Module, scenario: Scenario, num_classes: int) -> RiggedModel:
    """Put an imprint block, calibrated on the attacker's public data, in front of ``model``.

    Parameters
    ----------
    model : nn.Module
        The task model every party would otherwise train.
    scenario : Scenario
        Supplies ``attack.imprint`` (bins or target fraction, measurement,
        public samples, role) and the seed. With ``bins == 0`` the bins are chosen with
        :func:`bins_for_fraction` for the samples of one round's aggregate (the other
        parties' only, for a malicious participant, who removes its own).
    num_classes : int
        Classes of the task (unused by the block; kept for ``build_model``'s contract).

    Returns
    -------
    RiggedModel
        Deterministic for a given scenario (seeded), so server and parties agree.
    """
    del num_classes
    # the data layer loads when a model is rigged, not when the model builder is imported
    from privfl.data import load_federation

    im = scenario.attack.imprint
    seed = scenario.scenario.seed
    public = load_federation(scenario).public
    images = public.images[: im.public_samples]
    shape = public.sample_shape
    a = measurement_vector(im.measurement, seed=seed + _MEASUREMENT_SEED, image_shape=shape)
    k = imprint_bins_of(scenario)
    edges = bin_edges(images.flatten(1).float() @ a, k)
    block = ImprintBlock(
        a, edges, image_shape=shape, probe_seed=seed + _PROBE_SEED, probe_scale=im.probe_scale
    )
    return RiggedModel(block, model)
