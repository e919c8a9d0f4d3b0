"""Fixed-point encoding of real vectors into the ring Z_{2^k} for secure aggregation.

A party's update ``x`` is clipped coordinate-wise to ``[-c, c]``, multiplied by its
weight ``w`` and mapped to ``round(w * x * 2^f)`` with *stochastic* rounding (up with
probability equal to the fractional part), so ``E[encode(x)] = w * x * 2^f`` exactly.
Negative numbers are represented in two's complement modulo ``2^k``. Sums of encoded
vectors are taken modulo ``2^k`` (numpy ``uint64`` wraps modulo ``2^64`` and ``2^k``
divides it) and decoded as signed values.

Error bound
-----------
Each encoded coordinate differs from ``w * clip(x) * 2^f`` by less than one ring unit,
so for ``n`` parties::

    |decode(sum_i encode(x_i, w_i)) - sum_i w_i * clip(x_i)| < n * 2^-f

provided there is headroom: ``n * max|w * x| * 2^f + n < 2^(k-1)`` (checked by
:meth:`FixedPointCodec.check_headroom`; otherwise the sum could wrap and decode to a
wrong value, which we refuse rather than return).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from privfl.config import SecAggSection


def ring_dtype(ring_bits: int) -> np.dtype:
    """Storage type of ``Z_{2^ring_bits}``: ``uint32`` for ``ring_bits <= 32``, else ``uint64``."""
    if not 1 <= ring_bits <= 64:
        raise ValueError(f"ring_bits must be in [1, 64], got {ring_bits}")
    return np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)


class EncodingError(ValueError):
    """An update cannot be encoded (NaN/inf, wrong length, no headroom)."""


@dataclass(frozen=True)
class FixedPointCodec:
    """Public codec between float vectors and ring elements of ``Z_{2^ring_bits}``.

    Parameters
    ----------
    clip_range : float
        Coordinates of updates are clipped to ``[-clip_range, clip_range]``.
    frac_bits : int
        ``2**frac_bits`` quantisation steps per unit.
    ring_bits : int
        The ring is ``Z_{2**ring_bits}``, ``16 <= ring_bits <= 64``.
    """

    clip_range: float = 4.0
    frac_bits: int = 20
    ring_bits: int = 62

    def __post_init__(self) -> None:
        if not 16 <= self.ring_bits <= 64:
            raise EncodingError(f"ring_bits must be in [16, 64], got {self.ring_bits}")
        if not 1 <= self.frac_bits < self.ring_bits - 1:
            raise EncodingError(
                f"frac_bits must be in [1, ring_bits - 2 = {self.ring_bits - 2}], "
                f"got {self.frac_bits}"
            )
        if not self.clip_range > 0:
            raise EncodingError(f"clip_range must be > 0, got {self.clip_range}")

    @classmethod
    def from_section(cls, sec: SecAggSection) -> FixedPointCodec:
        """The codec a scenario's ``defense.secagg`` section describes."""
        return cls(clip_range=sec.clip_range, frac_bits=sec.frac_bits, ring_bits=sec.ring_bits)

    @property
    def scale(self) -> float:
        """Ring units per unit of value (``2**frac_bits``)."""
        return float(2**self.frac_bits)

    @property
    def dtype(self) -> np.dtype:
        """Storage type of ring elements: ``uint32`` for ``ring_bits <= 32``, else ``uint64``.

        A 32-bit ring halves the keystream, the bytes sent and the memory traffic; the
        wraparound arithmetic of the word type is exact modulo ``2**ring_bits``.
        """
        return ring_dtype(self.ring_bits)

    @property
    def mask(self) -> np.unsignedinteger:
        """Bit mask reducing a ring word modulo ``2**ring_bits``."""
        return self.dtype.type((1 << self.ring_bits) - 1)

    def check_headroom(self, parties: int, max_abs: float) -> None:
        """Raise unless ``parties`` values of magnitude ``<= max_abs`` sum without wrapping."""
        need = parties * (max_abs * self.scale + 1.0)
        if need >= 2.0 ** (self.ring_bits - 1):
            raise EncodingError(
                f"no headroom: {parties} parties x |value| <= {max_abs:g} at "
                f"frac_bits={self.frac_bits} needs more than ring_bits={self.ring_bits}; "
                "lower frac_bits, clip_range or the weights, or raise ring_bits"
            )

    def _checked(
        self,
        values: np.ndarray,
        weight: float,
        parties: int,
        party: int | str,
        expected_dim: int | None,
        clip: bool,
    ) -> np.ndarray:
        """``values`` as a flat float64 vector after every input and headroom check."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if expected_dim is not None and x.size != expected_dim:
            raise EncodingError(
                f"party {party}: update has {x.size} coordinates, expected {expected_dim}"
            )
        # min/max propagate NaN and show inf without a vector-sized temporary.
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = ~np.isfinite(x)
            i = int(np.flatnonzero(bad)[0])
            raise EncodingError(
                f"party {party}: update has {int(bad.sum())} non-finite value(s) "
                f"(first at coordinate {i}: {x[i]}); nothing was shared"
            )
        if not (np.isfinite(weight) and weight >= 0):
            raise EncodingError(f"party {party}: weight must be finite and >= 0, got {weight}")
        max_abs = max(-lo, hi)
        if clip:
            max_abs = min(max_abs, self.clip_range)
        try:
            self.check_headroom(parties, max_abs * weight)
        except EncodingError as exc:
            raise EncodingError(f"party {party}: {exc}") from None
        return x

    def encode(
        self,
        values: np.ndarray,
        *,
        weight: float = 1.0,
        parties: int,
        party: int | str = "?",
        expected_dim: int | None = None,
        clip: bool = True,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Encode ``weight * clip(values)`` into ring elements.

        Parameters
        ----------
        values : np.ndarray
            Real vector (flattened); must be finite.
        weight : float
            Non-negative multiplier applied after clipping.
        parties : int
            How many encoded vectors will be summed (for the headroom check).
        party : int | str
            Who is encoding, for error messages.
        expected_dim : int, optional
            Length the vector must have.
        clip : bool
            Clip to ``[-clip_range, clip_range]`` (False for metadata such as the weight
            itself; the headroom check still applies).
        rng : np.random.Generator, optional
            Source of the rounding dither (:func:`rounding_dither`). Rounding is not a
            secret: pass a seeded generator for reproducible encodings; a fresh
            OS-seeded one is used by default.

        Returns
        -------
        np.ndarray
            Ring elements of :attr:`dtype`, already reduced modulo ``2**ring_bits``.
            Equal, bit for bit, to :meth:`encode_reference` with the same generator.
        """
        x = self._checked(values, weight, parties, party, expected_dim, clip)
        bits = rounding_dither(rng, x.size)
        # Three float64 buffers and one bool vector; every other step is in place.
        if clip:
            s = np.clip(x, -self.clip_range, self.clip_range)
            s *= weight * self.scale
        else:
            s = x * (weight * self.scale)
        low = np.floor(s)
        s -= low  # fractional part, exact (Sterbenz)
        s *= 2.0**32  # exact: compare 32-bit dither words against frac * 2^32
        low += np.less(bits, s)
        q = low.astype(np.int64)
        return self._wrap(q)

    def encode_reference(
        self,
        values: np.ndarray,
        *,
        weight: float = 1.0,
        parties: int,
        party: int | str = "?",
        expected_dim: int | None = None,
        clip: bool = True,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Slow, obviously-correct :meth:`encode` (same checks, same dither, same output)."""
        x = self._checked(values, weight, parties, party, expected_dim, clip)
        u = rounding_dither(rng, x.size).astype(np.float64) / 2.0**32  # uniform on [0, 1)
        if clip:
            x = np.clip(x, -self.clip_range, self.clip_range)
        scaled = x * (weight * self.scale)
        low = np.floor(scaled)
        # Round up with probability equal to the fractional part: unbiased.
        q = (low + (u < scaled - low)).astype(np.int64)
        # Two's complement modulo 2^64, then modulo 2^ring_bits.
        ring = q.astype(np.uint64) & np.uint64((1 << self.ring_bits) - 1)
        return ring.astype(self.dtype)

    def _wrap(self, q: np.ndarray) -> np.ndarray:
        """int64 values as ring elements (two's complement wraps modulo 2^64 / 2^32)."""
        out = q.view(np.uint64) if self.dtype == np.uint64 else q.astype(np.uint32)
        if self.ring_bits < 8 * self.dtype.itemsize:
            out &= self.mask
        return out

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Interpret ring elements as signed fixed-point values (float64)."""
        out = self.to_signed(ring).astype(np.float64)
        out /= self.scale
        return out

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers in ``[-2^(k-1), 2^(k-1))`` (int64)."""
        signed = (np.asarray(ring, dtype=self.dtype) & self.mask).astype(np.int64)
        # Sign-extend bit k-1: shift it to bit 63, then shift back arithmetically.
        shift = 64 - self.ring_bits
        if shift:
            signed <<= shift
            signed >>= shift
        return signed

    def add(self, a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """``a + b`` in the ring (into ``out`` when given, e.g. ``out=a``)."""
        r = np.add(np.asarray(a, self.dtype), np.asarray(b, self.dtype), out=out)
        r &= self.mask
        return r

    def sub(self, a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """``a - b`` in the ring (into ``out`` when given, e.g. ``out=a``)."""
        r = np.subtract(np.asarray(a, self.dtype), np.asarray(b, self.dtype), out=out)
        r &= self.mask
        return r

    def from_signed(self, values: np.ndarray) -> np.ndarray:
        """Signed integers (e.g. integer DP noise) as ring elements."""
        return self._wrap(np.array(values, dtype=np.int64, copy=True).ravel())


def rounding_dither(rng: np.random.Generator | None, size: int) -> np.ndarray:
    """``size`` uniform 32-bit words from ``rng`` (OS-seeded when None): the rounding dither.

    Word ``b`` stands for ``u = b / 2^32``; a coordinate is rounded up when
    ``u < frac``, so the rounding bias is below ``2^-32`` ring units. Raw 64-bit draws
    split in two are the cheapest way to get them from numpy (the dither is public).
    """
    if rng is None:
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    return rng.bit_generator.random_raw((size + 1) // 2).view(np.uint32)[:size]
