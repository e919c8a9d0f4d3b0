"""Additive and masking protocols as pure state machines (no Flower)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from privfl.fixedpoint import FixedPointCodec
from privfl.secagg import (
    AdditiveParty,
    AdditiveServer,
    ChannelError,
    MaskingError,
    MaskingParty,
    MaskingServer,
    RoundAbortedError,
    neighbourhoods,
)
from privfl.secagg.masking import fresh_static_key, neighbours_of

CODEC = FixedPointCodec(clip_range=4.0, frac_bits=20, ring_bits=62)
SESSION = b"session-0123456789"


def _inputs(n, dim, seed=0, extreme=False):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(0, 1, dim) for _ in range(n)]
    if extreme:
        for x in xs:
            x[:4] = [4.0, -4.0, 1e9, -1e9]
    ws = rng.integers(1, 600, n).astype(float)
    return xs, ws


def _sum_ring(vectors):
    acc = None
    for v in vectors:
        acc = v.copy() if acc is None else CODEC.add(acc, v)
    return acc


def _plain(xs, ws):
    return sum(w * np.clip(x, -4, 4) for x, w in zip(xs, ws, strict=True))


# ----------------------------------------------------------------------- additive


def _additive_round(parties, enc, rnd=1, attempt=0, drop_share=(), drop_sum=(), codec=CODEC):
    ids = sorted(parties)
    directory = {p: parties[p].public_key for p in ids}
    server = AdditiveServer(codec)
    shares = {
        p: parties[p].share(enc[p], rnd=rnd, attempt=attempt, parties=ids, directory=directory)
        for p in ids
        if p not in drop_share
    }
    routed = server.route(shares, ids)
    dim = enc[ids[0]].size
    partials = {
        p: parties[p].partial_sum(
            routed[p], rnd=rnd, attempt=attempt, parties=ids, directory=directory, dim=dim
        )
        for p in ids
        if p not in drop_sum
    }
    return server.combine(partials, ids, dim), partials


@pytest.mark.parametrize("n", [2, 3, 10, 50])
def test_additive_sum_matches_plain(n):
    dim = 64 if n == 50 else 500
    xs, ws = _inputs(n, dim, seed=n, extreme=True)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties = {i: AdditiveParty(i, CODEC, SESSION) for i in range(n)}
    total, _ = _additive_round(parties, enc)
    assert np.max(np.abs(CODEC.decode(total) - _plain(xs, ws))) < n * 2.0**-20 * 1.001


@pytest.mark.parametrize("stage", ["share", "sum"])
def test_additive_drop_aborts_then_retry_without_it_is_exact(stage):
    n, dim = 5, 200
    xs, ws = _inputs(n, dim, seed=3)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties = {i: AdditiveParty(i, CODEC, SESSION) for i in range(n)}
    kw = {"drop_share": {2}} if stage == "share" else {"drop_sum": {2}}
    with pytest.raises(RoundAbortedError, match=r"parties \[2\]") as info:
        _additive_round(parties, enc, **kw)
    assert info.value.missing == {2}
    survivors = {i: p for i, p in parties.items() if i != 2}
    total, _ = _additive_round(survivors, enc, attempt=1)
    want = _plain([xs[i] for i in survivors], [ws[i] for i in survivors])
    assert np.max(np.abs(CODEC.decode(total) - want)) < n * 2.0**-20


def test_additive_recipient_detects_tampered_and_replayed_share():
    n, dim = 3, 16
    parties = {i: AdditiveParty(i, CODEC, SESSION) for i in range(n)}
    directory = {p: parties[p].public_key for p in parties}
    enc = {i: CODEC.encode(np.ones(dim), parties=n) for i in range(n)}
    shares = {
        p: parties[p].share(enc[p], rnd=1, attempt=0, parties=[0, 1, 2], directory=directory)
        for p in parties
    }
    routed = AdditiveServer(CODEC).route(shares, [0, 1, 2])
    bad = dict(routed[1])
    bad[0] = bad[0][:-1] + bytes([bad[0][-1] ^ 0x80])
    with pytest.raises(ChannelError, match=r"party 1: ciphertext from party 0.*authentication"):
        parties[1].partial_sum(
            bad, rnd=1, attempt=0, parties=[0, 1, 2], directory=directory, dim=dim
        )
    # Replay: round 1's share served again in round 2 is refused.
    parties[0].share(enc[0], rnd=2, attempt=0, parties=[0, 1, 2], directory=directory)
    parties[1].share(enc[1], rnd=2, attempt=0, parties=[0, 1, 2], directory=directory)
    parties[2].share(enc[2], rnd=2, attempt=0, parties=[0, 1, 2], directory=directory)
    with pytest.raises(ChannelError, match="authentication"):
        parties[2].partial_sum(
            routed[2], rnd=2, attempt=0, parties=[0, 1, 2], directory=directory, dim=dim
        )


def test_additive_state_roundtrip():
    p = AdditiveParty(0, CODEC, SESSION)
    q = AdditiveParty(1, CODEC, SESSION)
    directory = {0: p.public_key, 1: q.public_key}
    x0, x1 = CODEC.encode(np.ones(8), parties=2), CODEC.encode(np.full(8, 2.0), parties=2)
    s0 = p.share(x0, rnd=1, attempt=0, parties=[0, 1], directory=directory)
    s1 = q.share(x1, rnd=1, attempt=0, parties=[0, 1], directory=directory)
    p = AdditiveParty.from_state(p.to_state(), CODEC)
    q = AdditiveParty.from_state(q.to_state(), CODEC)
    a = p.partial_sum({1: s1[0]}, rnd=1, attempt=0, parties=[0, 1], directory=directory, dim=8)
    b = q.partial_sum({0: s0[1]}, rnd=1, attempt=0, parties=[0, 1], directory=directory, dim=8)
    assert np.allclose(CODEC.decode(CODEC.add(a, b)), 3.0)


# ----------------------------------------------------------------------- masking


class _Party:
    """A MaskingParty with its round's graph (parties, static keys, k, t) filled in."""

    def __init__(self, party, graph):
        self.p, self.graph = party, graph

    def mask(self, enc, *, rnd, **kw):
        return self.p.mask(enc, rnd=rnd, **self.graph, **kw)

    def __getattr__(self, name):
        return getattr(self.p, name)


