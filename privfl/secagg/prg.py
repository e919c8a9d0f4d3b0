"""AES-256-CTR as a pseudo-random generator of ring elements.

A 32-byte seed is the AES key; the counter block starts at zero. Each seed is used
for exactly one expansion (seeds are fresh per round, derived with HKDF from a
per-pair secret and the round), so the keystream is never reused. Keystream bytes are
read as little-endian ``uint64`` and reduced modulo ``2^k``; since ``2^k`` divides
``2^64`` the result is uniform on ``Z_{2^k}``. This expansion is the "AES-CTR floor"
the benchmark compares masking against.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_IV = bytes(16)


def keystream(seed: bytes, nbytes: int) -> bytearray:
    """AES-256-CTR keystream under key ``seed`` (first ``nbytes`` bytes are valid)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    buf = bytearray(nbytes + 15)  # update_into needs block_size - 1 spare bytes
    enc.update_into(bytes(nbytes), buf)
    enc.finalize()
    return buf


def expand(seed: bytes, size: int, ring_bits: int = 64) -> np.ndarray:
    """``size`` uniform elements of ``Z_{2^ring_bits}`` as ``uint64`` (no extra copy)."""
    out = np.frombuffer(keystream(seed, 8 * size), dtype="<u8", count=size)
    if ring_bits < 64:
        out &= np.uint64((1 << ring_bits) - 1)
    return out
