"""Imprint-layer extraction: a rigged model that lets whoever sees an aggregate read
single training samples out of it (Fowl et al., "Robbing the Fed", ICLR 2022).

The block
---------
:class:`ImprintBlock` sits in front of the task model. Its encoder has ``F × k`` ReLU
neurons that all measure the same linear function ``m(x) = a·x`` of the image (mean
brightness, a random projection or a DCT mode); neuron ``i`` of each family has the bias
``-t_i``, with ``t_1 < … < t_k`` the quantiles of ``m`` on the attacker's public data, so
it fires for every sample with ``m(x) > t_i``. For one sample ``n`` and one family
``f`` the gradient of the encoder row ``i`` is ``g_fn · x_n`` and that of its bias
``g_fn``, with ``g_fn = c_f · ∂L/∂y_n`` the same for every neuron of the family (all of
a family's neurons feed the output through the same column ``c_f``). The aggregated
update is a weighted sum of such terms, so the difference of neighbouring rows keeps
only the samples whose measurement lies in ``(t_i, t_{i+1}]``, and when that bin holds
one sample, ``ΔW_i / Δb_i = x_n`` exactly, whatever the learning rate, batch size or
FedAvg weight in front of it.

Collisions are found from the update alone: each bin is seen through ``F = 3``
families with probe columns ``c_A``, ``c_B`` and ``-(c_A + c_B)``. One sample makes the
``F × d`` matrix of a bin's row differences rank one and proportional to its bias
differences; two or more samples (whose probe ratios ``g_An / g_Bn`` differ) make it
rank two. A bin is reported only when the rank-one fit explains it. The third family
makes the block's output term ``Σ_f c_f Σ_i h_fi`` cancel, so at the shipped weights
the rigged model computes exactly the task model.

The block works on any sample shape: images of any size and channel count (the
measurement and the readout act on the flattened sample) and tabular rows ``(d,)``
(readouts of rows are not clipped to [0, 1]; the ``dct`` measurement needs images).

What holds exactly: one local SGD step per party, with or without momentum (the first
momentum step is the plain gradient) and with any FedAvg weights. Weight decay adds
``-lr·wd·b_i`` to the biases (negligible against the data term at the defaults); Adam
normalises each coordinate and breaks the ratio; more local steps change the rows
between steps and blur the differences (measured in ``privfl.bench.imprint``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from privfl.config import Scenario
from privfl.results import AttackReport

FAMILIES = 3
WEIGHT_KEY = "imprint.encoder.weight"
BIAS_KEY = "imprint.encoder.bias"
IMAGE_SHAPE = (1, 28, 28)
# Offsets of the generators drawn from the scenario seed (kept apart from the task model).
_MEASUREMENT_SEED = 7001
_PROBE_SEED = 7002
_PSNR_CAP = 100.0
# Pairs drawn in the report's figure: a grid of hundreds of panels takes minutes to draw.
_FIGURE_PAIRS = 64


# --------------------------------------------------------------------------- sizing


def expected_fraction(n: int, k: int) -> float:
    """Expected fraction of ``n`` samples that are alone in one of ``k`` equal-mass bins.

    Parameters
    ----------
    n : int
        Samples in the aggregate (parties × batch size × local steps).
    k : int
        Bins (imprint neurons per family).

    Returns
    -------
    float
        ``(1 - 1/k) ** (n - 1)``.
    """
    if n < 1 or k < 1:
        raise ValueError(f"expected_fraction: n and k must be >= 1, got n={n}, k={k}")
    return (1.0 - 1.0 / k) ** (n - 1)


def bins_for_fraction(n: int, target: float) -> int:
    """Fewest equal-mass bins for which ``expected_fraction(n, k) >= target``.

    Parameters
    ----------
    n : int
        Samples in the aggregate.
    target : float
        Wanted expected fraction of samples recovered, in (0, 1).
    """
    if not 0 < target < 1:
        raise ValueError(f"bins_for_fraction: target must be in (0, 1), got {target}")
    if n < 1:
        raise ValueError(f"bins_for_fraction: n must be >= 1, got {n}")
    if n == 1:
        return 1
    k = max(1, math.ceil(1.0 / (1.0 - target ** (1.0 / (n - 1)))))
    while expected_fraction(n, k) < target:  # guard against rounding in the closed form
        k += 1
    while k > 1 and expected_fraction(n, k - 1) >= target:
        k -= 1
    return k


def attack_round_scenario(scenario: Scenario) -> Scenario:
    """The scenario a malicious server sends in its attack round: its own
    ``attack.imprint.local_steps`` / ``batch_size`` / ``lr`` in place of the training
    values."""
    im = scenario.attack.imprint
    overrides = [
        f"training.{name}={value}"
        for name, value in (
            ("local_steps", im.local_steps),
            ("batch_size", im.batch_size),
            ("lr", im.lr),
        )
        if value
    ]
    return scenario.replace(overrides) if overrides else scenario


def samples_per_round(scenario: Scenario, parties: int | None = None) -> int:
    """Samples that enter the attack round's aggregate: parties × batch size × local steps
    (the hyper-parameters of :func:`attack_round_scenario`).

    With ``training.local_steps == 0`` the steps are the epochs' batches over
    ``data.samples_per_party`` (one batch when that is 0 = unknown here).
    """
    tr = attack_round_scenario(scenario).training
    n_parties = scenario.data.parties if parties is None else parties
    if tr.local_steps > 0:
        steps = tr.local_steps
    elif scenario.data.samples_per_party > 0:
        steps = tr.local_epochs * math.ceil(scenario.data.samples_per_party / tr.batch_size)
    else:
        steps = 1
    return n_parties * tr.batch_size * steps


# --------------------------------------------------------------------------- block


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


def imprint_bins_of(scenario: Scenario) -> int:
    """Bins of the block ``scenario`` ships: ``attack.imprint.bins``, or (0) the fewest
    whose expected recovered fraction reaches ``attack.imprint.target_fraction``."""
    im = scenario.attack.imprint
    return im.bins or bins_for_fraction(imprinted_samples(scenario), im.target_fraction)


def summed_parties(scenario: Scenario) -> int:
    """Parties whose updates the aggregate of one round is expected to hold.

    The parties of a round (``scenario.parties_per_round``, else all of them) less the
    expected dropouts, except those that drop out at masking's unmask stage: their masked
    inputs were already sent, and the sum is recovered with them.
    """
    s = scenario.scenario
    parties = s.per_round(scenario.data.parties)
    if s.dropout_rate and s.dropout_stage != "unmask":
        parties = round(parties * (1.0 - s.dropout_rate))
    return max(parties, 1)


def imprinted_samples(scenario: Scenario) -> int:
    """Samples the attacker of ``scenario`` expects in the aggregate it reconstructs."""
    im = scenario.attack.imprint
    parties = summed_parties(scenario)
    if im.role == "malicious-participant":
        parties -= 1
    return samples_per_round(scenario, max(parties, 1))


# --------------------------------------------------------------------------- reconstruction


def aggregate_noise_std(scenario: Scenario) -> float:
    """Per-coordinate std of the rounding secure aggregation puts in the aggregate.

    Each of the ``n`` parties' weighted updates ``w_i Δ_i`` is rounded to
    ``2**-frac_bits`` (uniform error, std ``step / sqrt(12)``); the errors add and the sum
    is divided by ``Σ w_i >= n`` (weights are example counts), so the std is at most
    ``step / sqrt(12 n)``. 0 without secure aggregation. DP noise is deliberately not
    included: it is the defense, not measurement noise. ``n`` is
    :func:`summed_parties`: the parties of one round, not of the federation.
    """
    if scenario.defense.secure_aggregation == "none":
        return 0.0
    step = 2.0**-scenario.defense.secagg.frac_bits
    return step / math.sqrt(12.0 * summed_parties(scenario))


@dataclass
class ImprintReconstruction:
    """Samples read off an update.

    Attributes
    ----------
    images : Tensor
        ``(M, *image_shape)`` recovered samples in bin order (images clipped to [0, 1]).
    bins_used : tuple[int, ...]
        The bin each image came from.
    collisions : int
        Occupied bins rejected because the rank-one fit failed: two or more samples fell
        into them (or, in a noised update, noise did).
    seconds : float
        Wall time of the reconstruction.
    occupied : int
        Bins that carried any signal (``len(bins_used) + collisions``).
    residuals : Tensor
        ``(M,)`` relative residual of the rank-one fit of each recovered bin.
    """

    images: torch.Tensor
    bins_used: tuple[int, ...]
    collisions: int
    seconds: float
    occupied: int = 0
    residuals: torch.Tensor | None = None


def reconstruct_from_update(
    update: dict[str, torch.Tensor],
    block_info: ImprintInfo,
    *,
    noise_std: float = 0.0,
    residual_tol: float = 1e-3,
    signal_rtol: float = 1e-3,
) -> ImprintReconstruction:
    """Read single samples off an (aggregated) update of a rigged model.

    Parameters
    ----------
    update : dict[str, Tensor]
        New weights minus the weights sent, at least for ``block_info.weight_key`` and
        ``block_info.bias_key``. Any positive or negative scale (learning rate, batch
        mean, FedAvg weights, clipping) is allowed: it cancels in ``ΔW / Δb``.
    block_info : ImprintInfo
        Layout of the block that was shipped.
    noise_std : float
        Per-coordinate standard deviation of the noise in ``update`` that is no part of
        the data (e.g. the fixed-point rounding of secure aggregation); 0 for exact
        arithmetic. It widens both tests below by what that noise can explain.
    residual_tol : float
        A bin is one sample when the rank-one fit leaves at most this fraction of its
        row differences' norm unexplained (plus 3 noise norms); otherwise a collision.
    signal_rtol : float
        A bin is occupied when the norm of its bias differences exceeds this fraction of
        the largest bin's and 5 noise norms.

    Returns
    -------
    ImprintReconstruction
        Only bins judged to hold one sample; collisions are counted, never returned.
    """
    start = time.perf_counter()
    F = block_info.families
    dW, db = _bin_differences(update, block_info)
    v_norm = db.norm(dim=0)  # (k,)
    d = dW.shape[-1]
    # A difference of two noisy rows has sqrt(2) x the noise; norms over F (and d) entries.
    floor = max(float(v_norm.max()) * signal_rtol, 5 * noise_std * math.sqrt(2 * F), 1e-30)
    occupied = v_norm > floor
    # Rank-one fit per bin: dW[:, i] ≈ db[:, i] ⊗ x_i, x_i = db_iᵀ dW_i / |db_i|².
    x = _rank_one_images(dW, db)
    resid = (dW - db[:, :, None] * x[None]).norm(dim=(0, 2))
    m_norm = dW.norm(dim=(0, 2))
    allowed = residual_tol * m_norm + 3 * noise_std * math.sqrt(2 * F * d)
    rel = resid / m_norm.clamp_min(1e-30)
    single = occupied & (resid <= allowed)
    idx = torch.nonzero(single).flatten()
    images = _readout(x[idx], block_info)
    return ImprintReconstruction(
        images=images,
        bins_used=tuple(int(i) for i in idx),
        collisions=int((occupied & ~single).sum()),
        seconds=time.perf_counter() - start,
        occupied=int(occupied.sum()),
        residuals=rel[idx].float(),
    )


def _bin_differences(
    update: dict[str, torch.Tensor], block_info: ImprintInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, k, d)`` row and ``(F, k)`` bias differences of neighbouring neurons."""
    F, k = block_info.families, block_info.bins
    W = update[block_info.weight_key].detach().double().reshape(F, k, -1)
    b = update[block_info.bias_key].detach().double().reshape(F, k)
    # Neuron i sums every sample above t_i: subtracting neuron i+1 keeps bin i only.
    dW = torch.cat([W[:, :-1] - W[:, 1:], W[:, -1:]], dim=1)
    db = torch.cat([b[:, :-1] - b[:, 1:], b[:, -1:]], dim=1)
    return dW, db


