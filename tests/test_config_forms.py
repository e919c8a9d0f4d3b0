"""The scenario's plain forms (computed once per instance) and the one headroom bound."""

import json
import pickle

import pytest

import privfl.config
from privfl.config import (
    DefenseSection,
    Scenario,
    ScenarioError,
    SecAggSection,
    has_headroom,
    load_scenario,
    resolve_scenario_path,
    ring_units_needed,
)
from privfl.config.codec import _to_plain
from privfl.fixedpoint import EncodingError, FixedPointCodec


def _scenario() -> Scenario:
    return load_scenario(resolve_scenario_path("three_hospitals"))


def test_every_public_name_is_exported():
    for name in privfl.config.__all__:
        assert getattr(privfl.config, name) is not None, name


def test_plain_forms_match_a_fresh_conversion():
    sc = _scenario()
    for _ in range(2):  # the second call reads the kept forms
        assert sc.to_dict() == _to_plain(sc)
        assert list(sc.to_dict()) == list(_to_plain(sc))  # field order, as results.json
        assert sc.to_json() == json.dumps(_to_plain(sc), sort_keys=True)


def test_to_dict_hands_out_a_copy():
    sc = _scenario()
    text = sc.to_json()
    raw = sc.to_dict()
    raw["data"]["parties"] = 99
    raw["attack"]["membership"]["attacks"].append("x")
    raw["strategy"]["extra"] = 1
    assert sc.to_dict()["data"]["parties"] == 3
    assert "x" not in sc.to_dict()["attack"]["membership"]["attacks"]
    assert "extra" not in sc.to_dict()["strategy"]
    assert sc.to_json() == text


def test_replace_leaves_the_original_forms_alone():
    sc = _scenario()
    text = sc.to_json()
    other = sc.replace(["data.parties=5"])
    assert other.data.parties == 5
    assert json.loads(other.to_json())["data"]["parties"] == 5
    assert sc.to_json() == text and sc.data.parties == 3


def test_validation_refreshes_forms_taken_before_it():
    sc = Scenario.from_dict({"defense": {"secure_aggregation": "additive"}})
    bare = Scenario(defense=DefenseSection(secure_aggregation="additive"))
    assert json.loads(bare.to_json())["defense"]["secagg"]["ring_bits"] == 0
    bare.validate()  # fixes the automatic ring
    assert json.loads(bare.to_json())["defense"]["secagg"]["ring_bits"] == 62
    assert bare.to_json() == sc.to_json()


def test_kept_forms_change_neither_equality_hash_nor_pickle():
    a, b = _scenario(), _scenario()
    a.to_json()
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c.to_json() == a.to_json()
    assert Scenario.from_json(a.to_json()) == a


@pytest.mark.parametrize(("frac_bits", "ring_bits"), [(20, 32), (20, 48), (16, 40)])
def test_headroom_bound_is_tight(frac_bits: int, ring_bits: int):
    # parties * (max_abs * 2^f + 1) = 2^(k-1) exactly: no headroom; one unit less fits
    # (rings below 2^53 per party, where one unit is a representable step).
    parties = 4
    limit = 2.0 ** (ring_bits - 1)
    at = (limit / parties - 1.0) / 2.0**frac_bits
    assert ring_units_needed(parties, at, frac_bits) == limit
    assert not has_headroom(parties, at, frac_bits, ring_bits)
    below = (limit / parties - 2.0) / 2.0**frac_bits
    assert has_headroom(parties, below, frac_bits, ring_bits)


@pytest.mark.parametrize("max_abs", [0.5, 4.0, 2000.0, 4.0 * 3000])
def test_scenario_check_and_codec_agree_with_the_bound(max_abs: float):
    parties, frac_bits, ring_bits = 1000, 20, 32
    fits = has_headroom(parties, max_abs, frac_bits, ring_bits)
    codec = FixedPointCodec(clip_range=4.0, frac_bits=frac_bits, ring_bits=ring_bits)
    sec = SecAggSection(clip_range=max_abs, frac_bits=frac_bits, ring_bits=ring_bits)
    if fits:
        codec.check_headroom(parties, max_abs)
        sec.check_headroom("defense.secagg", parties=parties, max_weight=1.0)
    else:
        with pytest.raises(EncodingError, match="no headroom"):
            codec.check_headroom(parties, max_abs)
        with pytest.raises(ScenarioError, match=r"defense\.secagg\.ring_bits"):
            sec.check_headroom("defense.secagg", parties=parties, max_weight=1.0)


def test_automatic_ring_takes_32_bits_only_with_headroom():
    def ring(spp: int) -> int:
        raw = {
            "data": {"parties": 3, "samples_per_party": spp},
            "defense": {"secure_aggregation": "additive"},
        }
        return Scenario.from_dict(raw).defense.secagg.ring_bits

    # 3 * (4 * w * 2^20 + 1) < 2^31 holds for w = 100 and fails for w = 200.
    assert has_headroom(3, 4.0 * 100, 20, 32) and not has_headroom(3, 4.0 * 200, 20, 32)
    assert ring(100) == 32
    assert ring(200) == 62
