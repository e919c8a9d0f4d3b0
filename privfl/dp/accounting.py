"""Privacy accounting through Opacus' RDP and PRV accountants: ε of a history of sampled
Gaussian steps, noise calibration, and the per-party accountant."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from privfl.config import Scenario

# Rounding to the fixed-point grid may add at most this fraction to the clip norm in ring
# units (distributed DP; checked before any round).
MAX_ROUNDING_INFLATION = 0.01


def _accountant(kind: str, history: Sequence[tuple[float, float, int]]):
    if kind not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {kind!r}")
    acc = create_accountant(mechanism=kind)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return acc


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str = "rdp"
) -> float:
    """ε of a composition of sampled Gaussian mechanisms given as Opacus history
    entries ``(noise_multiplier, sample_rate, steps)``; 0 for an empty history."""
    if not history or all(k == 0 for _, _, k in history):
        return 0.0
    if any(s <= 0 for s, _, k in history if k > 0):
        return math.inf
    return float(_accountant(accountant, history).get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after ``steps`` sampled Gaussian steps (Opacus RDP or PRV accountant).

    Memoised: a pure function of its arguments, asked again by every party of a
    simulation and every round of an account."""
    return epsilon_of_history(
        [(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
    )


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The noise multiplier σ that spends (ε, δ) in ``steps`` steps at ``sample_rate``.

    Opacus' binary search, with the tolerance tightened to 0.5% of ε: the σ returned
    spends between 0.995·ε and ε.
    """
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(
            f"calibrate_noise: need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}"
        )
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(
            f"calibrate_noise: need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}"
        )
    return _calibrate(epsilon, delta, sample_rate, steps, accountant)


@functools.lru_cache(maxsize=64)
def _calibrate(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005 * epsilon,
        )
    )


@dataclass
class PartyAccountant:
    """Party-level privacy of the global model across rounds (DP-FedAvg, distributed).

    One round is one sampled Gaussian step at the party sampling rate. ``budget`` is the
    target ε (``None``: no budget, only reporting).
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str = "rdp"
    budget: float | None = None
    rounds: int = 0
    history: dict[int, float] = field(default_factory=dict)

    def epsilon_after(self, rounds: int) -> float:
        """ε after ``rounds`` rounds."""
        return epsilon_spent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=rounds,
            delta=self.delta,
            accountant=self.accountant,
        )

    @property
    def epsilon(self) -> float:
        """ε spent so far."""
        return self.epsilon_after(self.rounds)

    def would_exceed(self) -> bool:
        """Whether one more round would spend more than the budget."""
        return self.budget is not None and self.epsilon_after(self.rounds + 1) > self.budget

    def step(self, server_round: int) -> float:
        """Account one released round; returns ε so far."""
        self.rounds += 1
        self.history[server_round] = self.epsilon
        return self.history[server_round]


def accounted_sampling_rate(scenario: Scenario) -> float:
    """The party sampling rate the accountant may credit.

    Under ``distributed`` DP the parties hold the guarantee against the server, which
    draws the sample: no amplification is credited for it (1.0), unless the parties trust
    the server (``party.trust_server``). ``global`` DP trusts the server by construction
    (it adds the noise), so its sampling is credited.
    """
    dp = scenario.defense.dp
    if dp.mode == "distributed" and not scenario.party.trust_server:
        return 1.0
    return dp.party_sampling_rate


def global_noise_multiplier(scenario: Scenario) -> float:
    """σ of the party-level Gaussian mechanism for modes ``global`` / ``distributed``:
    ``defense.dp.noise_multiplier`` if set, else calibrated so that ``scenario.rounds``
    rounds at :func:`accounted_sampling_rate` spend ``defense.dp.epsilon``.

    Distributed DP's calibrated σ is :data:`MAX_ROUNDING_INFLATION` larger: the grid's
    rounding may inflate the sensitivity by up to that much, and the parties account
    with the effective multiplier, so the budget still covers every round."""
    dp = scenario.defense.dp
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    sigma = calibrate_noise(
        epsilon=dp.epsilon,
        delta=dp.delta,
        sample_rate=accounted_sampling_rate(scenario),
        steps=scenario.scenario.rounds,
        accountant=dp.accountant,
    )
    return sigma * (1 + MAX_ROUNDING_INFLATION) if dp.mode == "distributed" else sigma


def party_accountant(scenario: Scenario, noise_multiplier: float | None = None) -> PartyAccountant:
    """The :class:`PartyAccountant` of a ``global`` or ``distributed`` scenario.

    With a distributed scenario pass the *effective* multiplier
    (:func:`distributed_noise_multiplier`).
    """
    dp = scenario.defense.dp
    sigma = global_noise_multiplier(scenario) if noise_multiplier is None else noise_multiplier
    return PartyAccountant(
        noise_multiplier=sigma,
        sample_rate=accounted_sampling_rate(scenario),
        delta=dp.delta,
        accountant=dp.accountant,
        budget=dp.epsilon if dp.epsilon > 0 and dp.stop_when_exhausted else None,
    )
