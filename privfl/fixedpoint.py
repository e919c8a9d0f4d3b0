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
    def mask(self) -> np.uint64:
        """Bit mask reducing a ``uint64`` modulo ``2**ring_bits``."""
        return np.uint64((1 << self.ring_bits) - 1)

    def check_headroom(self, parties: int, max_abs: float) -> None:
        """Raise unless ``parties`` values of magnitude ``<= max_abs`` sum without wrapping."""
        need = parties * (max_abs * self.scale + 1.0)
        if need >= 2.0 ** (self.ring_bits - 1):
            raise EncodingError(
                f"no headroom: {parties} parties x |value| <= {max_abs:g} at "
                f"frac_bits={self.frac_bits} needs more than ring_bits={self.ring_bits}; "
                "lower frac_bits, clip_range or the weights, or raise ring_bits"
            )

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
            Source of the rounding dither. Rounding is not a secret; a fresh
            OS-seeded generator is used by default.

        Returns
        -------
        np.ndarray
            ``uint64`` ring elements, already reduced modulo ``2**ring_bits``.
        """
        x = np.asarray(values, dtype=np.float64).ravel()
        if expected_dim is not None and x.size != expected_dim:
            raise EncodingError(
                f"party {party}: update has {x.size} coordinates, expected {expected_dim}"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EncodingError(
                f"party {party}: update has {int(bad.sum())} non-finite value(s) "
                f"(first at coordinate {i}: {x[i]}); nothing was shared"
            )
        if not (np.isfinite(weight) and weight >= 0):
            raise EncodingError(f"party {party}: weight must be finite and >= 0, got {weight}")
        if clip:
            x = np.clip(x, -self.clip_range, self.clip_range)
        scaled = x * (weight * self.scale)
        max_abs = float(np.abs(scaled).max(initial=0.0)) / self.scale
        try:
            self.check_headroom(parties, max_abs)
        except EncodingError as exc:
            raise EncodingError(f"party {party}: {exc}") from None
        if rng is None:
            rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        low = np.floor(scaled)
        # Round up with probability equal to the fractional part: unbiased.
        q = low + (rng.random(x.size) < (scaled - low))
        return q.astype(np.int64).view(np.uint64) & self.mask

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Interpret ring elements as signed fixed-point values (float64)."""
        return self.to_signed(ring).astype(np.float64) / self.scale

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers in ``[-2^(k-1), 2^(k-1))`` (int64)."""
        r = np.asarray(ring, dtype=np.uint64) & self.mask
        if self.ring_bits == 64:
            return r.view(np.int64)
        half = np.uint64(1 << (self.ring_bits - 1))
        signed = r.astype(np.int64)
        return np.where(r >= half, signed - np.int64(1 << self.ring_bits), signed)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a + b`` in the ring."""
        return (np.asarray(a, np.uint64) + np.asarray(b, np.uint64)) & self.mask

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a - b`` in the ring."""
        return (np.asarray(a, np.uint64) - np.asarray(b, np.uint64)) & self.mask

    def from_signed(self, values: np.ndarray) -> np.ndarray:
        """Signed integers (e.g. integer DP noise) as ring elements."""
        return np.asarray(values, dtype=np.int64).view(np.uint64) & self.mask
