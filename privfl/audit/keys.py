"""The audit's secret streams: per-purpose subkeys and keyed draws of distinct indices."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfl.dp import KeyStream


def subkey(key: bytes, purpose: str) -> bytes:
    """A 32-byte key for one stream, HKDF-SHA256 of ``key`` with ``purpose`` as info, so
    one audit key can drive its coins, coordinates, sampling and noise independently."""
    if len(key) != 32:
        raise ValueError(f"subkey: need a 32-byte key, got {len(key)} bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"privfl/audit/v1", info=purpose.encode()
    ).derive(key)


def _distinct(stream: KeyStream, count: int, population: int) -> np.ndarray:
    """``count`` distinct integers from ``range(population)``, a uniform random subset in
    random order."""
    if not 0 <= count <= population:
        raise ValueError(f"cannot draw {count} distinct values from {population}")
    if 4 * count > population:
        # Dense: the first entries of a random permutation (sort by random keys).
        return np.argsort(stream.uint64(population), kind="stable")[:count].astype(np.int64)
    out = np.zeros(0, dtype=np.int64)
    while out.size < count:
        # Sparse: draw with replacement, keep first occurrences (modulo bias < d/2^64).
        draw = stream.uint64(2 * (count - out.size) + 8) % np.uint64(population)
        merged = np.concatenate([out, draw.astype(np.int64)])
        _, first = np.unique(merged, return_index=True)
        out = merged[np.sort(first)][:count]
    return out
