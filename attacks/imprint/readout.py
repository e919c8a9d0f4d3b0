"""Reconstruction: single samples read off an (aggregated) update of the rigged model,
each bin verified by its rank-one fit."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from privfl.attacks.imprint.block import ImprintInfo


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
