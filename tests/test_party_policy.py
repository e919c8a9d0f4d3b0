"""A party's privacy never depends on the server: each guard against the server that breaks
the protocol, with the real ClientApp and SecureAggregation over an in-process grid.

Every test plays the server attacking one guard, first against a party that trusts the
server (``party.trust_server = true``, the behaviour the guard replaces), then against
the default policy.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from privfl.architecture import build_model
from privfl.clients.app import make_client_app
from privfl.clients.policy import PartyPolicy, simulation_policy
from privfl.config import SCENARIO_KEY, Scenario
from privfl.data import load_federation
from privfl.dp import accounted_sampling_rate, distributed_noise, seed_secret
from privfl.flower import wire
from privfl.flower.loopback import LoopbackGrid
from privfl.refusal import REFUSAL_CODE, refusal_reason
from privfl.secagg.channel import SecureChannel
from privfl.secagg.masking import MaskingError, MaskingParty, MaskingServer, fresh_static_key
from privfl.strategies.factory import aggregation_strategy
from privfl.strategies.rounds import FederationRounds
from privfl.strategies.secure_aggregation import SecureAggregation

NODES = {100 + i: i for i in range(3)}
SECRET = bytes(range(32))


@pytest.fixture(autouse=True)
def _task_identity():
    LoopbackGrid(make_client_app(_scenario(), secret=SECRET), {})  # sets Flower's run identity


def _scenario(protocol="masking", trust=False, dp=None, parties=3, **party) -> Scenario:
    raw = {
        "scenario": {"rounds": 3, "seed": 7},
        "data": {"parties": parties, "samples_per_party": 48, "server_test_samples": 50},
        "model": {"name": "mlp", "hidden": 16},
        "training": {"local_steps": 1, "batch_size": 8, "lr": 0.1},
        "defense": {"secure_aggregation": protocol, "dp": dp or {"mode": "none"}},
        "party": {"trust_server": trust, **party},
    }
    return Scenario.from_dict(raw)


def _global(sc: Scenario) -> ArrayRecord:
    fed = load_federation(sc)
    return ArrayRecord(build_model(sc, fed.num_classes).state_dict())


class TamperGrid(LoopbackGrid):
    """A grid through which the test, playing the server, rewrites messages in flight."""

    def __init__(self, app, nodes, *, on_send=None, on_reply=None):
        super().__init__(app, nodes)
        self.on_send = on_send or (lambda m: m)
        self.on_reply = on_reply or (lambda m: m)

    def send_and_receive(self, messages, *, timeout=None):
        sent = [self.on_send(m) for m in messages]
        return [self.on_reply(r) for r in super().send_and_receive(sent, timeout=timeout)]


def _nodes(sc: Scenario) -> dict[int, int]:
    return {100 + i: i for i in range(sc.data.parties)}


def _strategy(sc: Scenario) -> SecureAggregation:
    inner = FederationRounds(aggregation_strategy(sc))
    return SecureAggregation.from_scenario(inner, sc, party_of=_nodes(sc))


def _run(sc: Scenario, grid, rounds=1):
    strat = _strategy(sc)
    cfg = ConfigRecord({SCENARIO_KEY: sc.to_json()})
    res = strat.start(grid, _global(sc), num_rounds=rounds, train_config=cfg, evaluate_config=cfg)
    return strat, res


def _train_msg(sc: Scenario, requested: Scenario, rnd: int, node: int = 100) -> Message:
    cfg = ConfigRecord({SCENARIO_KEY: requested.to_json(), "server-round": rnd})
    return Message(
        RecordDict({"arrays": _global(sc), "config": cfg}),
        dst_node_id=node,
        message_type="train",
        group_id=str(rnd),
    )


def _context(party: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=100 + party,
        node_config={"partition-id": party},
        state=RecordDict(),
        run_config={},
    )


# ------------------------------------------------------------------ 1. downgrade


@pytest.mark.parametrize("trust", [True, False])
def test_downgrade_to_no_defense_is_refused(trust):
    own = _scenario(trust=trust, dp={"mode": "client", "epsilon": 3.0})
    asked = own.replace(["defense.secure_aggregation=none", "defense.dp.mode=none"])
    app = make_client_app(own, secret=SECRET)
    reply = app(_train_msg(own, asked, 1), _context())
    if trust:  # the old behaviour: plain weights, example count and loss
        assert not reply.has_error()
        assert "arrays" in reply.content and reply.content["metrics"]["num-examples"] > 1
        return
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    reason = refusal_reason(reply)
    assert "downgrade refused" in reason
    assert "defense.secure_aggregation = 'none' (my policy: 'masking')" in reason
    assert "defense.dp.mode = 'none' (my policy: 'client')" in reason


def test_server_may_choose_training_within_bounds_only():
    own = _scenario(protocol="none", min_batch_size=4)
    app = make_client_app(own, secret=SECRET)
    ok = app(_train_msg(own, own.replace(["training.batch_size=16"]), 1), _context())
    assert not ok.has_error()
    small = app(_train_msg(own, own.replace(["training.batch_size=1"]), 2), _context())
    assert "party.min_batch_size" in refusal_reason(small)


# ------------------------------------------------------------------ 2. noise the server regenerates


def test_noise_keys_never_come_from_what_the_server_holds():
    dp = {"mode": "distributed", "epsilon": 3.0}
    trusting = simulation_policy(_scenario(trust=True, dp=dp), 0, SECRET)
    default = simulation_policy(_scenario(dp=dp), 0, SECRET)
    lab = simulation_policy(_scenario(dp=dp, noise="lab"), 0, SECRET)
    sc = default.scenario
    assert trusting.noise_secret(sc) == seed_secret(sc)  # what every message carries
    assert default.noise_secret(sc) is None  # the OS CSPRNG
    assert lab.noise_secret(sc) == SECRET  # party-local, never in a message
    # The server, holding the scenario, regenerates a trusting party's share only.
    kw = {"scenario": sc, "party": 0, "server_round": 1, "scale": 2.0**20, "min_parties": 3}
    server = distributed_noise(64, secret=seed_secret(sc), **kw)
    assert np.array_equal(server, distributed_noise(64, secret=trusting.noise_secret(sc), **kw))
    assert not np.array_equal(server, distributed_noise(64, secret=lab.noise_secret(sc), **kw))
    assert not np.array_equal(server, distributed_noise(64, secret=None, **kw))


# ------------------------------------------------------------------ 3. distributed DP sizing


def test_distributed_noise_is_sized_for_the_smallest_accepted_sum():
    n, sigma, clip = 10, 1.0, 1.0
    dp = {"mode": "distributed", "noise_multiplier": sigma, "clip": clip}
    sc = _scenario(dp=dp, parties=n, min_parties=4)
    policy = simulation_policy(sc, 0, SECRET)
    assert policy.min_parties == 4
    scale = 2.0**10
    kw = {"scenario": sc, "server_round": 1, "scale": scale, "secret": SECRET}
    shares = [
        distributed_noise(50_000, party=p, min_parties=policy.min_parties, **kw) for p in range(4)
    ]
    # The smallest sum the party accepts (4 parties) already carries σC.
    assert np.std(np.sum(shares, axis=0) / scale) == pytest.approx(sigma * clip, rel=0.03)
    # No amplification is credited for a sample the server draws.
    sampled = _scenario(
        dp={**dp, "party_sampling_rate": 0.5}, parties=n, min_parties=4, protocol="additive"
    )
    assert accounted_sampling_rate(sampled) == 1.0
    trusting = sampled.replace(["party.trust_server=true"])
    assert accounted_sampling_rate(trusting) == 0.5


def test_automatic_min_parties():
    assert _scenario(parties=3).party.resolve_min_parties(3) == 3
    assert _scenario(parties=10).party.resolve_min_parties(10) == 7
    assert _scenario(parties=2).party.resolve_min_parties(2) == 2


# ------------------------------------------------------------------ 4. isolation by retry


def _stage_msg(sc, msg_type, rnd, node, **cfg) -> Message:
    conf = ConfigRecord(
        {
            SCENARIO_KEY: sc.to_json(),
            "server-round": rnd,
            **{wire.PREFIX + k: v for k, v in cfg.items()},
        }
    )
    return Message(RecordDict({"config": conf}), dst_node_id=node, message_type=msg_type)


@pytest.mark.parametrize("trust", [True, False])
def test_isolation_by_an_unsolicited_two_party_sum_is_refused(trust):
    sc = _scenario(protocol="additive", trust=trust)
    app = make_client_app(sc, secret=SECRET)
    grid = LoopbackGrid(app, NODES)
    strat, _ = _run(sc, grid, rounds=1)
    assert not strat.faults
    # The round is complete; the server alone asks parties 1 and 2 for a fresh sum.
    pair = [1, 2]
    replies = [
        app(
            _stage_msg(sc, wire.RESHARE, 1, 100 + p, attempt=1, parties=pair),
            grid.contexts[100 + p],
        )
        for p in pair
    ]
    if trust:
        assert not any(r.has_error() for r in replies)  # shares of [1, 2] only: isolation
        return
    for r in replies:
        reason = refusal_reason(r)
        assert "party.min_parties is 3" in reason
    # Even a request of full size is refused once the party released its partial sum.
    full = app(
        _stage_msg(sc, wire.RESHARE, 1, 101, attempt=1, parties=[0, 1, 2]), grid.contexts[101]
    )
    assert "already released a partial sum" in refusal_reason(full)


def test_a_fault_after_partial_sums_skips_the_round_instead_of_isolating():
    sc = _scenario(protocol="additive", min_parties=2)
    app = make_client_app(sc, secret=SECRET)
    grid = LoopbackGrid(app, NODES, drop=lambda node, t: t == wire.PARTIAL_SUM and node == 102)
    strat, _res = _run(sc, grid, rounds=1)
    reasons = [f["reason"] for f in strat.faults[1]]
    # The survivors refuse to re-share: a sum over them plus the dropped party's share
    # the server might hold would isolate it. Nothing is released, and the run goes on.
    assert any("already released a partial sum" in r for r in reasons)
    assert any("round skipped" in r for r in reasons)
    assert strat.included == {1: []}


# ------------------------------------------------------------------ 5. key directory MITM


@pytest.mark.parametrize("protocol", ["additive", "masking"])
@pytest.mark.parametrize("trust", [True, False])
def test_forged_key_directory_is_detected(protocol, trust):
    sc = _scenario(protocol=protocol, trust=trust)
    app = make_client_app(sc, secret=SECRET)
    forged = SecureChannel(9, b"x").public_key  # a key the server holds
    # Additive: the signed channel keys of the epoch's first train message; masking: the
    # neighbours' static keys relayed with every train message.
    field = wire.PREFIX + ("dir_keys" if protocol == "additive" else "nb_cts")

    def forge(msg):
        cfg = msg.content.config_records.get("config")
        if cfg is not None and field in cfg and msg.metadata.dst_node_id == 100:
            msg = Message(copy.deepcopy(msg.content), metadata=msg.metadata)
            cfg = msg.content["config"]
            keys = list(cfg[field])
            keys[1] = forged  # party 0 is told party 1's key is the server's
            cfg[field] = keys
        return msg

    grid = TamperGrid(app, NODES, on_send=forge)
    strat, _ = _run(sc, grid, rounds=1)
    faults = strat.faults.get(1, [])
    if trust:
        # Party 0 seals its share for party 1 under the server's key: the protocol breaks
        # only because this test does not re-encrypt in the middle; nothing notices why.
        assert not any("forged" in f["reason"] for f in faults)
        return
    (f,) = [f for f in faults if f["party"] == 0 and "forged or altered" in f["reason"]]
    assert "refused" in f["reason"]


def _relaying_to_party_0(forged_party):
    """A server that relays to party 0 a static key of its own for ``forged_party``."""
    forged = SecureChannel(9, b"x").public_key

    def forge(msg):
        cfg = msg.content.config_records.get("config")
        if cfg is not None and wire.PREFIX + "nb_cts" in cfg and msg.metadata.dst_node_id == 100:
            msg = Message(copy.deepcopy(msg.content), metadata=msg.metadata)
            relayed = wire.unpack_cts(msg.content["config"], wire.PREFIX + "nb_")
            relayed[forged_party] = forged
            msg.content["config"].update(wire.pack_cts(relayed, wire.PREFIX + "nb_"))
        return msg

    return forge


@pytest.mark.parametrize("trust", [True, False])
def test_a_party_told_another_static_key_for_itself_stops(trust):
    # Its neighbours would mask with a key it does not hold: the sum could not cancel.
    sc = _scenario(protocol="masking", trust=trust)
    app = make_client_app(sc, secret=SECRET)

    strat, _ = _run(sc, TamperGrid(app, NODES, on_send=_relaying_to_party_0(0)), rounds=1)
    (f,) = [f for f in strat.faults.get(1, []) if f["party"] == 0]
    assert "another static key for me" in f["reason"]


@pytest.mark.parametrize("forged_party, refused", [(1, True), (3, False)])
def test_a_party_takes_its_neighbours_masking_keys_from_its_roster(forged_party, refused):
    # 7 parties, 2 neighbours each: party 0 masks with parties 1 and 6 only. A forged key
    # of a neighbour is refused; one of a party it never uses is never read.
    sc = _scenario(protocol="masking", parties=7, min_parties=3).replace(
        ["defense.secagg.neighbours=2", "defense.secagg.threshold=2"]
    )
    app = make_client_app(sc, secret=SECRET)
    forge = _relaying_to_party_0(forged_party)
    strat, _ = _run(sc, TamperGrid(app, _nodes(sc), on_send=forge), rounds=1)
    party0 = [f for f in strat.faults.get(1, []) if f["party"] == 0 and "forged" in f["reason"]]
    assert bool(party0) == refused
    if not refused:
        assert strat.included[1] == list(range(7))


@pytest.mark.parametrize("trust", [True, False])
def test_a_lowered_masking_threshold_is_refused(trust):
    # A threshold of 1 would let the server alone open every party's self-mask seed.
    sc = _scenario(protocol="masking", trust=trust)
    app = make_client_app(sc, secret=SECRET)

    def lower(msg):
        cfg = msg.content.config_records.get("config")
        if cfg is not None and wire.PREFIX + "threshold" in cfg:
            msg = Message(copy.deepcopy(msg.content), metadata=msg.metadata)
            msg.content["config"][wire.PREFIX + "threshold"] = 1
        return msg

    strat, _ = _run(sc, TamperGrid(app, NODES, on_send=lower), rounds=1)
    reasons = " ".join(f["reason"] for f in strat.faults.get(1, []))
    if trust:
        assert "threshold" not in reasons
        assert strat.included[1] == [0, 1, 2]
        return
    assert "masking with threshold 1 and 0 neighbours refused" in reasons
    assert getattr(strat, "included", {}).get(1, []) == []  # nothing summed, nothing released


# ------------------------------------------------------------------ 6. round replay


@pytest.mark.parametrize("trust", [True, False])
def test_a_replayed_round_is_refused(trust):
    sc = _scenario(protocol="none", trust=trust)
    app = make_client_app(sc, secret=SECRET)
    ctx = _context()
    first = app(_train_msg(sc, sc, 2), ctx)
    again = app(_train_msg(sc, sc, 2), ctx)
    older = app(_train_msg(sc, sc, 1), ctx)
    assert not first.has_error()
    if trust:
        assert not again.has_error() and not older.has_error()
        return
    assert "rounds only move forward" in refusal_reason(again)
    assert "rounds only move forward" in refusal_reason(older)


def test_masking_round_replay_through_the_protocol_is_refused():
    sc = _scenario(protocol="masking")
    app = make_client_app(sc, secret=SECRET)
    grid = LoopbackGrid(app, NODES)
    strat, _ = _run(sc, grid, rounds=1)
    # Replaying round 1 in the same key epoch would reuse its pairwise masks.
    cfgs = ConfigRecord({SCENARIO_KEY: sc.to_json()})
    msgs = list(strat.configure_train(1, _global(sc), cfgs, grid))
    replies = grid.send_and_receive(msgs)
    assert all("rounds only move forward" in refusal_reason(r) for r in replies)


# ------------------------------------------------------------------ model inconsistency


@pytest.mark.parametrize("trust", [True, False])
def test_parties_sent_different_models_cannot_complete_a_sum(trust):
    sc = _scenario(protocol="masking", trust=trust)
    app = make_client_app(sc, secret=SECRET)

    def split_view(msg):
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 100:
            msg = Message(copy.deepcopy(msg.content), metadata=msg.metadata)
            arrays = msg.content["arrays"]
            key = next(iter(arrays.keys()))
            w = arrays[key].numpy().copy()
            w += 0.01  # the target alone gets another model
            arrays[key] = type(arrays[key])(w)
        return msg

    grid = TamperGrid(app, NODES, on_send=split_view)
    strat, _res = _run(sc, grid, rounds=1)
    if trust:
        assert strat.included[1] == [0, 1, 2]  # the sum completes over inconsistent models
        return
    assert strat.included == {1: []}
    reasons = " ".join(f["reason"] for f in strat.faults[1])
    assert "global model or party list" in reasons


# ---------------------------------------------- 7. released outside the guarantee


@pytest.mark.parametrize("trust", [True, False])
def test_under_dp_no_loss_leaves_and_evaluation_is_withheld(trust):
    sc = _scenario(protocol="none", dp={"mode": "client", "epsilon": 3.0}, trust=trust)
    app = make_client_app(sc, secret=SECRET)
    ctx = _context()
    reply = app(_train_msg(sc, sc, 1), ctx)
    ev = Message(
        RecordDict({"arrays": _global(sc), "config": ConfigRecord({SCENARIO_KEY: sc.to_json()})}),
        dst_node_id=100,
        message_type="evaluate",
    )
    if trust:  # the un-noised loss, the example count and the evaluation all leave
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] > 1 and metrics["train-loss"] > 0
        assert not app(ev, ctx).has_error()
        return
    assert dict(reply.content["metrics"]) == {"num-examples": 1, "train-loss": 0.0}
    assert reply.content["privfl.side.dp-epsilon"]["party"] == 0
    assert "evaluation withheld" in refusal_reason(app(ev, ctx))
    released = make_client_app(sc.replace(["party.evaluation=release"]), secret=SECRET)
    assert not released(ev, _context()).has_error()


def test_the_party_refuses_to_train_past_its_own_budget():
    sc = _scenario(protocol="none", dp={"mode": "client", "epsilon": 3.0})
    app = make_client_app(sc, secret=SECRET)
    ctx = _context()
    for rnd in (1, 2, 3):  # calibrated for scenario.rounds = 3
        assert not app(_train_msg(sc, sc, rnd), ctx).has_error()
    assert "my budget" in refusal_reason(app(_train_msg(sc, sc, 4), ctx))


# ------------------------------------------------------------------ 8. faults are attributed


def _masking_round(n=5, threshold=3):
    from privfl.fixedpoint import FixedPointCodec

    codec = FixedPointCodec(ring_bits=32, frac_bits=8, clip_range=4.0)
    session = b"s" * 16
    parties = {p: MaskingParty(p, codec, session, fresh_static_key()) for p in range(n)}
    graph = {
        "parties": list(range(n)),
        "keys": {p: q.public_key for p, q in parties.items()},
        "neighbours": 0,
        "threshold": threshold,
    }
    server = MaskingServer(codec, session, list(range(n)), threshold=threshold, neighbours=0)
    xs = {p: codec.encode(np.full(4, 0.1 * (p + 1)), weight=1.0, parties=n) for p in parties}
    masked, bsh, commits = {}, {}, {}
    for p, q in parties.items():
        masked[p], bsh[p] = q.mask(xs[p], rnd=1, **graph)
        commits[p] = q.last_commitment
    return codec, parties, server, masked, bsh, commits, xs


def test_corrupted_share_with_exactly_t_shares_is_detected_not_silent():
    _codec, parties, server, masked, bsh, commits, _xs = _masking_round(n=3, threshold=3)
    S, D, routed = server.plan_unmask(masked, bsh)
    reveals = {p: parties[p].unmask(rnd=1, survivors=S, dropped=D, incoming=routed[p]) for p in S}
    share = bytearray(reveals[2]["b"][0])
    share[-1] ^= 1
    reveals[2]["b"][0] = bytes(share)
    with pytest.raises(MaskingError, match="cannot be told whose"):
        server.unmask(1, masked, S, D, reveals, commitments=commits)


def test_corrupted_share_with_redundancy_is_attributed_and_the_sum_recovered():
    codec, parties, server, masked, bsh, commits, xs = _masking_round(n=5, threshold=3)
    S, D, routed = server.plan_unmask(masked, bsh)
    reveals = {p: parties[p].unmask(rnd=1, survivors=S, dropped=D, incoming=routed[p]) for p in S}
    share = bytearray(reveals[4]["b"][0])
    share[-1] ^= 1
    reveals[4]["b"][0] = bytes(share)
    total = server.unmask(1, masked, S, D, reveals, commitments=commits)
    expected = np.zeros(4, dtype=codec.dtype)
    for x in xs.values():
        codec.add(expected, x, out=expected)
    assert np.array_equal(total, expected)
    assert server.faults == [
        {
            "party": 4,
            "stage": "unmask",
            "reason": "revealed a corrupted share of the self-mask seed of party 0",
        }
    ]


def test_a_malformed_masked_vector_excludes_that_party_not_the_round():
    # Four parties: the masking threshold (3) still holds without the malformed one.
    sc = _scenario(protocol="masking", parties=4)

    def shrink(reply):
        if reply.metadata.src_node_id == 102 and reply.has_content():
            vec = wire.read_vector(reply.content)
            if vec is not None:
                other = np.uint32 if vec.dtype == np.uint64 else np.uint64
                content = copy.deepcopy(reply.content)
                content[wire.VECTOR] = wire.vector_record(vec.astype(other))
                return Message(content, metadata=reply.metadata)
        return reply

    app = make_client_app(sc, secret=SECRET)
    grid = TamperGrid(app, _nodes(sc), on_reply=shrink)
    strat, _ = _run(sc, grid, rounds=1)
    assert strat.included == {1: [0, 1, 3]}
    (f,) = [f for f in strat.faults[1] if f["party"] == 2]
    assert f["reason"].startswith("excluded: malformed masked input (uint")


def test_a_tampered_share_names_its_sender_and_keeps_the_honest_recipient():
    sc = _scenario(protocol="masking", parties=4)

    def tamper(msg):
        if msg.metadata.message_type == wire.UNMASK and msg.metadata.dst_node_id == 100:
            msg = Message(copy.deepcopy(msg.content), metadata=msg.metadata)
            cfg = msg.content["config"]
            cts = list(cfg[wire.PREFIX + "in_cts"])
            bad = bytearray(cts[0])
            bad[-1] ^= 1
            cts[0] = bytes(bad)
            cfg[wire.PREFIX + "in_cts"] = cts
        return msg

    app = make_client_app(sc, secret=SECRET)
    grid = TamperGrid(app, _nodes(sc), on_send=tamper)
    strat, _ = _run(sc, grid, rounds=1)
    complaints = [f for f in strat.faults[1] if "could not open" in f["reason"]]
    assert complaints and complaints[0]["party"] == 1
    assert "party 0 could not open" in complaints[0]["reason"]
    # Party 0 still revealed its other shares: the honest recipient was not excluded.
    assert strat.included == {1: [0, 1, 2, 3]}


def test_results_record_faults_and_each_partys_epsilon(tmp_path):
    from privfl.server import run_federation

    sc = _scenario(protocol="masking", dp={"mode": "client", "epsilon": 3.0})
    app = make_client_app(sc, secret=SECRET)
    grid = LoopbackGrid(app, NODES)
    results = run_federation(grid, sc.replace(["scenario.rounds=2"]), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(on_disk["final"]["party_epsilon"]) == {"0", "1", "2"}
    assert all(0 < e <= 3.0 for e in on_disk["final"]["party_epsilon"].values())
    # The server asks for no evaluation the parties' public policy withholds: no refusals.
    assert not any(r.get("faults") for r in results["rounds"])
    assert on_disk["privacy"]["dp_mode"] == "client"
    assert on_disk["privacy"]["noise"].startswith("os:")
    assert not on_disk["privacy"]["parties_trust_server"]
    text = (tmp_path / "run" / "results.json").read_text()
    assert SECRET.hex() not in text


def test_policy_is_the_partys_own_object():
    pol = simulation_policy(_scenario(), 1, SECRET)
    assert isinstance(pol, PartyPolicy) and pol.party == 1
    assert set(pol.roster) == {0, 1, 2}


def test_a_deployed_node_reads_its_policy_and_keys_from_its_node_config(tmp_path):
    from privfl.cli import main
    from privfl.clients.app import node_policy
    from privfl.secagg.identity import public_identity

    assert main(["keys", "--parties", "3", "--out", str(tmp_path)]) == 0
    key = tmp_path / "party-1.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={
            "partition-id": 1,
            "policy": "three_hospitals",
            "policy-overrides": "defense.secure_aggregation=masking;party.min_parties=2",
            "identity-key": str(key),
            "roster": str(tmp_path / "roster.json"),
        },
        state=RecordDict(),
        # What the server's operator chose: never the party's policy.
        run_config={"scenario": "dlg_batch1"},
    )
    pol = node_policy(ctx)
    assert pol.scenario.scenario.name == "three_hospitals"
    assert pol.scenario.defense.secure_aggregation == "masking"
    assert pol.min_parties == 2
    assert pol.roster[1] == public_identity(bytes.fromhex(key.read_text()))
    bare = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    app = make_client_app()
    sc = _scenario()
    reply = app(_train_msg(sc, sc, 1), bare)
    assert "no party policy" in refusal_reason(reply)


def test_a_diverging_run_stops_cleanly_with_the_reason(tmp_path):
    from privfl.server import run_federation

    sc = _scenario(protocol="additive").replace(
        ["training.lr=1e30", "training.local_steps=3", "scenario.rounds=3"]
    )
    grid = LoopbackGrid(make_client_app(sc, secret=SECRET), NODES)
    results = run_federation(grid, sc, tmp_path / "run")
    assert results["final"]["stopped_early"].startswith("training diverged in round 1")
    assert "non-finite weights" in results["final"]["stopped_early"]
    assert [r["round"] for r in results["rounds"]] == [1]
    assert (tmp_path / "run" / "report.md").is_file()
    # No party was asked to train again after the divergence.
    state = grid.contexts[100].state.config_records["privfl.party"]
    assert int(state["last-round"]) == 1


def test_party_level_noise_that_drowns_the_updates_is_warned_about():
    from privfl.dp import utility_warning

    sc = _scenario(protocol="additive", dp={"mode": "global", "epsilon": 1.5})
    assert "data.parties" in utility_warning(sc, 200_000)
    assert utility_warning(_scenario(dp={"mode": "client", "epsilon": 1.5}), 200_000) is None


def test_everything_a_user_imports_is_exported():
    import privfl.attacks
    import privfl.clients
    import privfl.strategies

    for package in (privfl.strategies, privfl.clients, privfl.attacks):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
    with pytest.raises(AttributeError, match="no attribute"):
        privfl.strategies.NoSuchStrategy  # noqa: B018


def test_roster_view_reads_the_state_lists_as_a_mapping():
    from privfl.clients.policy import RosterView

    view = RosterView([1, 4, 9], [b"a", b"b", b"c"])
    assert view[4] == b"b" and list(view) == [1, 4, 9] and len(view) == 3
    assert 9 in view and 5 not in view and 0 not in view and 10 not in view
    with pytest.raises(KeyError):
        view[5]
    with pytest.raises(ValueError, match="3 parties and 2 keys"):
        RosterView([1, 2, 3], [b"a", b"b"])
