"""Cross-device rounds: parties sampled per round, simulated dropouts, secure aggregation
among the sampled parties only (through privfl's own ClientApp, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from privfl.architecture import build_model
from privfl.clients.app import make_client_app
from privfl.clients.policy import drops_out, simulation_policy, simulation_roster
from privfl.config import SCENARIO_KEY, Scenario, ScenarioError
from privfl.data import load_federation
from privfl.dp import accounted_sampling_rate
from privfl.flower import wire
from privfl.flower.loopback import LoopbackGrid
from privfl.flower.transcript import RecordingGrid, Transcript
from privfl.strategies.factory import build_strategy
from privfl.strategies.rounds import sample_parties
from privfl.strategies.secure_aggregation import SecureAggregation

SECRET = bytes(range(32))
PARTIES, PER_ROUND = 12, 8


def _scenario(protocol="masking", **scenario) -> Scenario:
    raw = {
        "scenario": {"rounds": 2, "seed": 5, "parties_per_round": PER_ROUND, **scenario},
        "data": {"parties": PARTIES, "samples_per_party": 16, "server_test_samples": 50},
        "model": {"name": "mlp", "hidden": 16},
        "training": {"local_steps": 1, "batch_size": 8, "lr": 0.1},
        "defense": {"secure_aggregation": protocol},
    }
    return Scenario.from_dict(raw)


def _nodes() -> dict[int, int]:
    return {100 + p: p for p in range(PARTIES)}


def _run(sc: Scenario, roster=None):
    grid = LoopbackGrid(make_client_app(sc, secret=SECRET), _nodes())
    # What the server received, by party, as a curious server's recorder sees it.
    recording = RecordingGrid(grid, Transcript(_nodes(), copy=False))
    grid.transcript = recording.transcript
    strat = build_strategy(sc, _nodes(), roster=roster)
    fed = load_federation(sc)
    start = ArrayRecord(build_model(sc, fed.num_classes).state_dict())
    cfg = ConfigRecord({SCENARIO_KEY: sc.to_json()})
    res = strat.start(
        recording, start, num_rounds=sc.scenario.rounds, train_config=cfg, evaluate_config=cfg
    )
    return strat, res, grid


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().ravel().astype(np.float64) for a in arrays.values()])


def _dropped(sc: Scenario, rnd: int) -> list[int]:
    sampled = sample_parties(range(PARTIES), PER_ROUND, seed=sc.scenario.seed, server_round=rnd)
    return [p for p in sampled if drops_out(sc, p, rnd)]


def test_sample_is_reproducible_and_changes_with_the_round():
    a = sample_parties(range(1000), 100, seed=0, server_round=1)
    assert a == sample_parties(range(1000), 100, seed=0, server_round=1)
    assert len(a) == len(set(a)) == 100 and a == sorted(a)
    assert a != sample_parties(range(1000), 100, seed=0, server_round=2)
    assert a != sample_parties(range(1000), 100, seed=1, server_round=1)
    assert sample_parties(range(5), 0, seed=0, server_round=1) == [0, 1, 2, 3, 4]


def test_scenario_keys_are_checked_against_the_rest():
    with pytest.raises(ScenarioError, match="scenario.parties_per_round"):
        _scenario(parties_per_round=PARTIES + 1)
    with pytest.raises(ScenarioError, match="defense.dp.party_sampling_rate"):
        _scenario().replace(
            [
                "defense.dp.mode='global'",
                "defense.dp.epsilon=3.0",
                "defense.dp.party_sampling_rate=0.5",
            ]
        )
    with pytest.raises(ScenarioError, match="scenario.dropout_stage.*'unmask'.*additive"):
        _scenario("additive", dropout_rate=0.1, dropout_stage="unmask")
    with pytest.raises(ScenarioError, match="party.min_parties"):
        _scenario().replace(["party.min_parties=9"])


def test_no_amplification_is_credited_for_the_servers_sample():
    sc = _scenario().replace(["defense.dp.mode='distributed'", "defense.dp.epsilon=3.0"])
    assert accounted_sampling_rate(sc) == 1.0


def test_min_parties_is_sized_for_the_parties_of_a_round():
    assert simulation_policy(_scenario(), 0, SECRET).min_parties == 6  # floor(2*8/3) + 1
    whole = _scenario(parties_per_round=0)
    assert simulation_policy(whole, 0, SECRET).min_parties == 9  # floor(2*12/3) + 1


@pytest.mark.parametrize("protocol", ["masking", "additive"])
def test_only_the_sampled_parties_train_and_the_sum_is_theirs(protocol):
    sc = _scenario(protocol)
    strat, res, grid = _run(sc)
    _, plain, _ = _run(sc.replace(["defense.secure_aggregation='none'"]))
    assert isinstance(strat, SecureAggregation)
    met: set[int] = set()
    for rnd in (1, 2):
        want = sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=rnd)
        # Every stage of the protocol went to this round's sample and no one else; masking
        # registers a party's static key once, the first time it is sampled.
        last = wire.UNMASK if protocol == "masking" else wire.PARTIAL_SUM
        for stage in ("train", wire.SETUP, last):
            exchanges = grid.transcript.exchanges(rnd, stage)
            asked = set(want) - met if stage == wire.SETUP and protocol == "masking" else set(want)
            assert {p for ex in exchanges[:1] for p in ex.received} == asked, stage
        met |= set(want)
    assert strat.included[2] == sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=2)
    assert not strat.faults
    # The secure sum of the sampled parties is the plain mean of the same parties,
    # up to the fixed-point quantisation.
    np.testing.assert_allclose(_flat(res.arrays), _flat(plain.arrays), atol=1e-4)


@pytest.mark.parametrize("stage", ["unmask", "train"])
def test_a_server_holding_the_public_roster_skips_key_registration(stage):
    """The parties on the roster mask with the keys it gives: no setup message in any
    round, the same sum bit for bit as after registration, dropouts included."""
    sc = _scenario(dropout_rate=0.1, dropout_stage=stage)
    roster = simulation_roster(PARTIES, SECRET)
    strat, res, grid = _run(sc, roster=roster)
    registered, res_reg, grid_reg = _run(sc)
    assert grid_reg.transcript.exchanges(1, wire.SETUP)
    for rnd in (1, 2):
        assert not grid.transcript.exchanges(rnd, wire.SETUP)
        assert strat.round_trips[rnd] == 2  # train, unmask
    assert strat.included == registered.included

    def faults(s):  # in the order the replies came
        return {r: sorted(f, key=lambda x: (x["party"], x["stage"])) for r, f in s.faults.items()}

    assert faults(strat) == faults(registered)
    assert np.array_equal(_flat(res.arrays), _flat(res_reg.arrays))
    # Parties off the server's roster still register, and only they.
    part = {p: k for p, k in roster.items() if p % 2 == 0}
    _, _, grid_part = _run(sc, roster=part)
    asked = {p for ex in grid_part.transcript.exchanges(1, wire.SETUP) for p in ex.received}
    want = sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=1)
    assert asked == {p for p in want if p % 2}


def test_a_party_never_asked_to_register_still_checks_its_dp_policy_first():
    """Set up at its first train message, a party runs the check registration runs: here
    its noise would be too coarse for the ring, and nothing is released."""
    sc = _scenario(rounds=1).replace(
        [
            "defense.dp.mode='distributed'",
            "defense.dp.noise_multiplier=1.0",
            "defense.secagg.frac_bits=2",
        ]
    )
    strat, _, grid = _run(sc, roster=simulation_roster(PARTIES, SECRET))
    assert not grid.transcript.exchanges(1, wire.SETUP)
    want = sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=1)
    failed = {f["party"] for f in strat.faults[1] if "defense.secagg.frac_bits" in f["reason"]}
    assert failed == set(want)
    assert strat.included == {1: []}


def test_a_forged_public_roster_is_refused_by_the_parties_holding_the_real_one():
    sc = _scenario(rounds=1)
    roster = dict(simulation_roster(PARTIES, SECRET))
    want = sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=1)
    victim = want[0]
    roster[victim] = simulation_roster(PARTIES, bytes(32))[victim]  # the server's own key
    strat, _, _ = _run(sc, roster=roster)
    reasons = [f["reason"] for f in strat.faults[1]]
    assert any("forged or altered key directory" in r for r in reasons), reasons
    assert any("another static key for me" in r for r in reasons), reasons
    assert strat.included == {1: []}


def test_masking_recovers_the_sum_when_parties_drop_after_sending_masked_inputs():
    sc = _scenario(dropout_rate=0.1, dropout_stage="unmask")
    assert any(_dropped(sc, r) for r in (1, 2)), "seed chosen so that someone drops"
    strat, res, _ = _run(sc)
    _, plain, _ = _run(sc.replace(["defense.secure_aggregation='none'", "scenario.dropout_rate=0"]))
    dropped_faults = [f for r in strat.faults.values() for f in r if f["stage"] == "unmask"]
    assert {f["party"] for f in dropped_faults} == {p for r in (1, 2) for p in _dropped(sc, r)}
    # Their masked inputs arrived: the sum still holds every sampled party.
    assert strat.included[2] == sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=2)
    np.testing.assert_allclose(_flat(res.arrays), _flat(plain.arrays), atol=1e-4)


@pytest.mark.parametrize("protocol", ["masking", "additive"])
def test_dropouts_before_the_inputs_leave_the_sum_of_the_survivors(protocol):
    sc = _scenario(protocol, dropout_rate=0.1, dropout_stage="train")
    assert all(_dropped(sc, r) for r in (1, 2)), "seed chosen so that someone drops"
    strat, res, _ = _run(sc)
    _, plain, _ = _run(sc.replace(["defense.secure_aggregation='none'"]))
    survivors = [
        p
        for p in sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=2)
        if p not in _dropped(sc, 2)
    ]
    assert strat.included[2] == survivors
    np.testing.assert_allclose(_flat(res.arrays), _flat(plain.arrays), atol=1e-4)


def test_additive_cannot_survive_a_dropout_after_partial_sums():
    sc = _scenario("additive", dropout_rate=0.1, dropout_stage="sum", rounds=1)
    assert _dropped(sc, 1), "seed chosen so that someone drops"
    strat, _, _ = _run(sc)
    assert strat.included[1] == []
    assert any("round skipped" in f["reason"] for f in strat.faults[1])


@pytest.mark.parametrize(("n", "k"), [(8, 0), (10, 0), (20, 14), (100, 20), (1000, 30)])
def test_automatic_neighbours_grow_with_log_n(n, k):
    raw = {
        "scenario": {"parties_per_round": n},
        "data": {"parties": 1000},
        "defense": {"secure_aggregation": "masking", "secagg": {"auto_neighbours": True}},
    }
    sec = Scenario.from_dict(raw).defense.secagg
    assert sec.neighbours == k
    # The validated scenario round-trips with the chosen graph.
    assert Scenario.from_json(Scenario.from_dict(raw).to_json()).defense.secagg.neighbours == k


def test_threshold_is_sized_for_the_dropout_rate_or_refused():
    def sec(rate, **secagg):
        raw = {
            "scenario": {"parties_per_round": 100, "dropout_rate": rate},
            "data": {"parties": 1000},
            "defense": {
                "secure_aggregation": "masking",
                "secagg": {"auto_neighbours": True, **secagg},
            },
        }
        return Scenario.from_dict(raw).defense.secagg

    assert sec(0.05).threshold == 0  # floor(2*21/3) + 1 = 15 <= 18 (expected survivors less 1 sd)
    assert sec(0.3).threshold == 12  # 14.7 - 2.1: below 15, still above (21 + 1) / 2
    with pytest.raises(ScenarioError, match="defense.secagg.threshold.*raise neighbours"):
        sec(0.45)
    with pytest.raises(ScenarioError, match="defense.secagg.threshold: 20 of a neighbourhood"):
        sec(0.05, threshold=20)


def _payloads(obj, seen=None):
    """Every RecordDict / ArrayRecord reachable from ``obj`` through containers and
    attributes (strategies, their inner strategies, dicts, lists)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, Grid):  # the transport (in simulation it also holds the parties)
        return []
    if isinstance(obj, RecordDict | ArrayRecord):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("privfl", "flwr")):
        items = list(vars(obj).values())
    else:
        return []
    return [p for item in items for p in _payloads(item, seen)]


