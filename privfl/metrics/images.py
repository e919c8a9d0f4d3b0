"""Quality of reconstructed images against the true ones.

Images are float tensors in [0, 1], shaped ``(N, C, H, W)`` with any channel count (a
single ``(C, H, W)`` image is accepted where noted); grids draw 3 or 4 channels in colour,
any other count in grey. PSNR uses a data range of 1; SSIM is torchmetrics'
maintained implementation (Gaussian window, σ = 1.5). Reconstructions and truths are
paired by an optimal assignment on PSNR, so an attack is not penalised for returning
the batch in another order, and N reconstructions may be compared with M ≠ N truths.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def _batch(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image peak signal-to-noise ratio in dB for images in [0, 1].

    ``10·log10(1 / MSE)``; ``inf`` for identical images.

    Parameters
    ----------
    a, b : Tensor
        Same shape, ``(N, C, H, W)`` or ``(C, H, W)``.

    Returns
    -------
    Tensor
        ``(N,)`` float64 (a 0-d tensor for single images).
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    single = a.ndim == 3
    mse = ((_batch(a, "a") - _batch(b, "b")) ** 2).flatten(1).mean(1)
    out = -10.0 * torch.log10(mse)
    return out[0] if single else out


def _kernel_size(h: int, w: int) -> int:
    k = min(11, h, w)
    return k if k % 2 == 1 else k - 1


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image structural similarity (torchmetrics), data range 1.

    The Gaussian window is 11×11, shrunk to the largest odd size that fits smaller
    images.

    Parameters
    ----------
    a, b : Tensor
        Same shape, ``(N, C, H, W)`` or ``(C, H, W)``.

    Returns
    -------
    Tensor
        ``(N,)`` float64 (a 0-d tensor for single images).
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    single = a.ndim == 3
    x, y = _batch(a, "a"), _batch(b, "b")
    k = _kernel_size(x.shape[-2], x.shape[-1])
    out = structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=k, reduction="none")
    out = torch.as_tensor(out).reshape(-1)
    return out[0] if single else out


def match_reconstructions(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Pair reconstructions with true images by maximum total PSNR.

    Parameters
    ----------
    recon : Tensor
        ``(N, C, H, W)`` reconstructions.
    truth : Tensor
        ``(M, C, H, W)`` true images; ``N != M`` is allowed.

    Returns
    -------
    perm : Tensor
        ``(M,)`` int64: index of the reconstruction assigned to each true image, ``-1``
        where none is (``N < M``).
    psnr_per_image : Tensor
        ``(M,)`` float64 PSNR of each true image against its reconstruction, ``nan``
        where unmatched.
    """
    r, t = _batch(recon, "recon"), _batch(truth, "truth")
    if r.shape[1:] != t.shape[1:]:
        raise ValueError(
            "match_reconstructions: image shapes differ, "
            f"{tuple(r.shape[1:])} vs {tuple(t.shape[1:])}"
        )
    # (N, M) mean squared errors, a slice of true images at a time: matching against a
    # large pool (every record a party holds) must not build an N x M x pixels tensor.
    step = max(1, 4_000_000 // max(1, r[0].numel() * r.shape[0]))
    mse = torch.cat(
        [
            ((r[:, None] - t[None, lo : lo + step]) ** 2).flatten(2).mean(2)
            for lo in range(0, t.shape[0], step)
        ],
        dim=1,
    )
    score = -10.0 * torch.log10(mse)
    # Identical pairs have infinite PSNR; the assignment needs finite costs.
    finite = torch.nan_to_num(score, posinf=1e6).numpy()
    rows, cols = linear_sum_assignment(-finite)
    perm = torch.full((t.shape[0],), -1, dtype=torch.long)
    per = torch.full((t.shape[0],), float("nan"), dtype=torch.float64)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.long)
    per[torch.as_tensor(cols)] = score[rows, cols]
    return perm, per


