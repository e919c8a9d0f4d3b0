"""What the attacker expects of a scenario's attack round: the samples in the aggregate,
the bins that recover a target fraction of them, and the rounding noise secure
aggregation adds."""

from __future__ import annotations

import math

from privfl.config import Scenario


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
