"""Offline LiRA (Carlini et al. 2022): shadow models trained on public subsets give each
target record a Gaussian of OUT scores; the one-sided z-score is the statistic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from privfl import progress
from privfl.attacks.membership.query import LabelledImages, LabelledTensors, QueryAPI, hinge_score
from privfl.metrics import roc


def lira_offline_scores(
    target_scores: np.ndarray,
    shadow_scores: np.ndarray,
    *,
    fixed_variance: bool = True,
    sigma: float | None = None,
) -> np.ndarray:
    """Offline LiRA statistic: one-sided z-score of the target's score under the OUT Gaussian.

    Parameters
    ----------
    target_scores : np.ndarray
        (N,) the target model's score of each record.
    shadow_scores : np.ndarray
        (S, N) scores of S >= 2 shadow models, none of which trained on the records.
    fixed_variance : bool
        Use one pooled within-record standard deviation for all records (more stable
        with few shadows) instead of each record's own.
    sigma : float, optional
        The pooled deviation, fixed beforehand (:meth:`OfflineLiRA.fit` estimates it on
        public records). Without it the pooled deviation is taken over these records, so
        two calls (members, non-members) would each get their own.
    """
    s = np.asarray(target_scores, dtype=np.float64).ravel()
    sh = np.asarray(shadow_scores, dtype=np.float64)
    if sh.ndim != 2 or sh.shape[1] != s.size or sh.shape[0] < 2:
        raise ValueError(
            f"lira_offline_scores: shadow_scores must be (S>=2, N={s.size}), got {sh.shape}"
        )
    mu = sh.mean(axis=0)
    var = sh.var(axis=0, ddof=1)
    if not fixed_variance:
        spread = np.sqrt(var)
    elif sigma is not None:
        spread = np.full_like(mu, float(sigma))
    else:
        spread = np.full_like(mu, np.sqrt(var.mean()))
    return (s - mu) / np.maximum(spread, 1e-6)


class OfflineLiRA:
    """Offline likelihood-ratio attack (Carlini et al., S&P 2022) with OUT shadows only.

    Parameters
    ----------
    train_fn : Callable
        ``train_fn(data) -> nn.Module``: trains one shadow model the way the target was
        trained, on ``data`` (an object with ``images`` and ``labels``).
    shadow_models : int
        How many shadows (>= 2).
    fixed_variance : bool
        See :func:`lira_offline_scores`.
    seed : int
        Seeds the shadows' data subsets.
    device : torch.device or str
        Where shadows are queried.
    """

    def __init__(
        self,
        train_fn: Callable[[Any], nn.Module],
        *,
        shadow_models: int = 8,
        fixed_variance: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if shadow_models < 2:
            raise ValueError(f"shadow_models: LiRA needs >= 2, got {shadow_models}")
        self.train_fn = train_fn
        self.shadow_models = shadow_models
        self.fixed_variance = fixed_variance
        self.seed = seed
        self.device = device
        self._shadows: list[QueryAPI] = []
        self.sigma: float | None = None

    def fit(self, public: LabelledImages, subset_size: int) -> OfflineLiRA:
        """Train the shadows, each on a random ``subset_size`` records of ``public``."""
        n = int(public.labels.shape[0])
        if not 1 <= subset_size <= n:
            raise ValueError(
                f"subset_size: must be in [1, {n}] (public records), got {subset_size}"
            )
        rng = np.random.default_rng(self.seed)
        self._shadows = []
        trained_on = np.zeros((self.shadow_models, n), dtype=bool)
        with progress.phase("membership: LiRA shadow models", total=self.shadow_models) as bar:
            for i in range(self.shadow_models):
                idx = np.sort(rng.choice(n, size=subset_size, replace=False))
                trained_on[i, idx] = True
                t = torch.as_tensor(idx)
                model = self.train_fn(LabelledTensors(public.images[t], public.labels[t]))
                self._shadows.append(QueryAPI(model, self.device))
                bar.advance()
        self.sigma = None
        if self.fixed_variance:
            # One pooled OUT deviation for every record the attack will ever score, taken
            # from each public record's scores under the shadows that did not train on it.
            out = np.ma.masked_array(
                self.shadow_scores(public.images, public.labels), mask=trained_on
            )
            ok = out.count(axis=0) >= 2
            if not ok.any():
                raise ValueError(
                    "OfflineLiRA.fit: no public record is OUT for two shadows; use a "
                    "smaller subset_size or more public records"
                )
            self.sigma = float(np.sqrt(out.var(axis=0, ddof=1)[ok].mean()))
        return self

    def shadow_scores(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """(S, N) hinge scores of every shadow on the records."""
        if not self._shadows:
            raise RuntimeError("OfflineLiRA: call fit() before scoring")
        y = np.asarray(labels)
        return np.stack([hinge_score(api.query(images), y) for api in self._shadows])

    def membership_scores(
        self, images: torch.Tensor, labels: torch.Tensor, target_scores: np.ndarray
    ) -> np.ndarray:
        """z-scores of the target's hinge scores against each record's OUT Gaussian."""
        return lira_offline_scores(
            target_scores,
            self.shadow_scores(images, labels),
            fixed_variance=self.fixed_variance,
            sigma=self.sigma,
        )

    @staticmethod
    def threshold(fpr: float) -> float:
        """z threshold of the operating point at FPR ``fpr`` (one-sided Gaussian test)."""
        return float(stats.norm.isf(fpr))

    def operating_threshold(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_scores: np.ndarray,
        fpr: float,
        *,
        shadow_scores: np.ndarray | None = None,
    ) -> float:
        """The operating point at FPR ``fpr``, calibrated on public non-members that no
        shadow trained on: their empirical ``1 - fpr`` quantile of membership scores.

        The Gaussian z of :meth:`threshold` assumes each record's OUT scores are exactly
        Gaussian with the fitted spread; on real targets it flags about ten times the
        aimed FPR. Falls back to it when the records cannot resolve ``fpr`` (fewer than
        one allowed false positive). ``shadow_scores``: the shadows' (S, N) scores of these
        records (:meth:`shadow_scores`) when one calibration set serves several targets.
        """
        n = int(np.asarray(target_scores).size)
        if fpr * n < 1:
            return self.threshold(fpr)
        if shadow_scores is None:
            z = self.membership_scores(images, labels, target_scores)
        else:
            z = lira_offline_scores(
                target_scores, shadow_scores, fixed_variance=self.fixed_variance, sigma=self.sigma
            )
        return roc.threshold_at_fpr(z, fpr)
