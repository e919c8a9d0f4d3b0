"""The guessing game: the auditor's secret coins, the guesses and the bounds they give."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privfl.audit.bounds import epsilon_lower_bound, gaussian_mu_lower_bound, gdp_epsilon
from privfl.dp import KeyStream


@dataclass(frozen=True, eq=False)
class AuditResult:
    """What one audit found.

    ``epsilon_lower_bound`` (Steinke et al.) holds for any (ε, δ)-DP mechanism;
    ``epsilon_gaussian`` (Mahloujifar et al., μ-GDP) is tighter but tests a Gaussian
    privacy curve. ``guesses``/``correct`` are those of the guess count that gave
    ``epsilon_lower_bound``. The score arrays are there for histograms.
    """

    view: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    epsilon_gaussian: float
    mu_gaussian: float
    epsilon_accounted: float
    included_scores: np.ndarray
    excluded_scores: np.ndarray

    @property
    def violation(self) -> bool:
        """The run leaked more than its accountant says (at ``confidence``)."""
        return self.epsilon_lower_bound > self.epsilon_accounted


class OneRunAudit:
    """The auditor's secret coins and the guessing rule of a one-run audit.

    Parameters
    ----------
    canaries : int
        m; canary j is included when ``included[j]``.
    key : bytes, optional
        32 bytes keying the coins' AES-CTR stream; default ``os.urandom(32)``. Pass one
        only to reproduce a lab run: whoever holds it knows every coin.
    guess_fractions : sequence of float
        Guess counts to try, as fractions of m, fixed before any score is seen; the
        top half of each count is guessed included, the bottom half excluded, the rest
        abstained on. Several fractions share the significance (Bonferroni), so taking
        the best bound stays valid. The default, 5% of m, is a single test.
    """

    def __init__(
        self,
        canaries: int,
        *,
        key: bytes | None = None,
        guess_fractions: Sequence[float] = (0.05,),
    ) -> None:
        if canaries < 2:
            raise ValueError(f"OneRunAudit: need at least 2 canaries, got {canaries}")
        if not guess_fractions or any(not 0 < f <= 1 for f in guess_fractions):
            raise ValueError(
                f"guess_fractions must be non-empty fractions in (0, 1], got {guess_fractions}"
            )
        self.canaries = canaries
        self.guess_fractions = tuple(float(f) for f in guess_fractions)
        coins = KeyStream(key if key is not None else os.urandom(32)).uint64(canaries)
        self._included = (coins & np.uint64(1)).astype(bool)

    @property
    def included(self) -> np.ndarray:
        """The secret coins (a copy): what the canary-inserting harness needs."""
        return self._included.copy()

    def guess_counts(self) -> list[int]:
        """The guess counts the fractions stand for (at least 2, at most m)."""
        return sorted(
            {min(self.canaries, max(2, round(f * self.canaries))) for f in self.guess_fractions}
        )

    def evaluate(
        self,
        scores: np.ndarray,
        *,
        epsilon_accounted: float,
        delta: float,
        view: str,
        confidence: float = 0.95,
    ) -> AuditResult:
        """Guess from ``scores`` (higher: more likely included) and bound ε.

        Parameters
        ----------
        scores : np.ndarray
            One score per canary, in canary order.
        epsilon_accounted : float
            What the run's accountant claims (``inf`` without DP).
        delta : float
            δ of the claim, used by both bounds.
        view : str
            What the auditor saw, for the report.
        confidence : float
            Overall confidence, shared out over the guess counts.
        """
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size != self.canaries or not np.all(np.isfinite(s)):
            raise ValueError(
                f"evaluate: need {self.canaries} finite scores, got {s.size} "
                f"({int(np.sum(~np.isfinite(s)))} not finite)"
            )
        counts = self.guess_counts()
        each = 1 - (1 - confidence) / len(counts)
        order = np.argsort(s, kind="stable")
        best = (-1.0, 0, 0)
        mu_gauss = 0.0
        for k in counts:
            top, bottom = order[self.canaries - k // 2 :], order[: k - k // 2]
            right = int(self._included[top].sum() + (~self._included[bottom]).sum())
            eps = epsilon_lower_bound(
                canaries=self.canaries, guesses=k, correct=right, delta=delta, confidence=each
            )
            if eps > best[0]:
                best = (eps, k, right)
            mu = gaussian_mu_lower_bound(
                canaries=self.canaries, guesses=k, correct=right, confidence=each
            )
            mu_gauss = max(mu_gauss, mu)
        return AuditResult(
            view=view,
            canaries=self.canaries,
            guesses=best[1],
            correct=best[2],
            confidence=confidence,
            delta=delta,
            epsilon_lower_bound=best[0],
            epsilon_gaussian=gdp_epsilon(mu_gauss, delta),
            mu_gaussian=mu_gauss,
            epsilon_accounted=float(epsilon_accounted),
            included_scores=s[self._included],
            excluded_scores=s[~self._included],
        )
