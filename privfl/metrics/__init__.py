"""Metrics shared by the attacks: image reconstruction quality (PSNR, SSIM, matching)."""

from privfl.metrics.images import (
    evaluate_reconstruction,
    image_grid_figure,
    match_reconstructions,
    psnr,
    ssim,
)

__all__ = [
    "evaluate_reconstruction",
    "image_grid_figure",
    "match_reconstructions",
    "psnr",
    "ssim",
]