def _masking_setup(n, threshold=0, k=0, codec=CODEC):
    ids = list(range(n))
    raw = {i: MaskingParty(i, codec, SESSION, fresh_static_key()) for i in ids}
    graph = {
        "parties": ids,
        "keys": {i: p.public_key for i, p in raw.items()},
        "neighbours": k,
        "threshold": threshold,
    }
    server = MaskingServer(codec, SESSION, ids, threshold=threshold, neighbours=k)
    return {i: _Party(p, graph) for i, p in raw.items()}, server


def _masking_round(parties, server, enc, rnd=1, drop_input=(), drop_unmask=(), overwrite=False):
    ids = sorted(parties)
    masked, bsh = {}, {}
    for i in ids:
        if i in drop_input:
            continue
        masked[i], bsh[i] = parties[i].mask(enc[i], rnd=rnd, overwrite=overwrite)
    S, D, routed = server.plan_unmask(masked, bsh)
    reveals = {
        i: parties[i].unmask(rnd=rnd, survivors=S, dropped=D, incoming=routed[i])
        for i in S
        if i not in drop_unmask
    }
    return server.unmask(rnd, masked, S, D, reveals), S, masked


@pytest.mark.parametrize(("n", "k"), [(2, 0), (3, 0), (10, 0), (10, 4), (50, 8)])
def test_masking_sum_matches_plain(n, k):
    dim = 64 if n == 50 else 400
    xs, ws = _inputs(n, dim, seed=n, extreme=True)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n, k=k)
    total, S, _ = _masking_round(parties, server, enc)
    assert list(range(n)) == S
    assert np.max(np.abs(CODEC.decode(total) - _plain(xs, ws))) < n * 2.0**-20 * 1.001


