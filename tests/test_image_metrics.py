"""Image metrics against values computed by hand."""

import math

import pytest
import torch
from matplotlib.figure import Figure

from privfl.metrics import (
    evaluate_reconstruction,
    image_grid_figure,
    match_reconstructions,
    psnr,
    ssim,
)

torch.set_num_threads(1)


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


def test_psnr_matches_hand_computed_values():
    x = _images(3) * 0.9
    # constant offset 0.1: MSE = 0.01 -> 20 dB exactly
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 20.0, dtype=torch.float64))
    # black vs mid-grey: MSE = 0.25 -> 10 log10(4) dB
    a, b = torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5)
    assert float(psnr(a, b)) == pytest.approx(10 * math.log10(4), abs=1e-9)
    assert math.isinf(float(psnr(a, a)))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:, :2])


def test_ssim_reference_values():
    x = _images(2, size=28)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    # constant images: only the luminance term remains, (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    got = float(ssim(torch.full((1, 28, 28), a), torch.full((1, 28, 28), b)))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    # noise lowers it; small images (8×8) get a smaller window instead of failing
    small = _images(1, size=8)
    noisy = (small + 0.8 * (_images(1, 5, 8) - 0.5)).clamp(0, 1)
    assert float(ssim(small, noisy)[0]) < 0.9


def test_matching_undoes_a_permutation_and_handles_unequal_counts():
    truth = _images(5)
    order = torch.tensor([3, 0, 4, 1, 2])
    recon = truth[order] + 0.01
    perm, per = match_reconstructions(recon, truth)
    # reconstruction perm[j] must be the one made from truth j
    assert torch.equal(order[perm], torch.arange(5))
    assert torch.allclose(per, torch.full((5,), 40.0, dtype=torch.float64))
    perm2, per2 = match_reconstructions(recon[:2], truth)
    assert (perm2 >= 0).sum() == 2 and (perm2 == -1).sum() == 3
    assert int(torch.isnan(per2).sum()) == 3
    perm3, _ = match_reconstructions(torch.cat([recon, _images(2, 9)]), truth)
    assert torch.equal(order[perm3], torch.arange(5))


def test_evaluate_reconstruction_counts_and_labels():
    truth = _images(4) * 0.8
    recon = truth.clone()
    recon[0] += 0.1  # 20 dB: recovered at 18
    recon[1] += 0.2  # ~14 dB: not recovered
    recon[2:] = truth[2:] + 0.05  # 26 dB
    ev = evaluate_reconstruction(
        recon, torch.tensor([1, 2, 3, 9]), truth, torch.tensor([3, 2, 1, 4]), threshold=18.0
    )
    assert ev["recovered"] == 3 and ev["total"] == 4
    assert ev["psnr_max"] == pytest.approx(26.0206, abs=1e-3)
    assert ev["label_accuracy"] == pytest.approx(0.75)
    assert 0 < ev["ssim_mean"] <= 1
    no_labels = evaluate_reconstruction(recon, None, truth, None, threshold=30.0)
    assert no_labels["recovered"] == 0 and math.isnan(no_labels["label_accuracy"])


def test_image_grid_figure_has_true_row_over_reconstructions(tmp_path):
    truth = _images(3)
    fig = image_grid_figure(
        truth,
        truth.flip(0),
        perm=[2, 1, 0],
        psnr_per_image=[1.0, 2.0, 3.0],
        truth_labels=[0, 1, 2],
        recon_labels=[2, 1, 0],
        title="t",
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
