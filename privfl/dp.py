"""Differential privacy: noise from a keyed CSPRNG, Gaussian and integer mechanisms,
and privacy accounting through Opacus' accountants.

Randomness
    Every noise draw comes from an AES-256-CTR keystream (:class:`KeyStream`) whose key
    (:func:`noise_key`) is fresh from ``os.urandom`` by default (``party.noise = "os"``),
    or, in lab mode (``party.noise = "lab"``), HKDF-SHA256 of a party-local secret with
    the seed, purpose, party and round: a lab run reproduces its numbers while no message
    or result holds what is needed to regenerate the noise.

Mechanisms
    * :class:`GaussianAggregateMechanism` (DP-FedAvg, McMahan et al. 2018): clip each
      party's update to L2 norm C, add N(0, (σC/n)²) to the unweighted mean.
    * Distributed DP inside secure aggregation: each party adds integer noise of
      variance σ²C²s²/m in ring units (s = 2**frac_bits) to its encoded update before
      masking, m being the fewest parties it lets into a sum (``party.min_parties``);
      any sum it enters carries noise of standard deviation at least σCs, i.e. σC in
      real units. Skellam noise sums to Skellam noise exactly; discrete Gaussians sum to a
      distribution within a negligible distance of a discrete Gaussian at these scales.

Accounting
    Opacus' RDP or PRV accountant, for the sampled Gaussian mechanism. Distributed noise
    is accounted as a Gaussian with the sensitivity inflated by fixed-point rounding
    (C·s + sqrt(d)/2 ring units); :func:`check_distributed` insists the per-party noise is
    large enough (at least :data:`MIN_RING_NOISE_STD` ring units) for the Gaussian
    approximation of the integer noise to be immaterial.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import special

from privfl.config import Scenario, ScenarioError

# Per-party noise in ring units below this makes the integer noise visibly non-Gaussian.
MIN_RING_NOISE_STD = 16.0
# Rounding may add at most this fraction to the clip norm in ring units.
MAX_ROUNDING_INFLATION = 0.01

_LAB_SALT = b"privfl/dp/lab-mode/v1"


# --------------------------------------------------------------------------- randomness


def seed_secret(scenario: Scenario) -> bytes:
    """The scenario seed as key material: public, known to anyone holding the scenario.

    Only a party that trusts the server (``party.trust_server``) keys its noise from it;
    :func:`privfl.clients.policy` hands every other party a secret of its own.
    """
    return scenario.scenario.seed.to_bytes(16, "big", signed=True)


def noise_key(
    scenario: Scenario, purpose: str, party: int, server_round: int, *, secret: bytes | None
) -> bytes:
    """The 32-byte key of one noise stream.

    ``secret = None``: ``os.urandom(32)`` (secret, not reproducible). Otherwise
    HKDF-SHA256 of ``secret`` with the scenario seed, ``purpose``, ``party`` and round as
    info: reproducible by whoever holds ``secret`` and no one else.
    """
    # A party-local secret is also bound to the seed (one secret, many scenarios); keyed
    # by the seed itself, the derivation is the one a trusting party has always used.
    seed = seed_secret(scenario)
    bind = b"" if secret is None or secret == seed else seed
    return derive_noise_key(secret, purpose, party, server_round, bind=bind)


def derive_noise_key(
    secret: bytes | None, purpose: str, party: int, server_round: int, *, bind: bytes = b""
) -> bytes:
    """:func:`noise_key` without a scenario: ``os.urandom(32)`` for ``secret = None``,
    else HKDF-SHA256 of ``secret`` over the purpose, party, round (and ``bind``)."""
    if secret is None:
        return os.urandom(32)
    info = f"{purpose}|party={party}|round={server_round}".encode()
    if bind:
        info += b"|seed=" + bind
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_LAB_SALT, info=info).derive(secret)


class KeyStream:
    """Random variates from an AES-256-CTR keystream (a CSPRNG keyed by ``key``).

    Parameters
    ----------
    key : bytes
        32 bytes; use each key for one stream only (see :func:`noise_key`).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"KeyStream needs a 32-byte key, got {len(key)} bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def uint64(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words."""
        raw = self._enc.update(bytes(8 * n))
        return np.frombuffer(raw, dtype="<u8").copy()

    def uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms in the open interval (0, 1), 53-bit resolution."""
        return ((self.uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, n: int) -> np.ndarray:
        """``n`` standard normals (Box–Muller)."""
        m = (n + 1) // 2
        u1, u2 = self.uniform(m), self.uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
        return z[:n]

    def poisson(self, lam: float, n: int) -> np.ndarray:
        """``n`` Poisson(λ) variates as int64.

        λ < 10: inverse CDF on keystream uniforms. λ ≥ 10: Hörmann's transformed
        rejection (PTRS, 1993), exact, with the log-pmf evaluated in a form that stays
        accurate for λ up to 1e15.
        """
        if lam < 0:
            raise ValueError(f"poisson: lam must be >= 0, got {lam}")
        if lam == 0:
            return np.zeros(n, dtype=np.int64)
        if lam < 10:
            return _poisson_inverse_cdf(self.uniform(n), lam)
        return self._poisson_ptrs(lam, n)

    def _poisson_ptrs(self, lam: float, n: int) -> np.ndarray:
        b = 0.931 + 2.53 * math.sqrt(lam)
        a = -0.059 + 0.02483 * b
        inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
        v_r = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = max(int(todo.size * 1.2) + 16, 64)
            u = self.uniform(m) - 0.5
            v = self.uniform(m)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= v_r)
            bad = (k < 0) | ((us < 0.013) & (v > us))
            slow = ~quick & ~bad
            ok = quick.copy()
            # The acceptance test needs logs only off the quick region (about 14% of draws).
            vs, uss = v[slow], us[slow]
            lhs = np.log(vs * inv_alpha / (a / (uss * uss) + b))
            ok[slow] = lhs <= _poisson_log_pmf(k[slow], lam)
            got = k[ok].astype(np.int64)[: todo.size]
            out[todo[: got.size]] = got
            todo = todo[got.size :]
        return out

    def skellam(self, variance: float, n: int) -> np.ndarray:
        """``n`` symmetric Skellam variates of the given variance (difference of two
        Poisson(variance/2))."""
        return self.poisson(variance / 2, n) - self.poisson(variance / 2, n)

    def discrete_gaussian(self, sigma: float, n: int) -> np.ndarray:
        """``n`` discrete Gaussian variates N_Z(0, σ²) (Canonne–Kamath–Steinke 2020,
        rejection from a discrete Laplace of scale ⌊σ⌋+1; acceptance in float64)."""
        if sigma <= 0:
            raise ValueError(f"discrete_gaussian: sigma must be > 0, got {sigma}")
        t = math.floor(sigma) + 1
        s2 = sigma * sigma
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = max(int(todo.size * 2.5) + 16, 64)
            # discrete Laplace(t): sign and geometric magnitude, rejecting "-0"
            g = np.floor(-t * np.log(self.uniform(m)))
            neg = self.uniform(m) < 0.5
            keep = ~(neg & (g == 0))
            y = np.where(neg, -g, g)
            accept = self.uniform(m) < np.exp(-((np.abs(y) - s2 / t) ** 2) / (2 * s2))
            got = y[keep & accept].astype(np.int64)[: todo.size]
            out[todo[: got.size]] = got
            todo = todo[got.size :]
        return out


def _poisson_inverse_cdf(u: np.ndarray, lam: float) -> np.ndarray:
    kmax = int(lam + 40 * math.sqrt(lam) + 40)
    ks = np.arange(kmax + 1)
    cdf = np.cumsum(np.exp(-lam + ks * math.log(lam) - special.gammaln(ks + 1)))
    return np.minimum(np.searchsorted(cdf, u), kmax).astype(np.int64)


def _poisson_log_pmf(k: np.ndarray, lam: float) -> np.ndarray:
    """log P(K=k) for Poisson(λ), written around k ≈ λ to avoid cancelling huge terms."""
    k = np.maximum(k, 0.0)
    out = np.empty_like(k)
    small = k < 10
    if small.any():
        ks = k[small]
        out[small] = -lam + ks * math.log(lam) - special.gammaln(ks + 1)
        big = ~small
        kb = k[big]
    else:
        big = None
        kb = k
    # log k! by Stirling with three correction terms (error < 1e-12 for k >= 10), in
    # Horner form: powers of arrays are slow.
    inv = 1.0 / kb
    inv2 = inv * inv
    corr = inv * (1 / 12 - inv2 * (1 / 360 - inv2 / 1260))
    y = (kb - lam) / lam
    # h(y) = (1+y)log(1+y) - y; near 0 the direct form cancels, so a series there.
    h = y * y * (1 / 2 - y * (1 / 6 - y * (1 / 12 - y * (1 / 20 - y / 30))))
    far = np.abs(y) >= 1e-3
    if far.any():
        yf = y[far]
        h[far] = (1 + yf) * np.log1p(yf) - yf
    res = -lam * h - 0.5 * np.log(2 * np.pi * kb) - corr
    if big is None:
        return res
    out[big] = res
    return out


# --------------------------------------------------------------------------- accounting


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


def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after ``steps`` sampled Gaussian steps (Opacus RDP or PRV accountant)."""
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
    rounds at :func:`accounted_sampling_rate` spend ``defense.dp.epsilon``."""
    dp = scenario.defense.dp
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    return calibrate_noise(
        epsilon=dp.epsilon,
        delta=dp.delta,
        sample_rate=accounted_sampling_rate(scenario),
        steps=scenario.scenario.rounds,
        accountant=dp.accountant,
    )


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


# --------------------------------------------------------------------------- clipping, Gaussian


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


def record_with_vector(like: ArrayRecord, vec: np.ndarray) -> ArrayRecord:
    """An ArrayRecord with the keys, shapes and dtypes of ``like`` holding ``vec``."""
    arrays = unflatten(vec, like.to_numpy_ndarrays())
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a)) for k, a in zip(like.keys(), arrays, strict=True)}
    )


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


# --------------------------------------------------------------------------- distributed DP


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
