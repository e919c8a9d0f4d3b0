"""The statistics of a one-run audit: ε (and μ-GDP) lower bounds from the correct guesses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize, special, stats

# Bisection stops when the bracket is this narrow (in ε or μ).
_TOLERANCE = 1e-6
# Largest ε (and μ) searched: beyond it every bound here is numerically saturated.
_SEARCH_MAX = 100.0


def _check_counts(canaries: int, guesses: int, correct: int, confidence: float) -> None:
    if not 0 <= correct <= guesses <= canaries or canaries < 1:
        raise ValueError(
            "need 0 <= correct <= guesses <= canaries and canaries >= 1, got "
            f"correct={correct}, guesses={guesses}, canaries={canaries}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """Probability, under an (ε, δ)-DP mechanism, of at least ``correct`` right guesses.

    Steinke, Nasr & Jagielski (NeurIPS 2023), Theorem 5.2: with q = e^ε/(1+e^ε) and
    B ~ Binomial(guesses, q),
    P[W ≥ v] ≤ P[B ≥ v] + 2mδ · max_{1≤i≤v} P[v-i ≤ B < v] / i.

    Parameters
    ----------
    canaries : int
        m, canaries each included on an independent fair coin.
    guesses : int
        r, canaries guessed (the rest abstained on).
    correct : int
        v, guesses that match the coin.
    epsilon, delta : float
        The (ε, δ) hypothesis.

    Returns
    -------
    float
        The p-value, in [0, 1].
    """
    q = special.expit(epsilon)
    v = correct
    beta = float(stats.binom.sf(v - 1, guesses, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, guesses, q) - beta  # P[v-i <= B < v]
    alpha = float(np.max(window / i))
    return min(1.0, beta + 2 * canaries * delta * alpha)


def _largest_rejected(reject: Callable[[float], bool]) -> float:
    """Sup of the parameters x ≥ 0 that ``reject`` refuses, for a test monotone in x
    (rejects a prefix [0, x*)). 0 when even x = 0 is not rejected."""
    if not reject(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while reject(hi):
        lo, hi = hi, 2 * hi
        if hi > _SEARCH_MAX:
            return _SEARCH_MAX
    while hi - lo > _TOLERANCE:
        mid = (lo + hi) / 2
        if reject(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """Empirical ε lower bound of a one-run audit (Steinke, Nasr & Jagielski 2023).

    The largest ε for which ``correct`` right guesses out of ``guesses`` would have
    probability at most ``1 - confidence`` under (ε, δ)-DP (:func:`one_run_p_value`),
    found by bisection. With 2mδ < 1 the p-value grows with ε, so every smaller ε is
    rejected too and the answer is a valid lower bound at the stated confidence.

    Parameters
    ----------
    canaries : int
        m, the number of canaries (each included on a fair coin).
    guesses, correct : int
        Guesses made (abstentions excluded) and how many were right.
    delta : float
        δ of the hypothesis; needs 2·canaries·δ < 1.
    confidence : float
        1 minus the test's significance.

    Returns
    -------
    float
        ε ≥ 0; 0 when the guesses are no better than chance at this confidence.
    """
    _check_counts(canaries, guesses, correct, confidence)
    if delta < 0 or 2 * canaries * delta >= 1:
        raise ValueError(
            f"delta must be >= 0 with 2*canaries*delta < 1, got delta={delta} for "
            f"{canaries} canaries (use fewer canaries or a smaller delta)"
        )
    if guesses == 0:
        return 0.0
    significance = 1 - confidence
    return _largest_rejected(
        lambda eps: (
            one_run_p_value(
                canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
            )
            <= significance
        )
    )


def gaussian_tradeoff_rejected(
    *, canaries: int, guesses: int, correct: int, mu: float, significance: float
) -> bool:
    """Whether ``correct`` of ``guesses`` right guesses refute μ-GDP at ``significance``.

    Mahloujifar, Melis & Chaudhuri (ICML 2025). Suppose P[W ≥ v] = τ = significance under
    an f-DP mechanism. For a uniformly random canary J, the mass of "J guessed right and
    W ≥ i" (r) and of "J guessed wrong and W ≥ i-1" (h) obey h ≥ f(1 - r): the event
    "J guessed +1 and the other guesses have ≥ i-1 right" is decided without J's coin.
    Starting from all of τ at W = v (the least demanding placement) and adding at each
    lower level i just the mass the constraint forces (it carries i right and k-i wrong
    guesses), the guesses must total r + h = k/m; needing more refutes the hypothesis.
    For μ-GDP, f(1 - r) = Φ(Φ⁻¹(r) - μ).
    """
    k, v, m = guesses, correct, canaries
    if v == 0:
        return False
    r = significance * v / m
    h = significance * (k - v) / m
    for i in range(v - 1, -1, -1):
        need = float(special.ndtr(special.ndtri(min(r, 1.0)) - mu))
        if need <= h:
            break  # nothing more is forced at this level or any lower one
        r = min(r + i / (k - i) * (need - h), 1.0)
        h = need
    return r + h > k / m


def gaussian_mu_lower_bound(
    *, canaries: int, guesses: int, correct: int, confidence: float = 0.95
) -> float:
    """The largest μ for which the audit refutes μ-GDP (Mahloujifar et al., ICML 2025).

    The test of :func:`gaussian_tradeoff_rejected` gets weaker as μ grows (the trade-off
    curve drops), so bisection finds the supremum of the refuted μ.
    """
    _check_counts(canaries, guesses, correct, confidence)
    if guesses == 0:
        return 0.0
    significance = 1 - confidence
    return _largest_rejected(
        lambda mu: gaussian_tradeoff_rejected(
            canaries=canaries, guesses=guesses, correct=correct, mu=mu, significance=significance
        )
    )


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth & Su 2022, Corollary 2.13):
    Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), evaluated in log space."""
    if mu <= 0:
        return 0.0
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(b - a)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP is (ε, δ)-DP (the smallest such ε); 0 when δ(0) ≤ δ."""
    if not 0 < delta < 1:
        raise ValueError(f"gdp_epsilon: delta must be in (0, 1), got {delta}")
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-9))


def gaussian_epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """ε lower bound from the Gaussian f-DP one-run audit (Mahloujifar et al., ICML 2025).

    :func:`gaussian_mu_lower_bound` converted to (ε, δ) through the μ-GDP privacy profile:
    no μ'-GDP mechanism with μ' at or below the bound explains the guesses, and those are
    exactly the Gaussian curves whose ε at δ is at or below the value returned.
    """
    mu = gaussian_mu_lower_bound(
        canaries=canaries, guesses=guesses, correct=correct, confidence=confidence
    )
    return gdp_epsilon(mu, delta)
