"""AES-128-CTR as a pseudo-random generator of ring elements.

A 16-byte seed is the AES key; the counter block starts at zero. 128 bits match the
security of the X25519 agreement the pairwise seeds come from; AES-256 would spend 40%
more rounds on every mask for no gain end to end. Each seed is used
for exactly one expansion (seeds are fresh per round, derived with HKDF from a
per-pair secret and the round), so the keystream is never reused. Keystream bytes are
read as little-endian words of the ring's storage type -- ``uint32`` for
``ring_bits <= 32``, else ``uint64`` -- and reduced modulo ``2^k``; since ``2^k``
divides the word's modulus the result is uniform on ``Z_{2^k}``. One expansion of
``d`` elements is the "AES-CTR floor" (``4d`` or ``8d`` keystream bytes) the
benchmark compares masking against.

Two paths compute the same numbers: :func:`expand` (one whole vector, obviously
correct, the reference) and :func:`accumulate` (the kernel masking uses: adds or
subtracts many expansions into one vector in place, a cache-sized chunk at a time,
with no vector-sized temporaries).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from privfl.fixedpoint import ring_dtype

SEED_BYTES = 16
_ZERO_IV = bytes(16)
# Keystream produced per call in accumulate(): small enough to stay in L2 cache,
# large enough that Python's per-call overhead is noise.
CHUNK_BYTES = 1 << 18
_ZEROS = bytes(CHUNK_BYTES)


def encryptor(seed: bytes) -> CipherContext:
    """A fresh AES-128-CTR encryptor under key ``seed`` (counter at zero)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def keystream(seed: bytes, nbytes: int) -> bytearray:
    """AES-128-CTR keystream under key ``seed`` (``nbytes`` bytes)."""
    enc = encryptor(seed)
    buf = bytearray(nbytes)
    enc.update_into(bytes(nbytes), buf)
    enc.finalize()
    return buf


def expand(seed: bytes, size: int, ring_bits: int = 64) -> np.ndarray:
    """``size`` uniform elements of ``Z_{2^ring_bits}`` (:func:`ring_dtype` words)."""
    dt = ring_dtype(ring_bits).newbyteorder("<")
    out = np.frombuffer(keystream(seed, dt.itemsize * size), dtype=dt, count=size)
    out = out.astype(dt.newbyteorder("="), copy=False)
    if ring_bits < 8 * dt.itemsize:
        out &= out.dtype.type((1 << ring_bits) - 1)
    return out


def accumulate(
    acc: np.ndarray,
    seeds: Sequence[tuple[bytes, int]],
    ring_bits: int = 64,
    *,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """``acc += sum(sign * expand(seed))`` modulo ``2^ring_bits``, in place; returns ``acc``.

    ``acc`` must be a contiguous vector of :func:`ring_dtype` words; each sign is +1 or
    -1. With ``base`` (same shape and dtype) the result is ``base + sum(...)`` and the
    old contents of ``acc`` are ignored: this saves the pass that copies ``base``. All
    keystreams are produced chunk by chunk into one small scratch buffer and added with
    wraparound arithmetic in the word type, then reduced once per chunk.
    """
    dt = ring_dtype(ring_bits)
    if acc.dtype != dt or acc.ndim != 1 or not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ValueError(
            f"accumulate needs a writeable contiguous 1-d {dt} vector, got {acc.dtype} {acc.shape}"
        )
    if base is not None and (base.dtype != dt or base.shape != acc.shape):
        raise ValueError(
            f"accumulate: base must be {dt} {acc.shape}, got {base.dtype} {base.shape}"
        )
    if any(s not in (1, -1) for _, s in seeds):
        raise ValueError("accumulate: signs must be +1 or -1")
    if sys.byteorder != "little":  # keystream words are little-endian
        start = acc if base is None else base
        acc[:] = accumulate_reference(start, seeds, ring_bits)
        return acc
    encs = [(encryptor(seed), sign) for seed, sign in seeds]
    step = CHUNK_BYTES // dt.itemsize
    scratch = np.empty(step, dtype=dt)
    raw = memoryview(scratch).cast("B")
    zeros = memoryview(_ZEROS)
    reduce = dt.type((1 << ring_bits) - 1) if ring_bits < 8 * dt.itemsize else None
    for lo in range(0, acc.size, step):
        part = acc[lo : lo + step]
        n = part.size
        buf, nb = scratch[:n], n * dt.itemsize
        src = part if base is None else base[lo : lo + n]
        if not encs and base is not None:
            part[:] = src
        for enc, sign in encs:
            enc.update_into(zeros[:nb], raw[:nb])
            # The first addition reads base (if any); the rest accumulate in place.
            (np.add if sign > 0 else np.subtract)(src, buf, out=part)
            src = part
        if reduce is not None:  # while the chunk is still in cache
            np.bitwise_and(part, reduce, out=part)
    return acc


def accumulate_reference(
    acc: np.ndarray, seeds: Sequence[tuple[bytes, int]], ring_bits: int = 64
) -> np.ndarray:
    """Slow, obviously-correct :func:`accumulate`: one whole expansion per seed, a new array."""
    m = (1 << ring_bits) - 1
    out = np.asarray(acc, dtype=np.uint64) & np.uint64(m)
    for seed, sign in seeds:
        e = expand(seed, out.size, ring_bits).astype(np.uint64)
        out = ((out + e) if sign > 0 else (out - e)) & np.uint64(m)
    return out.astype(ring_dtype(ring_bits))
