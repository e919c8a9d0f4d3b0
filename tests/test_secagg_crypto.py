"""Channel (X25519 + HKDF + AES-GCM), static masking keys, AES-CTR PRG and Shamir sharing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.flower import wire
from privfl.secagg import prg, shamir
from privfl.secagg.channel import ChannelError, SecureChannel, exchange, public_bytes
from privfl.secagg.identity import IdentityError, dh_private, dh_public, public_identity

SESSION = b"s" * 16


def _pair():
    a, b = SecureChannel(0, SESSION), SecureChannel(1, SESSION)
    return a, b


def test_channel_roundtrip_both_directions():
    a, b = _pair()
    ct = a.seal(1, b.public_key, b"hello", rnd=3, stage="x")
    assert b.open(0, a.public_key, ct, rnd=3, stage="x") == b"hello"
    ct2 = b.seal(0, a.public_key, b"back", rnd=3, stage="x")
    assert a.open(1, b.public_key, ct2, rnd=3, stage="x") == b"back"


def test_channel_tamper_detected():
    a, b = _pair()
    ct = bytearray(a.seal(1, b.public_key, b"secret share", rnd=1, stage="x"))
    ct[-3] ^= 1
    with pytest.raises(ChannelError, match=r"party 1: ciphertext from party 0 .*authentication"):
        b.open(0, a.public_key, bytes(ct), rnd=1, stage="x")


def test_channel_counter_tamper_detected():
    a, b = _pair()
    ct = bytearray(a.seal(1, b.public_key, b"x", rnd=1, stage="x"))
    ct[7] ^= 1  # counter is bound into nonce and AAD
    with pytest.raises(ChannelError, match="authentication"):
        b.open(0, a.public_key, bytes(ct), rnd=1, stage="x")


def test_channel_replay_detected_same_and_other_context():
    a, b = _pair()
    ct = a.seal(1, b.public_key, b"x", rnd=1, stage="x")
    b.open(0, a.public_key, ct, rnd=1, stage="x")
    with pytest.raises(ChannelError, match="replay"):
        b.open(0, a.public_key, ct, rnd=1, stage="x")
    # Replayed into a later round or another stage: AAD no longer matches.
    with pytest.raises(ChannelError, match="authentication"):
        b.open(0, a.public_key, ct, rnd=2, stage="x")
    with pytest.raises(ChannelError, match="authentication"):
        b.open(0, a.public_key, ct, rnd=1, stage="y")


def test_channel_misrouted_and_wrong_session_detected():
    a, b = _pair()
    c = SecureChannel(2, SESSION)
    ct = a.seal(1, b.public_key, b"x", rnd=1, stage="x")
    with pytest.raises(ChannelError, match="authentication"):
        c.open(0, a.public_key, ct, rnd=1, stage="x")
    b2 = SecureChannel(1, b"other-session!!!", private_key=bytes.fromhex(b.to_state()["sk"]))
    with pytest.raises(ChannelError, match="authentication"):
        b2.open(0, a.public_key, ct, rnd=1, stage="x")


def test_channel_state_roundtrip_keeps_replay_protection_and_nonces():
    a, b = _pair()
    ct = a.seal(1, b.public_key, b"x", rnd=1, stage="x")
    b.open(0, a.public_key, ct, rnd=1, stage="x")
    b = SecureChannel.from_state(b.to_state())
    a = SecureChannel.from_state(a.to_state())
    with pytest.raises(ChannelError, match="replay"):
        b.open(0, a.public_key, ct, rnd=1, stage="x")
    ct2 = a.seal(1, b.public_key, b"y", rnd=1, stage="x")
    assert ct2[:8] != ct[:8]  # counter (and nonce) advanced across the reload
    assert b.open(0, a.public_key, ct2, rnd=1, stage="x") == b"y"


def test_identity_keys_read_as_x25519_keys_agree_on_one_pair_secret():
    # The static masking key of a party is its Ed25519 identity key on the Montgomery
    # curve: its public half follows from the roster's entry alone.
    for _ in range(50):
        a, b = os.urandom(32), os.urandom(32)
        pa = public_bytes(X25519PrivateKey.from_private_bytes(dh_private(a)))
        assert pa == dh_public(public_identity(a))
        assert exchange(dh_private(a), dh_public(public_identity(b))) == exchange(dh_private(b), pa)
    with pytest.raises(IdentityError, match="32 bytes"):
        dh_public(b"short")
    with pytest.raises(IdentityError, match="neutral point"):
        dh_public((1).to_bytes(32, "little"))


def test_prg_deterministic_and_uniform():
    seed = os.urandom(prg.SEED_BYTES)
    a = prg.expand(seed, 100_000, 62)
    assert np.array_equal(a, prg.expand(seed, 100_000, 62))
    assert not np.array_equal(a, prg.expand(os.urandom(prg.SEED_BYTES), 100_000, 62))
    assert a.max() < np.uint64(1 << 62)
    top = (a >> np.uint64(58)).astype(int)  # top 4 bits of the 62-bit ring
    assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > 1e-6
    with pytest.raises(ValueError, match="16 bytes"):
        prg.expand(b"short", 4)
    with pytest.raises(ValueError, match="16 bytes"):
        prg.expand(bytes(32), 4)


def test_prg_matches_reference_aes_ctr():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(16))  # AES-128
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(80)), dtype="<u8")
    assert np.array_equal(prg.expand(seed, 10, 64), ref)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(1, 12), st.data())
def test_shamir_bytes_roundtrip_any_t_subset(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = shamir.share_bytes(secret, xs, t)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct_bytes({x: shares[x] for x in subset}, t) == secret


@settings(max_examples=40, deadline=None)
@given(st.integers(0, shamir.PRIME - 1), st.integers(2, 10), st.data())
def test_shamir_fewer_than_t_refused_and_wrong_t_gives_other_value(secret, n, data):
    t = data.draw(st.integers(2, n))
    shares = shamir.share(secret, list(range(1, n + 1)), t)
    with pytest.raises(shamir.ShamirError, match=f"need {t} shares"):
        shamir.reconstruct(dict(list(shares.items())[: t - 1]), t)
    assert shamir.reconstruct(shares, t) == secret


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.data())
def test_shamir_reconstructs_from_scattered_points_of_a_large_federation(secret, data):
    # Share points are party indices + 1, up to thousands: the Lagrange coefficients'
    # unreduced products and their single batched inversion must still be exact.
    t = data.draw(st.integers(1, 40))
    xs = data.draw(st.lists(st.integers(1, 5000), min_size=t, max_size=t + 8, unique=True))
    shares = shamir.share_bytes(secret, xs, t)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=t, unique=True))
    assert shamir.reconstruct_bytes({x: shares[x] for x in subset}, t) == secret


def test_shamir_t_minus_one_shares_reveal_nothing_about_low_bits():
    # With t - 1 = 1 share of a degree-1 polynomial, the share is uniform whatever
    # the secret: compare share parity for two very different secrets.
    par = [shamir.share(s, [1, 2], 2)[1] & 1 for s in [0] * 400 + [12345] * 400]
    assert 120 < sum(par[:400]) < 280 and 120 < sum(par[400:]) < 280


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.integers(1, 16), st.data())
def test_shamir_points_off_the_polynomial_are_told_from_those_on_it(secret, t, data):
    xs = data.draw(st.lists(st.integers(1, 5000), min_size=t + 4, max_size=t + 4, unique=True))
    shares = shamir.share_bytes(secret, xs, t)
    base = {x: shares[x] for x in xs[:t]}
    others = {x: shares[x] for x in xs[t:]}
    assert shamir.on_polynomial(base, others) == dict.fromkeys(others, True)
    bad = data.draw(st.sampled_from(xs[t:]))
    flipped = bytearray(others[bad])
    flipped[-1] ^= 1
    verdict = shamir.on_polynomial(base, {**others, bad: bytes(flipped)})
    assert verdict == {x: x != bad for x in others}


def test_shamir_bad_arguments():
    with pytest.raises(shamir.ShamirError, match="distinct"):
        shamir.share(1, [1, 1], 1)
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.share(1, [1, 2], 3)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([16, 31, 32, 33, 62, 64]),
    st.integers(0, 3 * prg.CHUNK_BYTES // 8 + 5),
    st.lists(st.sampled_from([1, -1]), min_size=0, max_size=5),
    st.integers(0, 2**32 - 1),
)
def test_accumulate_matches_reference(ring_bits, size, signs, seed):
    # The chunked in-place kernel against one whole expansion per seed, sizes across
    # chunk boundaries, both word types, any mix of signs.
    dt = prg.ring_dtype(ring_bits)
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, 2 ** min(ring_bits, 63), size, dtype=np.uint64).astype(dt)
    seeds = [(rng.bytes(prg.SEED_BYTES), s) for s in signs]
    want = prg.accumulate_reference(acc, seeds, ring_bits)
    got = prg.accumulate(acc.copy(), seeds, ring_bits)
    assert got.dtype == dt and np.array_equal(got, want)
    # base=: the result starts from base, whatever the output buffer held.
    out = np.full(size, 12345, dtype=dt)
    assert np.array_equal(prg.accumulate(out, seeds, ring_bits, base=acc), want)
    assert np.array_equal(out, want)


def test_accumulate_is_the_sum_of_expansions_and_refuses_bad_input():
    seed_a, seed_b = os.urandom(prg.SEED_BYTES), os.urandom(prg.SEED_BYTES)
    a, b = prg.expand(seed_a, 1000, 32), prg.expand(seed_b, 1000, 32)
    assert a.dtype == np.uint32  # a 32-bit ring reads 4 keystream bytes per element
    got = prg.accumulate(np.zeros(1000, np.uint32), [(seed_a, 1), (seed_b, -1)], 32)
    assert np.array_equal(got, a - b)
    with pytest.raises(ValueError, match="uint32"):
        prg.accumulate(np.zeros(10, np.uint64), [(seed_a, 1)], 32)
    with pytest.raises(ValueError, match="signs"):
        prg.accumulate(np.zeros(10, np.uint32), [(seed_a, 2)], 32)


def test_share_records_round_trip_and_refuse_other_arrays():
    from flwr.app import Array, ArrayRecord, RecordDict

    cts = {2: os.urandom(1000), 0: b"", 1: os.urandom(7)}
    rec = wire.pack_shares(cts)
    # Valid .npy bytes: Flower's own decoder reads the ciphertexts back.
    assert rec["2"].numpy().tobytes() == cts[2]
    got = wire.unpack_shares(RecordDict({wire.SHARES: rec}))
    assert {p: bytes(v) for p, v in got.items()} == cts
    bad = ArrayRecord({"1": Array(np.zeros(3, dtype=np.uint32))})
    with pytest.raises(ValueError, match="uint8"):
        wire.unpack_shares(RecordDict({wire.SHARES: bad}))