def test_masking_in_place_masks_the_callers_vector_and_sums_alike():
    n, dim = 4, 300
    xs, ws = _inputs(n, dim, seed=11)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    plain = {i: e.copy() for i, e in enc.items()}
    parties, server = _masking_setup(n)
    total, _, masked = _masking_round(parties, server, enc, overwrite=True)
    assert all(masked[i] is enc[i] for i in range(n))  # no second vector
    assert not any(np.array_equal(enc[i], plain[i]) for i in range(n))
    want = CODEC.decode(_sum_ring(plain.values()))
    assert np.array_equal(CODEC.decode(total), want)


def test_masking_survives_drops_before_and_after_the_masked_input():
    n, t, dim = 7, 4, 300
    xs, ws = _inputs(n, dim, seed=1)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n, threshold=t)
    # Three drop before sending input (n - t): the survivors reveal their round seeds with
    # them, and only those.
    total, S, _ = _masking_round(parties, server, enc, drop_input={1, 5, 6})
    assert S == [0, 2, 3, 4]
    want = _plain([xs[i] for i in S], [ws[i] for i in S])
    assert np.max(np.abs(CODEC.decode(total) - want)) < n * 2.0**-20
    # Next round, same static keys, no re-keying: 1 and 5 are back, 6 is still away.
    total2, S2, _ = _masking_round(parties, server, enc, rnd=2, drop_input={6})
    want2 = _plain([xs[i] for i in S2], [ws[i] for i in S2])
    assert S2 == [0, 1, 2, 3, 4, 5]
    assert np.max(np.abs(CODEC.decode(total2) - want2)) < n * 2.0**-20
    # Three send their input and then fall silent: their self masks come from t shares.
    total3, S3, _ = _masking_round(parties, server, enc, rnd=3, drop_unmask={0, 2, 4})
    assert list(range(n)) == S3
    assert np.max(np.abs(CODEC.decode(total3) - _plain(xs, ws))) < n * 2.0**-20


def test_masking_fails_loudly_when_a_dropped_partys_seed_died_with_its_neighbour():
    # Party 1 never sent input; survivor 3 then fell silent before revealing its round seed
    # with 1, which no one else holds: no wrong sum, an error that names both.
    n, dim = 7, 40
    xs, ws = _inputs(n, dim, seed=2)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n, threshold=4)
    with pytest.raises(MaskingError, match=r"party 3 did not answer.*dropped party 1"):
        _masking_round(parties, server, enc, drop_input={1}, drop_unmask={3})


def test_revealed_round_seeds_serve_their_round_only():
    parties, server = _masking_setup(4, threshold=3)
    enc = CODEC.encode(np.zeros(16), parties=4)
    masked, bsh = {}, {}
    for i in (0, 1, 3):
        masked[i], bsh[i] = parties[i].mask(enc, rnd=1)
    S, D, routed = server.plan_unmask(masked, bsh)
    assert (S, D) == ([0, 1, 3], [2])
    rv = parties[0].unmask(rnd=1, survivors=S, dropped=D, incoming=routed[0])
    assert set(rv["seed"]) == {2} and set(rv["b"]) == {0, 1, 3}  # a seed or a share, never both
    keys = parties[0].graph["keys"]
    (_, (seed_r1, _)) = parties[0].mask_seeds(1, {2: keys[2]}, b"")
    (_, (seed_r2, _)) = parties[0].mask_seeds(2, {2: keys[2]}, b"")
    assert rv["seed"][2] == seed_r1 != seed_r2
    # Party 2 derives the same seed from its side of the pair.
    assert parties[2].mask_seeds(1, {0: keys[0]}, b"")[1] == (seed_r1, -1)