def _rank_one_images(dW: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Least-squares ``x_i`` of ``dW[:, i] ≈ db[:, i] ⊗ x_i`` for every bin, ``(k, d)``."""
    v2 = db.pow(2).sum(0).clamp_min(1e-30)
    return torch.einsum("fk,fkd->kd", db, dW) / v2[:, None]


def strongest_bins_readout(
    update: dict[str, torch.Tensor], block_info: ImprintInfo, count: int
) -> torch.Tensor:
    """``x = ΔW/Δb`` of the ``count`` bins with the largest bias differences, unverified.

    The attacker's fallback when no bin passes the single-sample test (e.g. the update is
    DP-noised): it still knows how many samples it expects and reads out the bins most
    likely to hold them. Scoring these shows what a defense leaves to an attacker that
    ignores its own test. Returns ``(count, *image_shape)`` samples (images clipped to
    [0, 1]).
    """
    dW, db = _bin_differences(update, block_info)
    count = max(0, min(int(count), block_info.bins))
    top = torch.argsort(db.norm(dim=0), descending=True)[:count]
    return _readout(_rank_one_images(dW[:, top], db[:, top]), block_info)


def _readout(x: torch.Tensor, block_info: ImprintInfo) -> torch.Tensor:
    """Flat ``(M, d)`` readouts as samples of the block's shape, images clipped to [0, 1]."""
    x = x.clamp(0.0, 1.0) if block_info.clip else x
    return x.float().reshape(-1, *block_info.image_shape)


