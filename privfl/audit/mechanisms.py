"""Audited mechanisms run on their own (the bench): DP-SGD and DP-FedAvg with canaries."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer
from torch import nn

from privfl.audit.canaries import (
    CanaryParties,
    DiracCanaries,
)
from privfl.audit.game import AuditResult, OneRunAudit
from privfl.audit.keys import subkey
from privfl.dp import GaussianAggregateMechanism, KeyStream, calibrate_noise, epsilon_of_history


class CanaryDPOptimizer(DPOptimizer):
    """Opacus' :class:`~opacus.optimizers.DPOptimizer` with the auditor between clipping
    and noise, and the noise drawn from a keyed CSPRNG.

    After Opacus has clipped and summed the per-sample gradients, ``insert()`` may return
    one more flat gradient (over the parameters in order), added to the sum as if it were
    further clipped records. The noise, N(0, noise_std²) per coordinate, comes from
    ``noise`` (as in :mod:`privfl.dp.sgd`), one draw over all parameters per step.
    ``observe(flat)`` then sees the released noisy sum (before Opacus divides it by the
    expected batch size, a public constant).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_std: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise: KeyStream,
        insert: Callable[[], torch.Tensor | None],
        observe: Callable[[torch.Tensor], None],
    ) -> None:
        # Opacus' own noise is off (multiplier 0 draws nothing); ours is added below.
        super().__init__(
            optimizer,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self.noise_std = noise_std
        self._noise = noise
        self._insert = insert
        self._observe = observe

    def add_noise(self) -> None:
        """Add the inserted gradient to the clipped sum, then the noise; show the result."""
        extra = self._insert()
        if extra is not None:
            pos = 0
            for p in self.params:
                size = p.numel()
                p.summed_grad.add_(extra[pos : pos + size].view_as(p.summed_grad))
                pos += size
        super().add_noise()  # moves the sum into p.grad, with Opacus' bookkeeping
        if self.noise_std > 0:
            z = torch.from_numpy(self._noise.normal(sum(p.numel() for p in self.params)))
            pos = 0
            for p in self.params:
                size = p.numel()
                p.grad.add_(
                    z[pos : pos + size].view_as(p.grad).to(p.grad.dtype), alpha=self.noise_std
                )
                pos += size
        self._observe(torch.cat([p.grad.reshape(-1) for p in self.params]))


@dataclass(frozen=True, eq=False)
class DPSGDAudit:
    """One audited DP-SGD run: the audit, the σ it ran with and what it cost."""

    result: AuditResult
    noise_multiplier: float
    steps: int
    sample_rate: float
    loss: float
    seconds: float
    released_norms: list[float] = field(default_factory=list)


def audit_dp_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    audit: OneRunAudit,
    canaries: DiracCanaries,
    steps: int,
    sample_rate: float,
    clip: float,
    lr: float,
    delta: float,
    epsilon: float | None,
    accountant: str = "rdp",
    noise_scale: float = 1.0,
    known_noise: bool = False,
    key: bytes | None = None,
    confidence: float = 0.95,
) -> DPSGDAudit:
    """DP-SGD (Opacus, Poisson sampling, per-sample clipping) with Dirac gradient
    canaries, audited in the white-box view of every released noisy gradient sum.

    Each included canary is one more record: it joins each step with probability
    ``sample_rate`` and its clipped gradient is its Dirac direction (norm ``clip``),
    added after clipping and before the noise (:class:`CanaryDPOptimizer`). A canary's
    score is the sum over steps of its coordinate of the released sum.

    Parameters
    ----------
    model : nn.Module
        Trained in place (Opacus-compatible); hooks removed afterwards.
    images, labels : torch.Tensor
        The training records (CPU tensors).
    audit : OneRunAudit
        The coins; ``len(canaries)`` must equal ``audit.canaries``.
    canaries : DiracCanaries
        Over the flat parameter vector of ``model``.
    steps, sample_rate, clip, lr
        DP-SGD: Poisson rate q per record, per-sample L2 clip, plain SGD step size.
    delta : float
        δ of the claim.
    epsilon : float or None
        Target ε: σ is calibrated (:func:`privfl.dp.calibrate_noise`) so that ``steps``
        steps at rate q spend it, and the accountant (:func:`privfl.dp.epsilon_of_history`)
        reports what was claimed. ``None``: no noise and no claim (ε accounted = ∞).
    noise_scale : float
        Planted fault: the optimizer adds ``noise_scale`` · σ while the accountant still
        counts σ (1 is correct; 0 switches the noise off).
    known_noise : bool
        Planted fault: the noise comes from a seed the auditor holds, so it replays the
        draws and subtracts them before scoring.
    key : bytes, optional
        Keys the batch sampling and the noise seed (default ``os.urandom(32)``).
    """
    if len(canaries) != audit.canaries:
        raise ValueError(f"{len(canaries)} canaries but the audit has coins for {audit.canaries}")
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if canaries.dim != dim:
        raise ValueError(f"canaries span {canaries.dim} coordinates, the model has {dim}")
    if not 0 < sample_rate <= 1 or steps < 1 or noise_scale < 0:
        raise ValueError(
            f"need 0 < sample_rate <= 1, steps >= 1, noise_scale >= 0; got {sample_rate}, "
            f"{steps}, {noise_scale}"
        )
    key = key if key is not None else os.urandom(32)
    if epsilon is None:
        sigma, accounted = 0.0, math.inf
    else:
        sigma = calibrate_noise(
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
        accounted = epsilon_of_history(
            [(sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )
    n = int(labels.shape[0])
    included = np.flatnonzero(audit.included)
    records = KeyStream(subkey(key, "dp-sgd-records"))
    canary_coins = KeyStream(subkey(key, "dp-sgd-canaries"))
    noise_key = subkey(key, "dp-sgd-noise")
    # The fault: a second stream on the same key gives the auditor every draw.
    twin = KeyStream(noise_key) if known_noise else None
    std = sigma * noise_scale * clip
    coords = torch.from_numpy(canaries.coordinates)
    total = torch.zeros(len(canaries), dtype=torch.float64)
    norms: list[float] = []

    def insert() -> torch.Tensor | None:
        chosen = included[canary_coins.uniform(included.size) < sample_rate]
        return canaries.gradient(chosen) if chosen.size else None

    def observe(released: torch.Tensor) -> None:
        seen = released[coords].double()
        if twin is not None and std > 0:
            seen -= std * torch.from_numpy(twin.normal(dim))[coords]
        total.add_(seen)
        norms.append(float(released.norm()))

    module = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
    dp_opt = CanaryDPOptimizer(
        torch.optim.SGD(params, lr=lr),
        noise_std=std,
        max_grad_norm=clip,
        expected_batch_size=max(1, round(sample_rate * (n + included.size))),
        noise=KeyStream(noise_key),
        insert=insert,
        observe=observe,
    )
    losses = []
    start = time.perf_counter()
    module.train()
    try:
        for _ in range(steps):
            idx = torch.from_numpy(np.flatnonzero(records.uniform(n) < sample_rate))
            dp_opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(images[idx]), labels[idx])
            loss.backward()
            dp_opt.step()
            if idx.numel():
                losses.append(float(loss.item()))
    finally:
        module._close()
    seconds = time.perf_counter() - start
    result = audit.evaluate(
        total.numpy(),
        epsilon_accounted=accounted,
        delta=delta,
        view="white-box: every released noisy gradient sum, Dirac canaries",
        confidence=confidence,
    )
    return DPSGDAudit(
        result=result,
        noise_multiplier=sigma,
        steps=steps,
        sample_rate=sample_rate,
        loss=float(np.mean(losses)) if losses else math.nan,
        seconds=seconds,
        released_norms=norms,
    )


# --------------------------------------------------------------------------- party-level DP


def audit_gaussian_aggregate(
    party_updates: Callable[[int, np.ndarray], Sequence[np.ndarray]],
    initial: np.ndarray,
    *,
    audit: OneRunAudit,
    canaries: CanaryParties,
    rounds: int,
    clip: float,
    delta: float,
    epsilon: float,
    accountant: str = "rdp",
    noise_scale: float = 1.0,
    key: bytes | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Party-level DP (DP-FedAvg's Gaussian mechanism, every party every round) with
    canary parties, audited in the view of every released noisy aggregate.

    Each round the real parties' updates (``party_updates(round, global_vector)``) and
    the included canary parties' updates are clipped and averaged over the public party
    count n = real + m/2, and :class:`privfl.dp.GaussianAggregateMechanism` adds
    N(0, (σC/n)²) (σ calibrated for ``epsilon`` over ``rounds`` rounds at sampling rate
    1); the global vector moves by the release. A canary party's score is the sum over
    rounds of the cosine between its direction and the release (Andrew et al., ICLR 2024).
    ``noise_scale`` plants the same fault as in :func:`audit_dp_sgd`.
    """
    if len(canaries) != audit.canaries:
        raise ValueError(f"{len(canaries)} canaries but the audit has coins for {audit.canaries}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    key = key if key is not None else os.urandom(32)
    sigma = calibrate_noise(
        epsilon=epsilon, delta=delta, sample_rate=1.0, steps=rounds, accountant=accountant
    )
    mechanism = GaussianAggregateMechanism(clip=clip, noise_multiplier=sigma * noise_scale)
    noise = KeyStream(subkey(key, "aggregate-noise"))
    canary_sum = canaries.update_sum(np.flatnonzero(audit.included))
    current = np.asarray(initial, dtype=np.float64).copy()
    scores = np.zeros(len(canaries))
    for rnd in range(1, rounds + 1):
        real = [mechanism.constrain_sensitivity(u)[0] for u in party_updates(rnd, current)]
        parties = len(real) + audit.canaries // 2
        mean = (np.sum(real, axis=0) + canary_sum) / parties if real else canary_sum / parties
        released = mechanism.add_noise(mean, num_parties=parties, stream=noise)
        scores += canaries.cosines(released)
        current = current + released
    accounted = epsilon_of_history([(sigma, 1.0, rounds)], delta=delta, accountant=accountant)
    return audit.evaluate(
        scores,
        epsilon_accounted=accounted,
        delta=delta,
        view="party-level: every released noisy aggregate, canary parties",
        confidence=confidence,
    )
