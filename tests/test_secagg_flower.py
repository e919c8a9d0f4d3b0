"""SecureAggregation strategy + client mod through an in-process Grid (no Ray)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from privfl.clients.secagg import (
    SecAggClientError,
    encode_update,
    make_secagg_mod,
    register_secure_aggregation,
    secagg_mod,
)
from privfl.config import Scenario
from privfl.fixedpoint import EncodingError
from privfl.flower import wire
from privfl.flower.loopback import LoopbackGrid
from privfl.flower.transcript import RecordingGrid
from privfl.flower.wire import curious_read
from privfl.strategies.secure_aggregation import SecureAggregation, SecureAggregationError

SHAPES = {"w": (4, 3), "b": (3,)}
NODES = {100 + i: i for i in range(6)}  # node id -> party


def _delta(party, rnd):
    rng = np.random.default_rng(1000 * rnd + party)
    return {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def _examples(party):
    return 10 * (party + 1)


def _loss(party):
    return 0.5 + party


def _honest_train(nan_party=None, side_party=None):
    def train(msg: Message, context: Context) -> Message:
        party = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        g = msg.content["arrays"]
        d = _delta(party, rnd)
        local = {k: g[k].numpy() + d[k] for k in g}
        if party == nan_party:
            local["b"][1] = np.nan
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                "metrics": MetricRecord(
                    {"num-examples": _examples(party), "train-loss": _loss(party)}
                ),
            }
        )
        if party == side_party:
            content["privfl.side.recon"] = ConfigRecord({"hit": 1})
        return Message(content, reply_to=msg)

    return train


def _app(mod=secagg_mod, nan_party=None, side_party=None, check_fn=None):
    app = ClientApp()
    app.train(mods=[mod])(_honest_train(nan_party, side_party))
    register_secure_aggregation(app, check_fn=check_fn)
    return app


class SpyFedAvg(FedAvg):
    def __init__(self):
        super().__init__(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
        self.seen = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen.append(replies)
        return super().aggregate_train(server_round, replies)


def _scenario(protocol, n, **secagg):
    raw = {
        "data": {"parties": n},
        "defense": {"secure_aggregation": protocol, "secagg": secagg},
    }
    return Scenario.from_dict(raw)


def _global():
    return ArrayRecord({k: Array(np.full(s, 0.25, np.float32)) for k, s in SHAPES.items()})


def _run(protocol, n, rounds=2, drop=None, app=None, **secagg):
    sc = _scenario(protocol, n, **secagg)
    nodes = {k: v for k, v in NODES.items() if v < n}
    grid = LoopbackGrid(app or _app(), nodes, drop=drop)
    # What the server received, as a curious server's recorder sees it (by node).
    recording = RecordingGrid(grid)
    grid.transcript = recording.transcript
    spy = SpyFedAvg()
    strat = SecureAggregation.from_scenario(spy, sc, party_of=nodes)
    res = strat.start(
        recording,
        _global(),
        num_rounds=rounds,
        train_config=ConfigRecord({"privfl.scenario": sc.to_json()}),
    )
    return strat, spy, res, grid


def _expected(parties, rnd, start):
    w = {p: _examples(p) for p in parties}
    tot = sum(w.values())
    arrays = {k: start[k] + sum(w[p] * _delta(p, rnd)[k] for p in parties) / tot for k in SHAPES}
    loss = sum(w[p] * _loss(p) for p in parties) / tot
    return arrays, tot, loss


def _check_round(spy, rnd, parties, start, n):
    (reply,) = spy.seen[rnd - 1]
    arrays, tot, loss = _expected(parties, rnd, start)
    got = reply.content["arrays"]
    for k in SHAPES:
        assert np.max(np.abs(got[k].numpy() - arrays[k])) < 1e-4
    assert reply.content["metrics"]["num-examples"] == tot
    assert reply.content["metrics"]["train-loss"] == pytest.approx(loss, abs=1e-4)
    return arrays


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_two_rounds_exact_and_two_round_trips(protocol):
    strat, spy, _, grid = _run(protocol, 3)
    start = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    a1 = _check_round(spy, 1, [0, 1, 2], start, 3)
    _check_round(spy, 2, [0, 1, 2], a1, 3)
    assert strat.round_trips == {1: 2 + 1, 2: 2}  # key setup once, in the first round
    assert not grid.errors


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_server_view_holds_no_plaintext(protocol):
    strat, _, _, grid = _run(protocol, 3, rounds=1)
    view = {n: grid.transcript.received(1, n) for n in (100, 101, 102)}
    assert all(view.values())
    template = _global()
    sc = strat.codec  # the public codec is all a curious server needs
    for node, contents in view.items():
        for content in contents:
            assert "arrays" not in content and "metrics" not in content
            got = curious_read(content, template, sc)
            if got is None:
                continue
            true = _delta(NODES[node], 1)["w"].ravel() * _examples(NODES[node])
            r = np.corrcoef(got["w"].ravel().astype(float), true)[0, 1]
            assert abs(r) < 0.9  # 12 coordinates: just not the update itself
            assert np.abs(got["w"]).max() > 1e6  # uniform ring noise, not small numbers
    mtype = "train" if protocol == "masking" else wire.PARTIAL_SUM
    first = next(ex for ex in grid.transcript.exchanges(1, mtype) if 100 in ex.received)
    assert curious_read(first.received[100], template, sc) is not None


def test_curious_read_sees_an_unprotected_vector():
    sc = _scenario("additive", 3)
    template = _global()
    vec = np.concatenate(
        [np.arange(15) / 8.0 - 1.0, [1.0, 2.0]]
    )  # what a party would send without protection
    from privfl.fixedpoint import FixedPointCodec

    enc = FixedPointCodec.from_section(sc.defense.secagg).encode(vec, parties=3, clip=False)
    got = curious_read(RecordDict({wire.VECTOR: wire.vector_record(enc)}), template, sc)
    assert np.allclose(got["w"].ravel(), vec[:12], atol=1e-5)
    assert curious_read(RecordDict({}), template, sc) is None


def test_masking_recovers_from_drops_with_the_same_keys():
    trains = []  # the round is told by the train messages sent so far, six a round

    def drop(node, mtype):
        if mtype == "train":
            trains.append(node)
            return node == 103 and len(trains) <= 6  # round 1: never sends its input
        return mtype == wire.UNMASK and node == 101 and len(trains) > 6  # round 2: vanishes

    strat, spy, _, _ = _run("masking", 6, rounds=2, drop=drop, threshold=4)
    start = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    a1 = _check_round(spy, 1, [0, 1, 2, 4, 5], start, 6)
    _check_round(spy, 2, [0, 1, 2, 3, 4, 5], a1, 6)
    # Party 3's round-1 seeds were revealed, no key: it is back in round 2 without setup.
    assert strat.round_trips == {1: 3, 2: 2}


def test_masking_skips_a_round_whose_dropped_partys_seed_left_with_its_neighbour():
    # Party 3 never sends input and party 1, its neighbour, falls silent before revealing
    # its round seed with 3: no one else holds it, so the round releases nothing.
    def drop(node, mtype):
        return (mtype, node) in {("train", 103), (wire.UNMASK, 101)}

    strat, spy, _, _ = _run("masking", 6, rounds=1, drop=drop, threshold=4)
    assert spy.seen == []
    (fault,) = [f for f in strat.faults[1] if f["stage"] == "aggregate"]
    assert re.search(r"round skipped.*party 1 did not answer.*dropped party 3", fault["reason"])


def test_masking_refuses_below_threshold():
    def drop(node, mtype):
        return mtype == wire.UNMASK and node in (100, 101, 102)

    strat, spy, _, _ = _run("masking", 6, rounds=1, drop=drop, threshold=4)
    # No wrong sum and no crash: the round releases nothing and says why.
    assert spy.seen == []
    (fault,) = strat.faults[1]
    assert fault["stage"] == "aggregate"
    assert re.search(r"round skipped.*only 3 parties answered.*threshold 4", fault["reason"])


def test_additive_aborts_and_retries_without_dropped_party():
    def drop(node, mtype):
        return mtype == wire.PARTIAL_SUM and node == 101

    strat, spy, _, grid = _run("additive", 4, rounds=1, drop=drop)
    start = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    _check_round(spy, 1, [0, 2, 3], start, 4)
    assert any(100 in ex.received for ex in grid.transcript.exchanges(1, wire.RESHARE))
    assert strat.included == {1: [0, 2, 3]}


def test_additive_gives_up_after_max_retries():
    def drop(node, mtype):
        return (mtype, node) in {(wire.PARTIAL_SUM, 101), (wire.RESHARE, 102)}

    strat, spy, _, _ = _run("additive", 4, rounds=1, drop=drop, max_retries=1)
    assert spy.seen == []
    assert re.search(r"aborted 2 time\(s\).*max_retries=1", strat.faults[1][-1]["reason"])


def test_nan_update_is_rejected_before_sharing_and_party_excluded():
    _, spy, _, grid = _run("additive", 3, rounds=1, app=_app(nan_party=1))
    assert any("party 1" in e and "non-finite" in e for e in grid.errors)
    train = grid.transcript.exchanges(1, "train")
    assert train and all(101 not in ex.received for ex in train)
    start = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    _check_round(spy, 1, [0, 2], start, 3)


def test_side_channel_records_reach_inner_strategy():
    _, spy, _, _ = _run("additive", 3, rounds=1, app=_app(side_party=2))
    (reply,) = spy.seen[0]
    assert reply.content["privfl.side.102.recon"]["hit"] == 1


def test_mod_is_noop_without_secure_aggregation():
    sc = _scenario("none", 2)
    app = _app()
    grid = LoopbackGrid(app, {100: 0, 101: 1})
    msg = Message(
        RecordDict(
            {
                "arrays": _global(),
                "config": ConfigRecord({"server-round": 1, "privfl.scenario": sc.to_json()}),
            }
        ),
        dst_node_id=100,
        message_type="train",
    )
    (reply,) = grid.send_and_receive([msg])
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert reply.content["metrics"]["num-examples"] == 10


def _pair(sc, vals):
    msg = Message(
        RecordDict(
            {
                "arrays": _global(),
                "config": ConfigRecord({"server-round": 3, "privfl.scenario": sc.to_json()}),
            }
        ),
        dst_node_id=100,
        message_type="train",
    )
    local = ArrayRecord(
        {
            k: Array(np.full(s, v, np.float32))
            for (k, s), v in zip(SHAPES.items(), vals, strict=True)
        }
    )
    reply = Message(
        RecordDict(
            {"arrays": local, "metrics": MetricRecord({"num-examples": 7, "train-loss": 1.0})}
        ),
        reply_to=msg,
    )
    return msg, reply


def test_encode_update_checks_and_distributed_noise_hook():
    sc = _scenario("additive", 3)
    msg, reply = _pair(sc, [np.inf, 0.0])
    with pytest.raises(EncodingError, match=r"party 4: .*non-finite"):
        encode_update(msg, reply, sc, 4, 3)
    dist = Scenario.from_dict(
        {
            "data": {"parties": 3},
            "defense": {
                "secure_aggregation": "masking",
                "dp": {"mode": "distributed", "noise_multiplier": 1.0},
            },
        }
    )
    calls = []

    def noise(size, *, scenario, party, server_round, scale, secret, min_parties):
        calls.append((size, party, server_round, scale))
        return np.full(size, 3, dtype=np.int64)

    msg, reply = _pair(dist, [0.75, 0.25])
    vec = encode_update(msg, reply, dist, 2, 3, noise_fn=noise)
    from privfl.fixedpoint import FixedPointCodec

    dec = FixedPointCodec.from_section(dist.defense.secagg).decode(vec)
    assert calls == [(15, 2, 3, 2.0**20)]
    # Weight 1 under DP, and Δ (0.5 on 12 coordinates, norm 1.73) clipped to
    # defense.dp.clip = 1 by the encoder itself, before the noise.
    assert np.allclose(dec[:12], 1 / np.sqrt(12) + 3 / 2**20, atol=2**-20)
    assert dec[-2] == 1.0
    bad = lambda size, **kw: np.zeros(size, dtype=np.float64)  # noqa: E731
    with pytest.raises(SecAggClientError, match="party 2: distributed noise must be"):
        encode_update(msg, reply, dist, 2, 3, noise_fn=bad)


def test_distributed_noise_through_the_mod():
    dist = Scenario.from_dict(
        {
            "data": {"parties": 3},
            "defense": {
                "secure_aggregation": "additive",
                "dp": {"mode": "distributed", "noise_multiplier": 1.0},
            },
        }
    )
    checks = []
    mod = make_secagg_mod(lambda size, **kw: np.full(size, 2**20, dtype=np.int64))
    app = _app(mod, check_fn=lambda sc, dim, parties: checks.append((dim, parties)))
    nodes = {100: 0, 101: 1, 102: 2}
    grid = LoopbackGrid(app, nodes)
    spy = SpyFedAvg()
    strat = SecureAggregation.from_scenario(spy, dist, party_of=nodes)
    strat.start(
        grid,
        _global(),
        num_rounds=1,
        train_config=ConfigRecord({"privfl.scenario": dist.to_json()}),
    )
    (reply,) = spy.seen[0]
    assert checks == [(15, 3)] * 3
    assert reply.content["metrics"]["num-examples"] == 3  # weight 1 per party

    def clipped_w(p):  # each party's whole Δ clipped to defense.dp.clip = 1 by its encoder
        d = _delta(p, 1)
        norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
        return d["w"] * min(1.0, 1.0 / norm)

    want = 0.25 + sum(clipped_w(p) for p in range(3)) / 3 + 1.0  # +1.0: noise 2^20 each
    assert np.max(np.abs(reply.content["arrays"]["w"].numpy() - want)) < 1e-4


def test_strategy_rejects_bad_arguments():
    sc = _scenario("none", 3)
    with pytest.raises(ValueError, match="protocol must be"):
        SecureAggregation.from_scenario(SpyFedAvg(), sc, party_of={1: 0})
    with pytest.raises(ValueError, match="several nodes"):
        SecureAggregation.from_scenario(
            SpyFedAvg(), _scenario("additive", 3), party_of={1: 0, 2: 0}
        )


class PollingGrid(LoopbackGrid):
    """A LoopbackGrid with push/pull: replies show up only after a few pulls."""

    pull_interval = 0.01

    def __init__(self, *args, pulls_before_reply=3, **kw):
        super().__init__(*args, **kw)
        self.pulls_before_reply = pulls_before_reply
        self.pulls = 0
        self._waiting = {}

    def push_messages(self, messages):
        messages = list(messages)
        for reply in self.send_and_receive(messages):
            self._waiting[reply.metadata.reply_to_message_id] = [self.pulls_before_reply, reply]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in set(message_ids) & set(self._waiting):
            entry = self._waiting[mid]
            entry[0] -= 1
            if entry[0] < 0:
                out.append(self._waiting.pop(mid)[1])
        return out


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_stages_poll_push_pull_grids_until_every_reply(protocol):
    sc = _scenario(protocol, 3)
    nodes = {k: v for k, v in NODES.items() if v < 3}
    grid = PollingGrid(_app(), nodes)
    spy = SpyFedAvg()
    strat = SecureAggregation.from_scenario(spy, sc, party_of=nodes)
    strat.start(
        grid, _global(), num_rounds=1, train_config=ConfigRecord({"privfl.scenario": sc.to_json()})
    )
    start = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    _check_round(spy, 1, [0, 1, 2], start, 3)
    stages = 2  # the setup stage + the round's second stage
    assert grid.pulls == stages * 4  # three empty pulls, then all replies at once


def test_stage_gives_up_at_the_timeout_without_replies():
    sc = _scenario("additive", 3)
    nodes = {k: v for k, v in NODES.items() if v < 3}
    grid = PollingGrid(_app(), nodes, pulls_before_reply=10**9)
    strat = SecureAggregation.from_scenario(
        SpyFedAvg(), sc, party_of=nodes, timeout=0.05, on_failure="raise"
    )
    with pytest.raises(SecureAggregationError, match="completed key setup"):
        strat.configure_train(1, _global(), ConfigRecord({"privfl.scenario": sc.to_json()}), grid)
    assert 2 <= grid.pulls < 50
