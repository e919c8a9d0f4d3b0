"""DP mechanisms on model updates: L2 clipping, DP-FedAvg's Gaussian mechanism on the
mean, and distributed DP (integer noise each party adds inside secure aggregation)
with its ring sizing checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privfl.config import Scenario, ScenarioError
from privfl.dp.accounting import (
    MAX_ROUNDING_INFLATION,
    accounted_sampling_rate,
    epsilon_spent,
    global_noise_multiplier,
)
from privfl.dp.noise import KeyStream, noise_key

# Per-party noise in ring units below this makes the integer noise visibly non-Gaussian.
MIN_RING_NOISE_STD = 16.0


def clip_l2(vec: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``vec`` scaled to L2 norm at most ``clip``; returns (clipped copy, original norm)."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    v = np.asarray(vec, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return v * scale, norm


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate arrays into one float64 vector."""
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vec: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Split ``vec`` into arrays shaped and typed like ``like``."""
    out, pos = [], 0
    for a in like:
        a = np.asarray(a)
        out.append(vec[pos : pos + a.size].reshape(a.shape).astype(a.dtype, copy=False))
        pos += a.size
    if pos != vec.size:
        raise ValueError(f"unflatten: vector has {vec.size} entries, arrays need {pos}")
    return out


@dataclass(frozen=True)
class GaussianAggregateMechanism:
    """DP-FedAvg's Gaussian mechanism on the unweighted mean of party updates.

    ``constrain_sensitivity`` clips one party's update to L2 norm ``clip``;
    ``add_noise`` adds N(0, (σ·clip/n)²) to the mean of n clipped updates, which is the
    Gaussian mechanism with multiplier σ on their sum.
    """

    clip: float
    noise_multiplier: float

    def constrain_sensitivity(self, update: np.ndarray) -> tuple[np.ndarray, float]:
        """Clipped update and its original norm."""
        return clip_l2(update, self.clip)

    def noise_std(self, num_parties: int) -> float:
        """Standard deviation added to each coordinate of the mean of ``num_parties``."""
        if num_parties < 1:
            raise ValueError(f"num_parties must be >= 1, got {num_parties}")
        return self.noise_multiplier * self.clip / num_parties

    def add_noise(
        self, mean_update: np.ndarray, *, num_parties: int, stream: KeyStream
    ) -> np.ndarray:
        """``mean_update`` plus Gaussian noise drawn from ``stream``."""
        std = self.noise_std(num_parties)
        return np.asarray(mean_update, dtype=np.float64) + std * stream.normal(mean_update.size)


def _rounding_slack(dim: int) -> float:
    # Rounding each coordinate to the grid moves a vector by at most sqrt(d)/2 units.
    return math.sqrt(dim) / 2


def distributed_noise_multiplier(scenario: Scenario, dim: int) -> float:
    """The effective multiplier of the summed integer noise: std σ·C·s over the
    rounding-inflated sensitivity C·s + sqrt(d)/2 (ring units)."""
    dp, sa = scenario.defense.dp, scenario.defense.secagg
    return effective_noise_multiplier(global_noise_multiplier(scenario), dp.clip, sa.frac_bits, dim)


def effective_noise_multiplier(sigma: float, clip: float, frac_bits: int, dim: int) -> float:
    """:func:`distributed_noise_multiplier` from explicit values: integer noise of std
    ``sigma·clip·2^frac_bits`` over the rounding-inflated sensitivity."""
    s = 2.0**frac_bits
    return sigma * clip * s / (clip * s + _rounding_slack(dim))


def distributed_epsilon(scenario: Scenario, dim: int, rounds: int) -> float:
    """ε of the party-level guarantee after ``rounds`` rounds of distributed DP."""
    dp = scenario.defense.dp
    return epsilon_spent(
        noise_multiplier=distributed_noise_multiplier(scenario, dim),
        sample_rate=accounted_sampling_rate(scenario),
        steps=rounds,
        delta=dp.delta,
        accountant=dp.accountant,
    )


def wrap_probability_bound(
    *,
    dim: int,
    parties: int,
    ring_bits: int,
    frac_bits: int,
    clip_range: float,
    clip: float,
    noise_multiplier: float,
    mechanism: str,
) -> float:
    """Upper bound on the probability that some coordinate of the decoded noisy sum
    leaves the signed range of Z_{2^ring_bits} in one round.

    Signal: each coordinate of a party's encoded update is at most min(clip_range, clip)·s
    + 1/2 in absolute value. Noise tail: Skellam (Bernstein, increments ±1) or a sum of
    discrete Gaussians (σ²-sub-Gaussian); union bound over coordinates.
    """
    s = 2.0**frac_bits
    half = 2.0 ** (ring_bits - 1)
    headroom = half - parties * (min(clip_range, clip) * s + 0.5)
    if headroom <= 0:
        return 1.0
    var = (noise_multiplier * clip * s) ** 2
    if var == 0:
        return 0.0
    if mechanism == "skellam":
        tail = 2 * math.exp(-(headroom**2) / (2 * (var + headroom / 3)))
    else:
        tail = 2 * math.exp(-(headroom**2) / (2 * var))
    return min(1.0, dim * tail)


def _ring_bits_needed(
    dim: int,
    parties: int,
    frac_bits: int,
    clip_range: float,
    clip: float,
    sigma: float,
    mechanism: str,
    target: float,
) -> int | None:
    for bits in range(16, 65):
        p = wrap_probability_bound(
            dim=dim,
            parties=parties,
            ring_bits=bits,
            frac_bits=frac_bits,
            clip_range=clip_range,
            clip=clip,
            noise_multiplier=sigma,
            mechanism=mechanism,
        )
        if p <= target:
            return bits
    return None


def check_distributed(scenario: Scenario, dim: int, parties: int) -> None:
    """Check that distributed DP fits the secure-aggregation ring, before any round.

    Raises
    ------
    ScenarioError
        Naming the keys to change: noise too coarse for the fixed-point grid
        (``defense.secagg.frac_bits``), rounding inflating the sensitivity, or a noisy
        sum that may wrap around the ring (``defense.secagg.ring_bits``,
        ``frac_bits``, ``clip_range``, ``defense.dp.clip``).
    """
    dp, sa = scenario.defense.dp, scenario.defense.secagg
    if dp.mode != "distributed":
        return
    if parties < 1 or dim < 1:
        raise ValueError(f"check_distributed: need parties >= 1 and dim >= 1, got {parties}, {dim}")
    s = 2.0**sa.frac_bits
    sigma = global_noise_multiplier(scenario)
    per_party_std = sigma * dp.clip * s / math.sqrt(parties)
    if per_party_std < MIN_RING_NOISE_STD:
        need = math.ceil(math.log2(MIN_RING_NOISE_STD * math.sqrt(parties) / (sigma * dp.clip)))
        raise ScenarioError(
            f"defense.secagg.frac_bits: each of {parties} parties would add integer noise of "
            f"std {per_party_std:.3g} ring units (σ={sigma:.3g}, defense.dp.clip={dp.clip}); "
            f"at least {MIN_RING_NOISE_STD:g} is needed: raise frac_bits to >= {need} or "
            "defense.dp.clip"
        )
    if _rounding_slack(dim) > MAX_ROUNDING_INFLATION * dp.clip * s:
        need = math.ceil(math.log2(_rounding_slack(dim) / (MAX_ROUNDING_INFLATION * dp.clip)))
        raise ScenarioError(
            f"defense.secagg.frac_bits: rounding a {dim}-parameter update to the grid adds up "
            f"to {_rounding_slack(dim):.3g} ring units to the sensitivity "
            f"(defense.dp.clip·2^frac_bits = {dp.clip * s:.3g}); raise frac_bits to >= {need} "
            "or raise defense.dp.clip"
        )
    p = wrap_probability_bound(
        dim=dim,
        parties=parties,
        ring_bits=sa.ring_bits,
        frac_bits=sa.frac_bits,
        clip_range=sa.clip_range,
        clip=dp.clip,
        noise_multiplier=sigma,
        mechanism=dp.mechanism,
    )
    if p > dp.max_wrap_probability:
        bits = _ring_bits_needed(
            dim,
            parties,
            sa.frac_bits,
            sa.clip_range,
            dp.clip,
            sigma,
            dp.mechanism,
            dp.max_wrap_probability,
        )
        fix = (
            f"raise defense.secagg.ring_bits to >= {bits}"
            if bits is not None
            else "ring_bits cannot go high enough"
        )
        raise ScenarioError(
            f"defense.secagg.ring_bits: the noisy sum of {parties} parties may wrap around "
            f"Z_2^{sa.ring_bits} with probability up to {p:.3g} per round "
            f"(defense.dp.max_wrap_probability = {dp.max_wrap_probability:g}); {fix}, or lower "
            "defense.secagg.frac_bits, defense.secagg.clip_range or defense.dp.clip"
        )


def distributed_noise(
    size: int,
    *,
    scenario: Scenario,
    party: int,
    server_round: int,
    scale: float,
    secret: bytes | None,
    min_parties: int,
) -> np.ndarray:
    """One party's share of the distributed-DP noise, int64 in ring units.

    Variance σ²C²·scale²/m for m = ``min_parties``, the fewest parties the party lets its
    input be summed with: any sum it enters holds at least m such shares, so at least
    noise of standard deviation σ·C in real units, however many parties the server
    really gathered. Add it to the encoded (fixed-point) update, modulo the ring, before
    masking or secret sharing. ``scale`` is 2**frac_bits; ``secret`` keys the stream
    (:func:`noise_key`; None = the OS CSPRNG).
    """
    dp = scenario.defense.dp
    if dp.mode != "distributed":
        raise ValueError(f"distributed_noise: defense.dp.mode is {dp.mode!r}, not 'distributed'")
    if min_parties < 1:
        raise ValueError(f"distributed_noise: min_parties must be >= 1, got {min_parties}")
    var = (global_noise_multiplier(scenario) * dp.clip * scale) ** 2 / min_parties
    key = noise_key(scenario, f"distributed-{dp.mechanism}", party, server_round, secret=secret)
    stream = KeyStream(key)
    if dp.mechanism == "skellam":
        return stream.skellam(var, size)
    return stream.discrete_gaussian(math.sqrt(var), size)


# Party-level noise this many times above a clipped update's typical coordinate drowns it.
NOISE_TO_SIGNAL_WARNING = 10.0


def utility_warning(scenario: Scenario, dim: int) -> str | None:
    """A warning when party-level DP noise will drown every update, else None.

    The mean of n clipped updates gets noise of std σ·C/n per coordinate (``global``; for
    ``distributed`` the shares sized for ``party.min_parties`` of them add up to more);
    a clipped update's typical coordinate is C/√d. Far above 1 the model cannot train.
    """
    dp = scenario.defense.dp
    if dp.mode not in ("global", "distributed") or dim < 1:
        return None
    sigma = global_noise_multiplier(scenario)
    n = scenario.data.parties
    if dp.mode == "global":
        expected = max(1.0, n * dp.party_sampling_rate)
        std = sigma * dp.clip / expected
    else:
        m = scenario.party.resolve_min_parties(n)
        std = sigma * dp.clip * math.sqrt(n / m) / n
    ratio = std / (dp.clip / math.sqrt(dim))
    if ratio <= NOISE_TO_SIGNAL_WARNING:
        return None
    return (
        f"defense.dp: party-level noise of std {std:.3g} per coordinate is {ratio:.0f}x the "
        f"typical coordinate of a clipped update (C/sqrt(d) with d = {dim}); the model will "
        "hardly train. Use many more parties (data.parties), a larger defense.dp.epsilon, "
        'or record-level DP (defense.dp.mode = "client")'
    )
