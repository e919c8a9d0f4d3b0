"""Fixed-point encoding of real vectors into the ring Z_{2^k} for secure aggregation.

A party's update ``x`` is clipped coordinate-wise to ``[-c, c]``, multiplied by its
weight ``w`` and mapped to ``round(w * x * 2^f)`` with *stochastic* rounding (up with
probability equal to the fractional part), so ``E[encode(x)] = w * x * 2^f`` up to a
bias below ``2^-32`` ring units (the dither has 32 bits; :func:`rounding_dither`).
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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privfl.config import RING_CHOICES, SecAggSection, has_headroom
from privfl.errors import PrivflError

# Coordinates encoded per chunk: the scratch vectors (~1-2 MiB) stay in L2 and Python's
# per-chunk overhead is noise (best of 2^13..2^17 measured on x86-64 with 2 MiB L2).
ENCODE_CHUNK = 1 << 16
_DITHER_KEY_BYTES = 16
_ZEROS = memoryview(bytes(4 * ENCODE_CHUNK))  # CTR plaintext: the keystream itself
# encode() rounds in int64 when every |w * x * 2^frac_bits| is below this (then
# s * 2^32 + dither < 2^62 cannot overflow), else in float64.
_INT_PATH_LIMIT = 2.0**30


def ring_dtype(ring_bits: int) -> np.dtype:
    """Storage type of ``Z_{2^ring_bits}``: ``uint32`` for ``ring_bits <= 32``, else ``uint64``."""
    if not 1 <= ring_bits <= 64:
        raise ValueError(f"ring_bits must be in [1, 64], got {ring_bits}")
    return np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)


class EncodingError(PrivflError, ValueError):
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
        """The codec a scenario's ``defense.secagg`` section describes.

        A validated scenario's section holds a definite ring; a bare section left on
        automatic (``ring_bits = 0``) gets the 62-bit ring, safe for unknown weights.
        """
        bits = sec.ring_bits or RING_CHOICES[-1]
        return cls(clip_range=sec.clip_range, frac_bits=sec.frac_bits, ring_bits=bits)

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
        if not has_headroom(parties, max_abs, self.frac_bits, self.ring_bits):
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
    ) -> tuple[np.ndarray, bool]:
        """``values`` as a flat float64 vector after every input and headroom check, and
        whether :meth:`encode` may take its integer path (see :meth:`_integer_path`)."""
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
        return x, max_abs * weight * self.scale < _INT_PATH_LIMIT

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
        out: np.ndarray | None = None,
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
            Source of the key of the rounding dither (:func:`rounding_dither`; one
            16-byte draw per call). Rounding is not a secret: pass a seeded generator
            for reproducible encodings; a fresh OS-random key is used by default.

        Returns
        -------
        np.ndarray
            Ring elements of :attr:`dtype`, already reduced modulo ``2**ring_bits``.
            Equal, bit for bit, to :meth:`encode_reference` with the same generator.
        """
        x, integer = self._checked(values, weight, parties, party, expected_dim, clip)
        if out is None:
            out = np.empty(x.size, dtype=self.dtype)
        elif out.dtype != self.dtype or out.shape != (x.size,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {self.dtype} vector of {x.size} words")
        k = weight * self.scale
        # Cache-sized chunks: the scratch buffers stay in L2 and no vector-sized
        # temporary is allocated (fresh large buffers cost page faults, not arithmetic).
        step = min(ENCODE_CHUNK, max(x.size, 1))
        dither = _Dither(rng, step)
        s, q = np.empty(step), np.empty(step, dtype=np.int64)
        if not integer:
            low, up = np.empty(step), np.empty(step, dtype=bool)
        for lo in range(0, x.size, step):
            n = min(step, x.size - lo)
            xs, sv, qv = x[lo : lo + n], s[:n], q[:n]
            if clip:
                np.clip(xs, -self.clip_range, self.clip_range, out=sv)
                xs = sv
            if integer:  # q = floor((trunc(s * 2^32) + b) / 2^32): four passes fewer
                np.multiply(xs, k * 2.0**32, out=sv)
                np.copyto(qv, sv, casting="unsafe")  # truncates; |s * 2^32| < 2^62
                qv += dither.words(n)
                qv >>= 32  # arithmetic shift: floor division by 2^32
            else:  # q = floor(s) + (b < frac(s) * 2^32)
                lv, uv = low[:n], up[:n]
                np.multiply(xs, k, out=sv)
                np.floor(sv, out=lv)
                sv -= lv  # fractional part, exact (Sterbenz)
                sv *= 2.0**32  # exact: compare 32-bit dither words against frac * 2^32
                np.less(dither.words(n), sv, out=uv)
                np.copyto(qv, lv, casting="unsafe")  # integral floats: exact
                qv += uv
            # int64 -> ring word: two's complement wraps modulo 2^64 / 2^32.
            np.copyto(out[lo : lo + n], qv, casting="unsafe")
        if self.ring_bits < 8 * self.dtype.itemsize:
            out &= self.mask
        return out

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
        x, integer = self._checked(values, weight, parties, party, expected_dim, clip)
        bits = rounding_dither(rng, x.size)
        if clip:
            x = np.clip(x, -self.clip_range, self.clip_range)
        k = weight * self.scale
        if integer:
            # Round s * 2^32 toward zero (error < 1, i.e. < 2^-32 ring units), add the
            # dither and floor-divide: up with probability frac(trunc(s * 2^32) / 2^32).
            t = np.trunc(x * (k * 2.0**32)).astype(np.int64)
            q = np.floor_divide(t + bits.astype(np.int64), 2**32)
        else:
            u = bits.astype(np.float64) / 2.0**32  # uniform on [0, 1)
            scaled = x * k
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


def _dither_key(rng: np.random.Generator | None) -> bytes:
    # A seeded generator gives a reproducible key; None gives a fresh OS-random one.
    return os.urandom(_DITHER_KEY_BYTES) if rng is None else rng.bytes(_DITHER_KEY_BYTES)


class _Dither:
    """Sequential 32-bit dither words from AES-128-CTR under a key drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator | None, step: int) -> None:
        key = _dither_key(rng)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._buf = np.empty(step, dtype="<u4")
        self._raw = memoryview(self._buf).cast("B")

    def words(self, n: int) -> np.ndarray:
        """The next ``n <= step`` words of the stream (a view into a scratch buffer)."""
        self._enc.update_into(_ZEROS[: 4 * n], self._raw[: 4 * n])
        return self._buf[:n]


def rounding_dither(rng: np.random.Generator | None, size: int) -> np.ndarray:
    """``size`` uniform 32-bit words: the rounding dither (OS-random key when ``rng`` is None).

    Word ``b`` stands for ``u = b / 2^32``; a coordinate is rounded up when
    ``u < frac``, so the rounding bias is below ``2^-32`` ring units. The words are the
    little-endian AES-128-CTR keystream under a 16-byte key drawn from ``rng``: several
    times cheaper than numpy's generators, and the same generator state gives the same
    words. The dither is public (it only decides rounding), so AES-128 is plenty.
    """
    enc = Cipher(algorithms.AES(_dither_key(rng)), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(4 * size)) + enc.finalize()
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)
