"""Fixed-point codec: exactness bound, unbiasedness, headroom and input checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.config import SecAggSection
from privfl.fixedpoint import ENCODE_CHUNK, EncodingError, FixedPointCodec, rounding_dither


def _sum(codec, encoded):
    acc = np.zeros_like(encoded[0])
    for e in encoded:
        acc = codec.add(acc, e)
    return acc


@pytest.mark.parametrize("n", [2, 3, 10, 50])
def test_sum_within_documented_bound(n):
    codec = FixedPointCodec(clip_range=4.0, frac_bits=20, ring_bits=62)
    rng = np.random.default_rng(n)
    xs = [rng.normal(0, 2, 1000) for _ in range(n)]
    ws = rng.integers(1, 5000, n).astype(float)
    enc = [codec.encode(x, weight=w, parties=n) for x, w in zip(xs, ws, strict=True)]
    got = codec.decode(_sum(codec, enc))
    want = sum(w * np.clip(x, -4, 4) for x, w in zip(xs, ws, strict=True))
    assert np.max(np.abs(got - want)) < n * 2.0**-20 * (1 + 1e-6)


@pytest.mark.parametrize("ring_bits", [32, 62, 64])
def test_extreme_values_clip_and_do_not_wrap(ring_bits):
    codec = FixedPointCodec(clip_range=4.0, frac_bits=12, ring_bits=ring_bits)
    n = 50
    x = np.array([4.0, -4.0, 1e30, -1e30, 0.0, 2.0**-40, -(2.0**-40), 3.9999999])
    enc = [codec.encode(x, parties=n) for _ in range(n)]
    got = codec.decode(_sum(codec, enc))
    want = n * np.clip(x, -4, 4)
    assert np.max(np.abs(got - want)) < n * 2.0**-12


@pytest.mark.parametrize("units", [0.4, 2.0**31 + 0.4])  # int64 and float64 rounding paths
def test_stochastic_rounding_is_unbiased(units):
    codec = FixedPointCodec(clip_range=2.0**30, frac_bits=2, ring_bits=62)
    x = np.full(200_000, units / 4)  # `units` ring units: rounded up with probability 0.4
    x[1::2] *= -1  # and down for the negatives
    q = codec.decode(codec.encode(x, parties=1, rng=np.random.default_rng(0))) * 4
    v = x * 4
    assert set(np.unique(q - np.floor(v))) == {0.0, 1.0}
    assert abs((q - v)[::2].mean()) < 0.01 and abs((q - v)[1::2].mean()) < 0.01


def test_rejects_nan_inf_and_wrong_length_naming_party():
    codec = FixedPointCodec()
    with pytest.raises(EncodingError, match=r"party 7: .*non-finite.*coordinate 2"):
        codec.encode(np.array([0.0, 1.0, np.nan]), parties=3, party=7)
    with pytest.raises(EncodingError, match=r"party 1: .*non-finite"):
        codec.encode(np.array([np.inf]), parties=3, party=1)
    with pytest.raises(EncodingError, match=r"party 2: update has 3 coordinates, expected 4"):
        codec.encode(np.zeros(3), parties=3, party=2, expected_dim=4)


def test_headroom_refused():
    codec = FixedPointCodec(clip_range=4.0, frac_bits=20, ring_bits=32)
    with pytest.raises(EncodingError, match=r"party 0: no headroom"):
        codec.encode(np.full(3, 4.0), weight=1000.0, parties=10, party=0)


def test_codec_parameter_checks():
    with pytest.raises(EncodingError, match="ring_bits"):
        FixedPointCodec(ring_bits=70)
    with pytest.raises(EncodingError, match="frac_bits"):
        FixedPointCodec(frac_bits=40, ring_bits=32)
    assert FixedPointCodec.from_section(SecAggSection(frac_bits=16)).frac_bits == 16


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.integers(2, 60),
)
def test_signed_roundtrip_property(vals, n):
    codec = FixedPointCodec(clip_range=8.0, frac_bits=16, ring_bits=48)
    x = np.array(vals)
    enc = codec.encode(x, parties=n)
    assert np.all(np.abs(codec.decode(enc) - np.clip(x, -8, 8)) < 2.0**-16)
    assert np.all(enc < np.uint64(1 << 48))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=300),
    st.sampled_from([(32, 12, 4.0), (48, 16, 8.0), (62, 20, 4.0), (64, 30, 1.0)]),
    st.floats(0, 500),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_fast_encode_equals_reference(vals, ring, weight, clip, seed):
    # The in-place encoder against the elementwise formula, same dither, bit for bit.
    bits, frac, c = ring
    codec = FixedPointCodec(clip_range=c, frac_bits=frac, ring_bits=bits)
    x = np.array(vals, dtype=np.float64)
    if not clip:
        x = np.clip(x, -c, c) / 2
    kw = {"weight": weight, "parties": 3, "clip": clip}
    fast = codec.encode(x, rng=np.random.default_rng(seed), **kw)
    ref = codec.encode_reference(x, rng=np.random.default_rng(seed), **kw)
    assert fast.dtype == ref.dtype == codec.dtype
    assert np.array_equal(fast, ref)


def test_seeded_encoding_is_reproducible_and_ring_words_fit():
    x = np.random.default_rng(3).normal(0, 1, 5000)
    for bits, dt in ((32, np.uint32), (33, np.uint64), (62, np.uint64)):
        codec = FixedPointCodec(clip_range=4.0, frac_bits=12, ring_bits=bits)
        a = codec.encode(x, parties=4, rng=np.random.default_rng(1))
        assert a.dtype == dt
        assert np.array_equal(a, codec.encode(x, parties=4, rng=np.random.default_rng(1)))
        assert not np.array_equal(a, codec.encode(x, parties=4, rng=np.random.default_rng(2)))
        neg = codec.from_signed(np.array([-1, -(2**30), 5]))
        assert neg.dtype == dt
        assert codec.to_signed(neg).tolist() == [-1, -(2**30), 5]


# |w * x * 2^f| below 2^30 takes the int64 rounding path, above it the float64 one.
@pytest.mark.parametrize("bits, frac, weight", [(32, 12, 37.5), (62, 20, 37.5), (62, 20, 1e3)])
def test_chunked_encode_equals_reference_across_chunks(bits, frac, weight):
    # Sizes around chunk boundaries: each chunk must continue the same dither stream.
    codec = FixedPointCodec(clip_range=4.0, frac_bits=frac, ring_bits=bits)
    x = np.random.default_rng(5).normal(0, 3, 3 * ENCODE_CHUNK + 7)
    for size in (ENCODE_CHUNK - 1, ENCODE_CHUNK, ENCODE_CHUNK + 1, x.size):
        kw = {"weight": weight, "parties": 3}
        fast = codec.encode(x[:size], rng=np.random.default_rng(size), **kw)
        ref = codec.encode_reference(x[:size], rng=np.random.default_rng(size), **kw)
        assert np.array_equal(fast, ref)


def test_dither_is_uniform_and_seeded():
    a = rounding_dither(np.random.default_rng(4), 100_000)
    assert a.dtype == np.uint32
    assert np.array_equal(a, rounding_dither(np.random.default_rng(4), 100_000))
    assert not np.array_equal(a, rounding_dither(None, 100_000))
    # Each of the 16 top-bit buckets holds 1/16 of the words (6250 +- ~5 sigma).
    counts = np.bincount(a >> 28, minlength=16)
    assert np.all(np.abs(counts - 6250) < 400)


def test_encode_into_a_slice_of_a_message_vector():
    codec = FixedPointCodec(clip_range=4.0, frac_bits=12, ring_bits=32)
    x = np.random.default_rng(6).normal(0, 1, 1000)
    vec = np.zeros(1002, dtype=np.uint32)
    got = codec.encode(x, parties=3, rng=np.random.default_rng(9), out=vec[:1000])
    assert np.shares_memory(got, vec)
    assert np.array_equal(vec[:1000], codec.encode(x, parties=3, rng=np.random.default_rng(9)))
    assert vec[1000:].tolist() == [0, 0]
    with pytest.raises(ValueError, match="uint32 vector of 1000"):
        codec.encode(x, parties=3, out=np.zeros(1000, dtype=np.uint64))