def state_update(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """``after - before`` (float64) for ``keys``."""
    return {key: after[key].double() - before[key].double() for key in keys}


# --------------------------------------------------------------------------- evaluation


def evaluate_imprint(
    images: torch.Tensor,
    truth: torch.Tensor,
    *,
    scenario: Scenario,
    role: str,
    bins: int,
    expected: float,
    seconds: float,
    collisions: int,
    notes: list[str] | None = None,
    verified: int | None = None,
    total: int | None = None,
    occupied: int | None = None,
) -> AttackReport:
    """Score recovered images against the union of the attacked batches.

    Each recovered image is matched to a distinct true sample (optimal assignment on
    PSNR, ``privfl.metrics.images``); a sample counts as recovered when its match reaches
    ``attack.imprint.recovered_psnr`` dB. Means are over the matched pairs (NaN when
    nothing was returned), PSNR capped at 100 dB (exact recoveries are infinite).

    Parameters
    ----------
    images : Tensor
        ``(M, *sample_shape)`` what the attacker returned (images ``(C, H, W)`` or rows
        ``(d,)``, scored as ``1 × 1 × d`` images by PSNR, without SSIM).
    truth : Tensor
        ``(N, *sample_shape)`` every sample in the aggregate (the evaluator's knowledge).
    scenario : Scenario
        Supplies the threshold and the attack round.
    role : str
        ``malicious-server`` or ``malicious-participant``.
    bins, expected, seconds, collisions : int, float, float, int
        The block's bins, the expected fraction ``(1-1/k)^(N-1)``, the reconstruction's
        wall time and the collisions it rejected.
    notes : list[str], optional
        Extra lines for the report.
    verified : int, optional
        Bins that passed the single-sample test when ``images`` also holds unverified
        readouts (default: all of ``images``).
    total : int, optional
        Samples in the aggregate when ``truth`` is a superset of them (default: all of
        ``truth``).
    occupied : int, optional
        Bins that carried signal (singles and collisions): reported with the fraction of
        them that gave a recovered sample.
    """
    im = scenario.attack.imprint
    total = int(truth.shape[0]) if total is None else int(total)
    rows = truth.ndim == 2
    if rows:  # tabular rows: PSNR of 1 x 1 x d "images"; SSIM needs a 2-D neighbourhood
        images, truth = images.reshape(-1, 1, 1, truth.shape[1]), truth[:, None, None]
    psnr_mean = ssim_mean = float("nan")
    recovered = 0
    figures = {}
    if images.shape[0] and total:
        from privfl.metrics.images import image_grid_figure, match_reconstructions, ssim

        perm, per = match_reconstructions(images, truth)
        hit = perm >= 0
        # Exact recoveries have infinite PSNR; cap so that means stay finite.
        psnr = per[hit].clamp(max=_PSNR_CAP)
        recovered = int((psnr >= im.recovered_psnr).sum())
        psnr_mean = float(psnr.mean())
        if not rows:
            ssim_mean = float(ssim(images[perm[hit]], truth[hit]).mean())
        shown = hit if total != truth.shape[0] else torch.ones_like(hit)  # matched ones only
        if int(shown.sum()) > _FIGURE_PAIRS:  # a large aggregate: its first matched samples
            shown = hit & (torch.cumsum(hit.long(), 0) <= _FIGURE_PAIRS)
        figures[f"imprint_{role}.png"] = image_grid_figure(
            truth[shown],
            images,
            perm=perm[shown].tolist(),
            psnr_per_image=per[shown].tolist(),
            title=f"imprint ({role}): {recovered}/{total} at PSNR ≥ {im.recovered_psnr:g} dB",
        )
    measured = recovered / total if total else float("nan")
    extra: dict[str, float] = {}
    bin_lines: list[str] = []
    if occupied is not None:
        extra = {
            "occupied_bins": int(occupied),
            "recovered_per_occupied_bin": recovered / occupied if occupied else float("nan"),
        }
        bin_lines = [
            f"{occupied} of {bins} bins carried signal; {recovered} of them "
            f"({extra['recovered_per_occupied_bin']:.3f}) gave a sample at PSNR >= "
            f"{im.recovered_psnr:g} dB"
        ]
    lines = [
        f"bins k = {bins}, samples N = {total}: expected fraction (1-1/k)^(N-1) = "
        f"{expected:.3f}, measured {measured:.3f} ({recovered}/{total} at PSNR >= "
        f"{im.recovered_psnr:g} dB)",
        f"{images.shape[0] if verified is None else verified} single-sample bins verified, "
        f"{collisions} collisions rejected",
    ]
    return AttackReport(
        name="imprint",
        role=role,
        target="aggregate",
        recovered=recovered,
        total=total,
        metrics={
            "expected_fraction": float(expected),
            "psnr_mean": psnr_mean,
            "ssim_mean": ssim_mean,
            "bins": int(bins),
            "seconds": float(seconds),
            **extra,
        },
        figures=figures,
        notes=lines + bin_lines + list(notes or []),
    )
