"""Every seed privfl derives for public, reproducible randomness, in one place.

Public randomness (data splits, batch orders, which parties a round samples, rounding
dither, attack restarts) is seeded from the scenario's seed and named parts, so the same
scenario gives the same bytes in any process. Nothing secret comes from here: DP noise,
sampling coins and masks are keyed by the cryptographic streams of :mod:`privfl.dp.noise`
and :mod:`privfl.secagg.prg`.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_entropy(seed: int, stream: str) -> list[int]:
    """NumPy ``SeedSequence`` entropy for ``seed`` (any int) and a named stream."""
    tag = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "big")
    return [tag, 0 if seed >= 0 else 1, abs(seed)]


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """A NumPy generator for ``seed`` and a named stream (see :func:`stream_entropy`)."""
    return np.random.default_rng(stream_entropy(seed, stream))


def parts_rng(*parts: int) -> np.random.Generator:
    """A NumPy generator keyed by non-negative integer parts (seed, party, round, tag)."""
    return np.random.default_rng([int(p) for p in parts])
