"""Shamir secret sharing over the prime field GF(2^521 - 1).

The Mersenne prime ``2^521 - 1`` is larger than any 32-byte secret (X25519 private
keys, PRG seeds), so a secret is one field element. Coefficients come from
:mod:`secrets`. Any ``t`` shares determine the secret; any ``t - 1`` are uniformly
distributed and independent of it. Share ``x`` coordinates are party index + 1 (never
0, where the secret sits).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from privfl.errors import PrivflError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(PrivflError, ValueError):
    """Too few or inconsistent shares."""


def share(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Split ``secret`` into one share per ``x`` in ``xs``; ``threshold`` of them recover it."""
    if not 0 <= secret < PRIME:
        raise ShamirError("secret must be a field element in [0, 2^521 - 1)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError(f"share points must be distinct and non-zero, got {list(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """Secret from at least ``threshold`` shares ``{x: y}`` (Lagrange at 0)."""
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    pts = sorted(shares.items())[:threshold]
    xs = tuple(x for x, _ in pts)
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ShamirError(f"share points must be distinct and non-zero, got {list(xs)}")
    return sum(y * c for (_, y), c in zip(pts, _lagrange_at_zero(xs), strict=True)) % PRIME


@lru_cache(maxsize=8192)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # Public and fixed by the share points alone: a server reconstructs with the same
    # points round after round.
    out = []
    for i, w in enumerate(_weights(xs)):
        # Share points are small party indices: multiplying them unreduced and reducing
        # once costs less than a reduction after every factor.
        num = 1
        for j, xj in enumerate(xs):
            if j != i:
                num *= -xj
        out.append(num % PRIME * w % PRIME)
    return tuple(out)


@lru_cache(maxsize=8192)
def _weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    # Barycentric weights 1 / prod_{j != i} (x_i - x_j), with one modular inversion for all
    # of them (Montgomery's trick) instead of one per point.
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den *= xi - xj
        dens.append(den % PRIME)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return tuple(out)


def on_polynomial(points: Mapping[int, bytes], others: Mapping[int, bytes]) -> dict[int, bool]:
    """For each share of ``others``, whether it lies on the polynomial of degree
    ``len(points) - 1`` through the shares ``points`` (all as :func:`share_bytes` gives).

    One set of barycentric weights serves every point checked: ``t`` products per point
    instead of a reconstruction of its own.
    """
    pts = sorted((x, int.from_bytes(y, "big")) for x, y in points.items())
    xs = tuple(x for x, _ in pts)
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ShamirError(f"share points must be distinct and non-zero, got {list(xs)}")
    yw = [y * w % PRIME for (_, y), w in zip(pts, _weights(xs), strict=True)]
    known = dict(pts)
    out = {}
    for x, share_ in others.items():
        if x in known:
            out[x] = int.from_bytes(share_, "big") == known[x]
            continue
        diffs = [x - xj for xj in xs]
        suffix = [1] * (len(xs) + 1)
        for j in range(len(xs) - 1, -1, -1):
            suffix[j] = suffix[j + 1] * diffs[j]
        value, prefix = 0, 1
        for j, c in enumerate(yw):
            value += c * (prefix * suffix[j + 1])  # prod_{m != j} (x - x_m), unreduced
            prefix *= diffs[j]
        out[x] = value % PRIME == int.from_bytes(share_, "big")
    return out


def share_bytes(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """:func:`share` for a byte string of at most 64 bytes; shares as fixed-width bytes."""
    if len(secret) > 64:
        raise ShamirError(f"secret of {len(secret)} bytes does not fit the field")
    # A leading 0x01 keeps leading zero bytes of the secret.
    val = int.from_bytes(b"\x01" + secret, "big")
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in share(val, xs, threshold).items()}


def reconstruct_bytes(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Inverse of :func:`share_bytes`."""
    val = reconstruct({x: int.from_bytes(y, "big") for x, y in shares.items()}, threshold)
    raw = val.to_bytes((val.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1:
        raise ShamirError("reconstructed value is not a valid encoded secret (bad shares?)")
    return raw[1:]