def test_the_server_keeps_no_party_payload_after_a_round():
    sc = _scenario("masking", rounds=3)
    strat, _, grid = _run(sc)
    assert grid.transcript.exchanges(3, "train")  # the parties did send payloads
    kept = _payloads(strat)
    # Only models the server holds itself (the round's global weights) remain.
    model_keys = set(build_model(sc, load_federation(sc).num_classes).state_dict())
    assert kept and all(isinstance(p, ArrayRecord) for p in kept), [type(p) for p in kept]
    assert all(set(p.keys()) == model_keys for p in kept)


def test_results_record_each_rounds_sample(tmp_path):
    import json
    from importlib.resources import files

    import jsonschema

    from privfl.server import run_federation

    sc = _scenario(protocol="additive")
    grid = LoopbackGrid(make_client_app(sc, secret=SECRET), _nodes())
    results = run_federation(grid, sc, tmp_path / "run", progress=False)
    rows = {r["round"]: r for r in results["rounds"]}
    for rnd in (1, 2):
        expected = sample_parties(range(PARTIES), PER_ROUND, seed=5, server_round=rnd)
        assert rows[rnd]["parties"] == sorted(expected)
    schema = json.loads(files("privfl").joinpath("schema/results.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "run" / "results.json").read_text()), schema)
