"""Where DP noise comes from: an AES-256-CTR keystream (:class:`KeyStream`) keyed fresh
from ``os.urandom`` or, in lab mode, from a party-local secret; samplers for Gaussian,
Poisson, Skellam and discrete Gaussian noise on it."""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import special

from privfl.config import Scenario

_LAB_SALT = b"privfl/dp/lab-mode/v1"


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
        """``n`` symmetric Skellam variates of the given variance (the law of the
        difference of two Poisson(variance/2)).

        Up to a variance of :data:`SKELLAM_TABLE_MAX_VARIANCE`, one 64-bit keystream word
        per variate is looked up in the integer CDF table of :func:`skellam_table`;
        beyond it, two Poisson variates are drawn.
        """
        if variance < 0:
            raise ValueError(f"skellam: variance must be >= 0, got {variance}")
        if variance == 0:
            return np.zeros(n, dtype=np.int64)
        if variance > SKELLAM_TABLE_MAX_VARIANCE:
            return self.poisson(variance / 2, n) - self.poisson(variance / 2, n)
        table = skellam_table(float(variance))
        u = self.uint64(n)
        while (bad := np.flatnonzero(u >= table.total)).size:  # about 2^-40 of draws
            u[bad] = self.uint64(bad.size)
        return table.lookup(u)

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


# Where scipy's scaled Bessel function still evaluates (its argument is the variance);
# the table then holds up to ~632,000 words (5 MB), beside a 0.5 MB guide.
SKELLAM_TABLE_MAX_VARIANCE = 1e9
_TABLE_SCALE = 2.0**64 - 2.0**24  # keeps the table's total below 2^64
# 2^17 buckets: a miss (a bucket holding a CDF step) costs less than a larger guide's
# cache misses.
_GUIDE_BITS = 17


class SkellamTable:
    """Inverse-CDF sampling of a symmetric Skellam law from 64-bit uniform words.

    ``cdf[i]`` is P(X <= i - width) for i = 0..2·width, in units of 2^-64: each
    probability ``exp(-variance) I_k(variance)`` is rounded down to a multiple of 2^-64
    (the same integer for k and -k) and summed in integers, so the law drawn is the
    Skellam law to within 2^-64 per integer and the accuracy of scipy's Bessel function
    (relative 4e-11 against scipy's own Skellam pmf at the largest variance; masses below
    2^-64, and the tails beyond ten standard deviations, are never drawn). A word ``u <
    total`` maps to the least ``k`` with ``u < cdf[k + width]``; a guide table indexed by
    the word's top bits starts each search next to its answer (Chen and Asau 1974). The
    table is public, a function of the variance only.
    """

    def __init__(self, variance: float) -> None:
        self.width = math.ceil(10 * math.sqrt(variance)) + 16
        ks = np.arange(-self.width, 1)
        mass = np.floor(special.ive(ks, variance) * _TABLE_SCALE)
        if not np.isfinite(mass).all():
            raise ValueError(f"skellam: no table for variance {variance}")
        half = mass.astype(np.uint64)
        self.cdf = np.cumsum(np.concatenate([half, half[-2::-1]]))
        self.total = int(self.cdf[-1])
        edges = np.arange(2**_GUIDE_BITS, dtype=np.uint64) << np.uint64(64 - _GUIDE_BITS)
        self.guide = np.searchsorted(self.cdf, edges, side="right").astype(np.int32)
        self.cdf.setflags(write=False)
        self.guide.setflags(write=False)

    def lookup(self, u: np.ndarray) -> np.ndarray:
        """The variates for uniform words ``u < total`` (int64)."""
        # np.take on intp indices: fancy indexing is twice as slow here.
        idx = np.take(self.guide, (u >> np.uint64(64 - _GUIDE_BITS)).view(np.int64))
        todo = np.flatnonzero(np.take(self.cdf, idx) <= u)
        for _ in range(8):
            if not todo.size:
                break
            idx[todo] += 1
            todo = todo[np.take(self.cdf, idx[todo]) <= u[todo]]
        if todo.size:  # a word in a tail bucket spanning many entries
            idx[todo] = np.searchsorted(self.cdf, u[todo], side="right")
        k = idx.astype(np.int64)
        k -= self.width
        return k


@lru_cache(maxsize=8)
def skellam_table(variance: float) -> SkellamTable:
    """The shared :class:`SkellamTable` of ``variance`` (one per process)."""
    return SkellamTable(variance)


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