def test_masking_party_masks_a_round_once_unless_it_trusts_the_server():
    parties, _ = _masking_setup(3)
    enc = CODEC.encode(np.zeros(8), parties=3)
    parties[0].mask(enc, rnd=4)
    for rnd in (4, 3):
        with pytest.raises(MaskingError, match=rf"already masked round 4; refusing round {rnd}"):
            parties[0].mask(enc, rnd=rnd)
    trusting = MaskingParty(0, CODEC, SESSION, fresh_static_key(), repeat_rounds=True)
    trusting.mask(enc, rnd=4, **parties[0].graph)
    trusting.mask(enc, rnd=4, **parties[0].graph)


def test_masking_party_state_roundtrip_mid_round():
    n, dim = 4, 30
    xs, ws = _inputs(n, dim, seed=4)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n)
    masked, bsh = {}, {}
    for i in range(n):
        masked[i], bsh[i] = parties[i].mask(enc[i], rnd=1)
    for i in range(n):  # every party restored from its JSON state between the stages
        restored = MaskingParty.from_state(json.loads(json.dumps(parties[i].to_state())), CODEC)
        parties[i] = _Party(restored, parties[i].graph)
    S, D, routed = server.plan_unmask(masked, bsh)
    reveals = {i: parties[i].unmask(rnd=1, survivors=S, dropped=D, incoming=routed[i]) for i in S}
    total = server.unmask(1, masked, S, D, reveals)
    assert np.max(np.abs(CODEC.decode(total) - _plain(xs, ws))) < n * 2.0**-20
    with pytest.raises(MaskingError, match="already masked round 1"):
        parties[0].mask(enc[0], rnd=1)


def test_masking_party_needs_every_neighbours_key():
    parties, _ = _masking_setup(4, k=2)
    graph = parties[0].graph
    keys = {j: v for j, v in graph["keys"].items() if j != 3}
    with pytest.raises(MaskingError, match=r"no static key for neighbours \[3\]"):
        parties[0].p.mask(CODEC.encode(np.zeros(4), parties=4), rnd=1, **{**graph, "keys": keys})


def test_masking_refuses_below_threshold():
    n, t, dim = 6, 4, 50
    xs, ws = _inputs(n, dim)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n, threshold=t)
    with pytest.raises(MaskingError, match=r"only 3 parties sent masked input.*threshold is 4"):
        _masking_round(parties, server, enc, drop_input={0, 1, 2})
    parties, server = _masking_setup(n, threshold=t)
    with pytest.raises(MaskingError, match=r"only 3 parties answered the unmask.*threshold 4"):
        _masking_round(parties, server, enc, rnd=1, drop_unmask={0, 1, 2})


def test_masking_party_refuses_to_unmask_small_survivor_set():
    parties, _ = _masking_setup(5, threshold=4)
    enc = CODEC.encode(np.zeros(8), parties=5)
    parties[0].mask(enc, rnd=1)
    with pytest.raises(MaskingError, match=r"party 0: only 3 of my neighbourhood.*refusing"):
        parties[0].unmask(rnd=1, survivors=[0, 1, 2], dropped=[3, 4], incoming={})