def evaluate_reconstruction(
    recon: Tensor,
    recon_labels: Tensor | None,
    truth: Tensor,
    truth_labels: Tensor | None,
    threshold: float = 18.0,
) -> dict[str, Any]:
    """Metrics of a batch reconstruction after optimal matching.

    A true image counts as recovered when its matched reconstruction reaches
    ``threshold`` dB. Label accuracy compares label multisets (the fraction of true
    labels present among the recovered ones), independent of the image matching,
    since label recovery does not know which image a label belongs to.

    Returns
    -------
    dict
        ``recovered`` (int), ``total`` (M), ``psnr_mean``, ``psnr_max``, ``ssim_mean``
        (over matched pairs), ``label_accuracy`` (``nan`` without labels), ``perm``
        and ``psnr_per_image`` (lists, per true image; see
        :func:`match_reconstructions`).
    """
    perm, per = match_reconstructions(recon, truth)
    r, t = _batch(recon, "recon"), _batch(truth, "truth")
    matched = perm >= 0
    if bool(matched.any()):
        s = ssim(r[perm[matched]], t[matched])
        psnr_mean = float(per[matched].mean())
        psnr_max = float(per[matched].max())
        ssim_mean = float(s.mean())
    else:
        psnr_mean = psnr_max = ssim_mean = float("nan")
    recovered = int((per[matched] >= threshold).sum())
    if recon_labels is None or truth_labels is None:
        label_accuracy = float("nan")
    else:
        got = Counter(torch.as_tensor(recon_labels).reshape(-1).tolist())
        want = Counter(torch.as_tensor(truth_labels).reshape(-1).tolist())
        label_accuracy = sum((got & want).values()) / max(1, sum(want.values()))
    return {
        "recovered": recovered,
        "total": int(t.shape[0]),
        "psnr_mean": psnr_mean,
        "psnr_max": psnr_max,
        "ssim_mean": ssim_mean,
        "label_accuracy": label_accuracy,
        "perm": perm.tolist(),
        "psnr_per_image": per.tolist(),
    }


def image_grid_figure(
    truth: Tensor,
    recon: Tensor,
    *,
    perm: Sequence[int] | None = None,
    psnr_per_image: Sequence[float] | None = None,
    truth_labels: Sequence[int] | None = None,
    recon_labels: Sequence[int] | None = None,
    title: str = "",
    columns: int = 8,
) -> Figure:
    """True images over their reconstructions, ``columns`` pairs to a row of the grid.

    Each block of the grid is a row of true images over a row of the reconstructions
    matched to them; batches wider than ``columns`` wrap onto further blocks.
    ``perm[j]`` names the reconstruction shown under true image ``j`` (default: same
    index; ``-1``: blank). Built on :class:`matplotlib.figure.Figure` directly, so it
    needs no GUI backend (saves through Agg).
    """
    if columns < 1:
        raise ValueError(f"columns: must be >= 1, got {columns}")
    t, r = _batch(truth, "truth"), _batch(recon, "recon")
    m = t.shape[0]
    perm = list(range(m)) if perm is None else list(perm)
    cols = max(1, min(m, columns))
    blocks = max(1, -(-m // cols))
    fig = Figure(figsize=(1.2 * cols + 0.6, 2.8 * blocks + 0.2), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2 * blocks, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(m):
        top, bottom = axes[2 * (j // cols), j % cols], axes[2 * (j // cols) + 1, j % cols]
        top.imshow(_show(t[j]), cmap="gray", vmin=0, vmax=1)
        label = f"y={truth_labels[j]}" if truth_labels is not None else ""
        top.set_title(label, fontsize=8)
        i = perm[j] if j < len(perm) else -1
        if 0 <= i < r.shape[0]:
            bottom.imshow(_show(r[i]), cmap="gray", vmin=0, vmax=1)
            parts = []
            if psnr_per_image is not None and math.isfinite(psnr_per_image[j]):
                parts.append(f"{psnr_per_image[j]:.1f} dB")
            if recon_labels is not None:
                parts.append(f"y={recon_labels[i]}")
            bottom.set_title(" ".join(parts), fontsize=8)
    for k in range(m, blocks * cols):  # the last block's unused cells
        axes[2 * (k // cols), k % cols].set_axis_off()
        axes[2 * (k // cols) + 1, k % cols].set_axis_off()
    for b in range(blocks):
        axes[2 * b, 0].set_ylabel("true", fontsize=9)
        axes[2 * b + 1, 0].set_ylabel("recon.", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _show(img: Tensor) -> np.ndarray:
    """What imshow draws of a ``(C, H, W)`` image: RGB(A) as colour, any other channel
    count as the grey mean over its channels."""
    img = img.clamp(0, 1)
    if img.shape[0] in (3, 4):
        return img.permute(1, 2, 0).numpy()
    return img.mean(0).numpy()
