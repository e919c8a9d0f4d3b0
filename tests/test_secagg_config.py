"""Secure-aggregation settings are rejected up front, naming the key; the bench CLI."""

from __future__ import annotations

import pytest

from privfl.config import Scenario, ScenarioError
from privfl.fixedpoint import FixedPointCodec
from privfl.secagg.masking import MaskingServer, neighbourhoods


def _sc(protocol="masking", parties=5, dp=None, data=None, **secagg):
    raw = {
        "data": {"parties": parties, **(data or {})},
        "defense": {"secure_aggregation": protocol, "secagg": secagg},
    }
    if dp:
        raw["defense"]["dp"] = dp
    return Scenario.from_dict(raw)


@pytest.mark.parametrize(
    ("parties", "secagg", "match"),
    [
        (5, {"neighbours": 3}, r"defense\.secagg\.neighbours: must be even"),
        (5, {"neighbours": 6}, r"defense\.secagg\.neighbours: must be < data\.parties \(5\)"),
        (3, {"neighbours": 4}, r"defense\.secagg\.neighbours: must be < data\.parties \(3\)"),
        (7, {"neighbours": 4, "threshold": 6}, r"defense\.secagg\.threshold: .*size 5"),
        (4, {"threshold": 5}, r"defense\.secagg\.threshold: .*size 4"),
        (5, {"ring_bits": 24, "frac_bits": 20}, r"defense\.secagg\.ring_bits: .*>= 26"),
        (
            3,
            {"ring_bits": 24, "frac_bits": 23},
            r"defense\.secagg\.frac_bits: must be <= ring_bits - 2 = 22",
        ),
    ],
)
def test_bad_secagg_settings_name_the_key(parties, secagg, match):
    with pytest.raises(ScenarioError, match=match):
        _sc(parties=parties, **secagg)


def test_headroom_uses_the_weights_the_parties_will_use():
    # Weighted by examples (<= samples_per_party) unless DP fixes the weight to 1.
    with pytest.raises(ScenarioError, match=r"ring_bits: 32 bits .* weight 2000"):
        _sc("additive", 3, data={"samples_per_party": 2000}, ring_bits=32)
    _sc("additive", 3, data={"samples_per_party": 2000}, ring_bits=32, frac_bits=12)
    dp = {"mode": "global", "noise_multiplier": 1.0}
    _sc("additive", 3, dp=dp, data={"samples_per_party": 2000}, ring_bits=32)
    # Additive ignores the masking graph; "none" ignores every secagg key but the ring's.
    _sc("additive", 5, neighbours=8, threshold=9)
    _sc("none", 1, threshold=9)


def test_accepted_settings_build_the_graph_they_describe():
    for parties, k, t in [(5, 4, 5), (7, 4, 5), (10, 2, 3), (3, 0, 3), (6, 0, 0)]:
        sc = _sc(parties=parties, neighbours=k, threshold=t)
        sec = sc.defense.secagg
        graph = neighbourhoods(list(range(parties)), k)
        m = sec.neighbourhood_size(parties)
        assert all(len(v) + 1 == m for v in graph.values())
        codec = FixedPointCodec.from_section(sec)
        server = MaskingServer(codec, b"s", list(range(parties)), threshold=t, neighbours=k)
        assert 1 <= server.threshold <= m


def test_bench_help_through_the_cli(capsys):
    from privfl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "secagg", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "privfl bench secagg" in out and "--no-scenario" in out and "--set" in out


@pytest.mark.parametrize(
    ("parties", "data", "dp", "want"),
    [
        (3, {}, {"mode": "global", "noise_multiplier": 1.0}, 32),  # unit weights
        (3, {"samples_per_party": 100}, None, 32),
        (3, {"samples_per_party": 2000}, None, 62),  # 3 x 4 x 2000 x 2^20 > 2^31
        (3, {}, None, 62),  # weights (examples) unknown up front
        (3, {}, {"mode": "distributed", "noise_multiplier": 1.0}, 32),  # noise fits
        (600, {}, {"mode": "distributed", "noise_multiplier": 1.0}, 62),  # too many parties
        (3, {}, {"mode": "distributed", "noise_multiplier": 1e4}, 62),  # noise headroom
        (600, {}, {"mode": "global", "noise_multiplier": 1.0}, 62),  # too many parties
    ],
)
def test_automatic_ring_is_the_smallest_with_headroom(parties, data, dp, want):
    sc = _sc("additive", parties, dp=dp, data=data)
    sec = sc.defense.secagg
    assert sec.ring_bits == want
    assert FixedPointCodec.from_section(sec).ring_bits == want
    # The JSON the parties receive carries the chosen ring.
    assert Scenario.from_json(sc.to_json()).defense.secagg.ring_bits == want
    if want == 32:  # the choice passes the check an explicit 32 would get
        _sc("additive", parties, dp=dp, data=data, ring_bits=32)


def test_explicit_ring_is_kept_and_checked():
    assert _sc("additive", 3, ring_bits=48).defense.secagg.ring_bits == 48
    assert (
        _sc("additive", 3, data={"samples_per_party": 100}, ring_bits=62).defense.secagg.ring_bits
        == 62
    )
    with pytest.raises(
        ScenarioError, match=r"defense\.secagg\.ring_bits: must be in \[16, 64\] or 0"
    ):
        _sc("additive", 3, ring_bits=70)
    with pytest.raises(ScenarioError, match=r"defense\.secagg\.ring_bits: 32 bits"):
        _sc("additive", 3, data={"samples_per_party": 2000}, ring_bits=32)