def test_masking_detects_corrupted_share():
    n, dim = 5, 20
    xs, ws = _inputs(n, dim)
    enc = {i: CODEC.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    parties, server = _masking_setup(n, threshold=3)
    masked, bsh = {}, {}
    for i in range(n):
        masked[i], bsh[i] = parties[i].mask(enc[i], rnd=1)
    S, D, routed = server.plan_unmask(masked, bsh)
    reveals = {i: parties[i].unmask(rnd=1, survivors=S, dropped=D, incoming=routed[i]) for i in S}
    reveals[4]["b"][0] = bytes(len(reveals[4]["b"][0]) - 1) + b"\x01"
    with pytest.raises(
        MaskingError, match=r"(inconsistent|bad) shares of the self-mask seed of party 0"
    ):
        server.unmask(1, masked, S, D, reveals)


def test_neighbour_graph_is_k_regular_and_symmetric():
    g = neighbourhoods(list(range(11)), 4)
    assert all(len(v) == 4 for v in g.values())
    assert all(i in g[j] for i in g for j in g[i])
    with pytest.raises(ValueError, match="even"):
        neighbourhoods(list(range(11)), 3)


# -------------------------------------------------- what the server sees is uniform


def _uniform_and_uncorrelated(view, x_signed):
    top = (view >> np.uint64(CODEC.ring_bits - 4)).astype(int)
    p_uniform = stats.chisquare(np.bincount(top, minlength=16)).pvalue
    r = np.corrcoef(CODEC.to_signed(view).astype(float), x_signed.astype(float))[0, 1]
    return p_uniform, abs(r)


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_server_view_uniform_and_uncorrelated(protocol):
    n, dim = 3, 40_000
    rng = np.random.default_rng(11)
    xs = [rng.normal(0, 1, dim) for _ in range(n)]
    enc = {i: CODEC.encode(xs[i], parties=n) for i in range(n)}
    if protocol == "additive":
        parties = {i: AdditiveParty(i, CODEC, SESSION) for i in range(n)}
        _, views = _additive_round(parties, enc)
    else:
        parties, server = _masking_setup(n)
        _, _, views = _masking_round(parties, server, enc)
    bound = 5 / np.sqrt(dim)
    for i in range(n):
        p, r = _uniform_and_uncorrelated(views[i], CODEC.to_signed(enc[i]))
        assert p > 1e-6, (i, p)
        assert r < bound, (i, r)
    # The same test rejects an unprotected update: it has power.
    p, r = _uniform_and_uncorrelated(enc[0], CODEC.to_signed(enc[0]))
    assert p < 1e-6 and r > 0.99


# ------------------------------------------------ 32-bit ring: uint32 words end to end


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_32_bit_ring_sums_in_uint32_words(protocol):
    codec = FixedPointCodec(clip_range=4.0, frac_bits=12, ring_bits=32)
    n, dim = 7, 3000
    xs, ws = _inputs(n, dim, seed=5, extreme=True)
    enc = {i: codec.encode(xs[i], weight=ws[i], parties=n) for i in range(n)}
    assert all(e.dtype == np.uint32 for e in enc.values())
    if protocol == "additive":
        parties = {i: AdditiveParty(i, codec, SESSION) for i in range(n)}
        total, views = _additive_round(parties, enc, codec=codec)
        views = list(views.values())
    else:
        parties, server = _masking_setup(n, k=4, codec=codec)
        total, _, masked = _masking_round(parties, server, enc, drop_input=(3,))
        views = list(masked.values())
        ws = np.array([w if i != 3 else 0.0 for i, w in enumerate(ws)])
    assert total.dtype == np.uint32 and all(v.dtype == np.uint32 for v in views)
    assert np.max(np.abs(codec.decode(total) - _plain(xs, ws))) < n * 2.0**-12
    with pytest.raises((ValueError, MaskingError), match="uint32"):
        parties[0].mask(enc[0].astype(np.uint64), rnd=9) if protocol == "masking" else parties[
            0
        ].share(enc[0].astype(np.uint64), rnd=9, attempt=0, parties=[0, 1], directory={1: b""})


@pytest.mark.parametrize(("n", "k"), [(2, 0), (5, 0), (7, 2), (10, 4), (30, 16), (31, 30)])
def test_one_partys_neighbours_are_its_row_of_the_graph(n, k):
    parties = [3 * i + 1 for i in range(n)][::-1]  # unsorted, not 0..n-1
    graph = neighbourhoods(parties, k)
    assert all(neighbours_of(parties, k, p) == graph[p] for p in parties)
    with pytest.raises(ValueError, match="not among the parties"):
        neighbours_of(parties, k, 0)
