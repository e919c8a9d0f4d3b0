"""privfl.dp mechanisms and accounting, DPGlobalUpdate, clip_update_mod, DP scenario keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.clients.dp_mods import clip_update_mod
from privfl.config import Scenario, ScenarioError
from privfl.dp import (
    GaussianAggregateMechanism,
    KeyStream,
    calibrate_noise,
    check_distributed,
    clip_l2,
    distributed_epsilon,
    distributed_noise,
    epsilon_spent,
    flatten,
    global_noise_multiplier,
    noise_key,
    seed_secret,
    wrap_probability_bound,
)
from privfl.dp.noise import SKELLAM_TABLE_MAX_VARIANCE, skellam_table
from privfl.flower.loopback import LoopbackGrid
from privfl.strategies.dp_global import DPGlobalUpdate

pytestmark = pytest.mark.usefixtures("task_identity")


SHAPES = {"w": (40, 25), "b": (25,)}
NODES = {200 + i: i for i in range(4)}


def _scenario(dp: dict, parties: int = 4, rounds: int = 3, **extra) -> Scenario:
    raw = {
        "scenario": {"rounds": rounds, "seed": 7},
        "data": {"parties": parties},
        "defense": {"dp": dp, **extra},
    }
    return Scenario.from_dict(raw)


def _global(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, np.float32)) for k, s in SHAPES.items()})


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    ("epsilon", "sample_rate", "steps", "accountant"),
    [
        (1.5, 1 / 30, 1200, "rdp"),
        (3.0, 1 / 30, 1200, "rdp"),
        (0.8, 1.0, 5, "rdp"),
        (2.0, 0.01, 300, "prv"),
    ],
)
def test_calibrated_sigma_reproduces_target_epsilon(epsilon, sample_rate, steps, accountant):
    sigma = calibrate_noise(
        epsilon=epsilon, delta=1e-5, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    eps = epsilon_spent(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        delta=1e-5,
        accountant=accountant,
    )
    assert eps <= epsilon
    assert abs(eps - epsilon) / epsilon < 0.01


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    e = [
        epsilon_spent(noise_multiplier=1.0, sample_rate=0.1, steps=k, delta=1e-5)
        for k in (1, 10, 100)
    ]
    assert e[0] < e[1] < e[2]
    assert epsilon_spent(noise_multiplier=2.0, sample_rate=0.1, steps=100, delta=1e-5) < e[2]


# --------------------------------------------------------------------------- clipping


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=50), st.floats(1e-3, 1e2))
def test_clip_l2_bounds_norm_and_keeps_direction(values, clip):
    v = np.array(values)
    out, norm = clip_l2(v, clip)
    assert norm == pytest.approx(np.linalg.norm(v))
    assert np.linalg.norm(out) <= clip * (1 + 1e-9)
    if norm <= clip:
        np.testing.assert_array_equal(out, v)
    else:
        np.testing.assert_allclose(out * norm / clip, v, rtol=1e-9, atol=1e-9)


def _replies(deltas: dict[int, np.ndarray], base: ArrayRecord, examples: int = 10) -> list[Message]:
    out = []
    for node, d in deltas.items():
        ins = Message(RecordDict(), dst_node_id=node, message_type="train")
        parts = np.split(d, [SHAPES["w"][0] * SHAPES["w"][1]])
        arrays = ArrayRecord(
            {
                "w": Array((base["w"].numpy() + parts[0].reshape(SHAPES["w"])).astype(np.float32)),
                "b": Array((base["b"].numpy() + parts[1]).astype(np.float32)),
            }
        )
        content = RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
            }
        )
        out.append(_as_reply(content, ins))
    return out


def _as_reply(content: RecordDict, ins: Message) -> Message:
    return Message(content, reply_to=ins)  # src_node_id = the instruction's dst_node_id


def test_server_side_clipping_bounds_every_party(monkeypatch):
    sc = _scenario({"mode": "global", "noise_multiplier": 1e-9, "clip": 0.5, "clipping": "server"})
    dim = sum(int(np.prod(s)) for s in SHAPES.values())
    rng = np.random.default_rng(0)
    deltas = {n: rng.normal(0, 1 + 3 * p, dim) for n, p in NODES.items()}
    strat = DPGlobalUpdate.from_scenario(FedAvg(), sc, party_of=NODES)
    base = _global(0.1)
    strat._ensure_accountant(base)
    strat._current = base
    replies = _replies(deltas, base, examples=7)
    arrays, metrics = strat.aggregate_train(1, replies)
    b = flatten(base.to_numpy_ndarrays())
    for r in replies:  # every reply handed to the inner strategy is clipped and weighted 1
        assert np.linalg.norm(flatten(r.content["arrays"].to_numpy_ndarrays()) - b) <= 0.5 * (
            1 + 1e-5
        )
        assert r.content["metrics"]["num-examples"] == 1
    assert set(strat.update_norms[1]) == set(NODES.values())
    assert all(strat.update_norms[1][p] > 0.5 for p in NODES.values())
    mean = flatten(arrays.to_numpy_ndarrays()) - b
    clipped = [clip_l2(d, 0.5)[0] for d in deltas.values()]
    np.testing.assert_allclose(mean, np.mean(clipped, axis=0), atol=1e-6)
    assert metrics["epsilon"] > 0


def _train_msg(sc: Scenario, base: ArrayRecord, kind: str = "train") -> Message:
    cfg = ConfigRecord({"server-round": 1, "privfl.scenario": sc.to_json()})
    return Message(RecordDict({"arrays": base, "config": cfg}), dst_node_id=1, message_type=kind)


@pytest.mark.parametrize(
    ("dp", "clipped"),
    [
        ({"mode": "global", "epsilon": 2.0, "clip": 0.3}, True),
        ({"mode": "global", "epsilon": 2.0, "clip": 0.3, "clipping": "server"}, False),
        ({"mode": "client", "epsilon": 2.0, "clip": 0.3}, False),
        ({"mode": "none"}, False),
    ],
)
def test_clip_update_mod(dp, clipped):
    sc = _scenario(dp)
    base = _global(1.0)
    msg = _train_msg(sc, base)

    def call_next(m: Message, ctx: Context) -> Message:
        local = ArrayRecord({k: Array(v.numpy() + 2.0) for k, v in m.content["arrays"].items()})
        content = RecordDict({"arrays": local, "metrics": MetricRecord({"num-examples": 5})})
        return _as_reply(content, m)

    reply = clip_update_mod(msg, Context(1, 1, {}, RecordDict(), {}), call_next)
    d = flatten(reply.content["arrays"].to_numpy_ndarrays()) - flatten(base.to_numpy_ndarrays())
    if clipped:
        assert np.linalg.norm(d) == pytest.approx(0.3, rel=1e-5)
        assert list(reply.content["arrays"].keys()) == list(SHAPES)
    else:
        np.testing.assert_allclose(d, 2.0)


# --------------------------------------------------------------------------- Gaussian noise


def test_aggregate_noise_std_matches_sigma_clip_over_n():
    sigma, clip = 2.0, 0.5
    sc = _scenario(
        {"mode": "global", "noise_multiplier": sigma, "clip": clip, "clipping": "server"}
    )
    strat = DPGlobalUpdate.from_scenario(FedAvg(), sc, party_of=NODES)
    base = _global(0.0)
    strat._ensure_accountant(base)
    strat._current = base
    dim = sum(int(np.prod(s)) for s in SHAPES.values())
    arrays, _ = strat.aggregate_train(1, _replies({n: np.zeros(dim) for n in NODES}, base))
    noise = flatten(arrays.to_numpy_ndarrays())
    expected = sigma * clip / len(NODES)
    # sample std of `dim` normals: relative standard error 1/sqrt(2 dim) ≈ 1.6%
    assert np.std(noise) == pytest.approx(expected, rel=5 / math.sqrt(2 * dim))
    assert abs(np.mean(noise)) < 5 * expected / math.sqrt(dim)
    assert stats.kstest(noise / expected, "norm").pvalue > 1e-4


def test_mechanism_and_keystream_normals():
    mech = GaussianAggregateMechanism(clip=1.5, noise_multiplier=1.2)
    out = mech.add_noise(np.zeros(40_000), num_parties=3, stream=KeyStream(bytes(range(32))))
    assert np.std(out) == pytest.approx(1.2 * 1.5 / 3, rel=0.03)
    with pytest.raises(ValueError, match="num_parties"):
        mech.noise_std(0)


def test_lab_mode_is_reproducible_and_os_mode_is_not():
    sc = _scenario({"mode": "global", "epsilon": 1.0})
    secret = bytes(range(32))
    assert noise_key(sc, "x", 1, 2, secret=secret) == noise_key(sc, "x", 1, 2, secret=secret)
    assert noise_key(sc, "x", 1, 2, secret=secret) != noise_key(sc, "x", 2, 2, secret=secret)
    # The seed alone (what every message carries) does not give a lab party's key.
    assert noise_key(sc, "x", 1, 2, secret=secret) != noise_key(
        sc, "x", 1, 2, secret=seed_secret(sc)
    )
    assert noise_key(sc, "x", 1, 2, secret=None) != noise_key(sc, "x", 1, 2, secret=None)


def _dnoise(dim, sc, party, scale, n):
    return distributed_noise(
        dim, scenario=sc, party=party, server_round=1, scale=scale, secret=b"lab", min_parties=n
    )


def test_poisson_sampler_matches_reference_pmf():
    """PTRS (fast) against the exact pmf (slow, obviously correct), then a huge λ."""
    ks = KeyStream(bytes(32))
    for lam in (3.5, 40.0):
        x = ks.poisson(lam, 100_000)
        k = np.arange(int(lam * 3 + 30))
        expected = stats.poisson.pmf(k, lam) * x.size
        observed = np.bincount(x, minlength=k.size)[: k.size]
        m = expected > 5
        chi2 = ((observed[m] - expected[m]) ** 2 / expected[m]).sum()
        assert stats.chi2.sf(chi2, m.sum() - 1) > 1e-4
    big = ks.poisson(3e12, 50_000).astype(np.float64)
    assert big.mean() == pytest.approx(3e12, abs=5 * math.sqrt(3e12 / 50_000))
    assert big.var() == pytest.approx(3e12, rel=0.04)


@pytest.mark.parametrize("variance", [2.0, 37.0, 5e4])
def test_skellam_table_sampler_matches_the_skellam_pmf(variance):
    """The CDF-table sampler against scipy's Skellam pmf, and against a plain binary
    search over the same table (the guide table only speeds the search up)."""
    ks = KeyStream(bytes(range(32)))
    x = ks.skellam(variance, 200_000)
    assert x.dtype == np.int64
    sd = math.sqrt(variance)
    if variance < 100:
        k = np.arange(-int(8 * sd) - 5, int(8 * sd) + 6)
        expected = stats.skellam.pmf(k, variance / 2, variance / 2) * x.size
        observed = np.array([(x == v).sum() for v in k])
        m = expected > 5
        chi2 = ((observed[m] - expected[m]) ** 2 / expected[m]).sum()
        assert stats.chi2.sf(chi2, m.sum() - 1) > 1e-4
    assert x.mean() == pytest.approx(0.0, abs=5 * sd / math.sqrt(x.size))
    assert x.var() == pytest.approx(variance, rel=0.02)
    table = skellam_table(variance)
    u = KeyStream(bytes(32)).uint64(100_000)
    u = u[u < table.total]
    u[:2] = [0, table.total - 1]  # the two extreme words: the two ends of the table
    ref = np.searchsorted(table.cdf, u, side="right") - table.width
    assert np.array_equal(table.lookup(u), ref)
    # The map of earlier releases, which folded words above P(X <= 0) onto the negative
    # half: the same draws, so recorded distributed-DP figures stay what they were.
    half = table.cdf[: table.width + 1]
    upper = u >= half[-1]
    v = np.where(upper, np.uint64(table.total - 1) - u, u)
    folded = np.searchsorted(half, v, side="right") - table.width
    assert np.array_equal(ref, np.where(upper, -folded, folded))
    lo, hi = table.lookup(u[:2]).tolist()  # the outermost integers of non-zero mass
    assert lo == -hi and 0 < hi <= table.width


def test_skellam_draws_are_pinned():
    """Known answers: a change of sampler that moved these would move every recorded
    distributed-DP figure."""
    ks = KeyStream(bytes(range(32)))
    assert ks.skellam(5e4, 8).tolist() == [200, 1, 283, -159, 144, 57, -200, -94]
    assert KeyStream(bytes(range(32))).skellam(3.6496e7, 4).tolist() == [5414, 28, 7639, -4284]


def test_skellam_is_reproducible_per_key_and_falls_back_above_the_table():
    a = KeyStream(bytes(32)).skellam(1e6, 1000)
    assert np.array_equal(a, KeyStream(bytes(32)).skellam(1e6, 1000))
    assert not np.array_equal(a, KeyStream(bytes([1]) * 32).skellam(1e6, 1000))
    big = KeyStream(bytes(32)).skellam(4 * SKELLAM_TABLE_MAX_VARIANCE, 20_000)
    assert big.var() == pytest.approx(4 * SKELLAM_TABLE_MAX_VARIANCE, rel=0.05)
    assert not KeyStream(bytes(32)).skellam(0.0, 5).any()
    with pytest.raises(ValueError, match="variance must be >= 0"):
        KeyStream(bytes(32)).skellam(-1.0, 5)


# --------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("mechanism", ["skellam", "discrete-gaussian"])
def test_distributed_sum_has_variance_sigma_c(mechanism):
    n, frac_bits, dim = 5, 16, 30_000
    sc = _scenario(
        {"mode": "distributed", "noise_multiplier": 1.3, "clip": 0.8, "mechanism": mechanism},
        parties=n,
        secure_aggregation="additive",
        secagg={"frac_bits": frac_bits},
    )
    scale = 2.0**frac_bits
    shares = [
        distributed_noise(
            dim, scenario=sc, party=p, server_round=1, scale=scale, secret=b"k", min_parties=n
        )
        for p in range(n)
    ]
    assert all(s.dtype == np.int64 for s in shares)
    assert not np.array_equal(shares[0], shares[1])
    total = np.sum(shares, axis=0) / scale
    assert np.std(total) == pytest.approx(1.3 * 0.8, rel=5 / math.sqrt(2 * dim))
    assert np.std(shares[0] / scale) == pytest.approx(
        1.3 * 0.8 / math.sqrt(n), rel=5 / math.sqrt(2 * dim)
    )
    check_distributed(sc, dim, n)


@pytest.mark.parametrize("mechanism", ["skellam", "discrete-gaussian"])
def test_distributed_sum_wraps_no_more_than_predicted(mechanism):
    n, bits, frac, clip, sigma, dim = 3, 16, 8, 1.0, 50.0, 40_000
    sc = _scenario(
        {
            "mode": "distributed",
            "noise_multiplier": sigma,
            "clip": clip,
            "mechanism": mechanism,
            "max_wrap_probability": 0.5,
        },
        parties=n,
        secure_aggregation="additive",
        secagg={"frac_bits": frac, "ring_bits": bits, "clip_range": 1.0},
    )
    mod, half, s = 2**bits, 2 ** (bits - 1), 2**frac
    # worst-case signal: every party at +clip_range on every coordinate
    signal = np.full(dim, round(1.0 * s), np.int64)
    ring = np.zeros(dim, np.int64)
    for p in range(n):
        ring = (ring + signal + _dnoise(dim, sc, p, s, n)) % mod
    decoded = np.where(ring >= half, ring - mod, ring)
    true = n * signal + np.sum(
        [_dnoise(dim, sc, p, s, n) for p in range(n)],
        axis=0,
    )
    wrapped = np.mean(decoded != true)
    per_coord = wrap_probability_bound(
        dim=1,
        parties=n,
        ring_bits=bits,
        frac_bits=frac,
        clip_range=1.0,
        clip=clip,
        noise_multiplier=sigma,
        mechanism=mechanism,
    )
    assert 0 < wrapped <= per_coord + 4 * math.sqrt(per_coord / dim)
    with pytest.raises(ScenarioError, match=r"defense\.secagg\.ring_bits.*>= \d+"):
        check_distributed(sc.replace(["defense.dp.max_wrap_probability=1e-9"]), 10, n)


def test_check_distributed_names_the_keys_to_change():
    base = {"mode": "distributed", "noise_multiplier": 1.0, "clip": 1.0}
    coarse = _scenario(base, secure_aggregation="additive", secagg={"frac_bits": 2})
    with pytest.raises(
        ScenarioError, match=r"defense\.secagg\.frac_bits.*raise frac_bits to >= \d+"
    ):
        check_distributed(coarse, 10, 4)
    rounding = _scenario(base, secure_aggregation="additive", secagg={"frac_bits": 8})
    with pytest.raises(ScenarioError, match=r"frac_bits.*rounding a 1000000-parameter"):
        check_distributed(rounding, 1_000_000, 4)
    tight = _scenario(
        {**base, "noise_multiplier": 5.0},
        secure_aggregation="additive",
        secagg={"frac_bits": 20, "ring_bits": 26},
    )
    with pytest.raises(ScenarioError, match=r"ring_bits.*clip_range"):
        check_distributed(tight, 1000, 4)
    check_distributed(_scenario(base, secure_aggregation="additive"), 200_000, 4)


def test_distributed_epsilon_close_to_gaussian():
    sc = _scenario({"mode": "distributed", "epsilon": 2.0}, secure_aggregation="masking", rounds=5)
    eps = distributed_epsilon(sc, dim=100_000, rounds=5)
    # σ carries 1% for the grid's rounding (which inflates the sensitivity by < 0.1%
    # here): the budget is never overspent, and little of it is left unspent.
    assert 2.0 * 0.97 <= eps <= 2.0


# --------------------------------------------------------------------------- budget stop


def _node_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        local = ArrayRecord({k: Array(v.numpy() + 0.01) for k, v in msg.content["arrays"].items()})
        return Message(
            RecordDict(
                {"arrays": local, "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.1})}
            ),
            reply_to=msg,
        )

    return app


def test_budget_stop_keeps_results_and_stops_sending():
    per_round = epsilon_spent(noise_multiplier=1.0, sample_rate=1.0, steps=2, delta=1e-5)
    sc = _scenario(
        {"mode": "global", "noise_multiplier": 1.0, "epsilon": per_round * 1.001, "clip": 1.0},
        rounds=5,
    )
    grid = LoopbackGrid(_node_app(), NODES)
    strat = DPGlobalUpdate.from_scenario(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=4), sc, party_of=NODES
    )
    sent: list[int] = []
    original = grid.send_and_receive

    def spy(messages, *a, **k):
        messages = list(messages)
        sent.append(len(messages))
        return original(messages, *a, **k)

    grid.send_and_receive = spy
    result = strat.start(grid, _global(), num_rounds=5, train_config=ConfigRecord())
    assert strat.exhausted
    assert list(strat.epsilon_history) == [1, 2]
    assert strat.epsilon_history[2] <= sc.defense.dp.epsilon
    assert [x for x in sent if x] == [4, 4]  # train rounds 1 and 2 only
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert result.arrays is not None and not np.allclose(result.arrays["w"].numpy(), 0.0)


def test_calibrated_global_budget_lasts_exactly_the_rounds():
    sc = _scenario({"mode": "global", "epsilon": 1.0, "party_sampling_rate": 0.5}, rounds=6)
    sigma = global_noise_multiplier(sc)
    eps = epsilon_spent(noise_multiplier=sigma, sample_rate=0.5, steps=6, delta=1e-5)
    assert 0.99 <= eps <= 1.0


# --------------------------------------------------------------------------- scenario errors


@pytest.mark.parametrize(
    ("dp", "extra", "key"),
    [
        ({"mode": "client"}, {}, "defense.dp.epsilon"),
        ({"mode": "global", "epsilon": 1.0, "delta": 1.5}, {}, "defense.dp.delta"),
        ({"mode": "global", "epsilon": -1.0}, {}, "defense.dp.epsilon"),
        ({"mode": "global", "epsilon": 1.0, "clip": 0.0}, {}, "defense.dp.clip"),
        ({"mode": "global", "epsilon": 1.0, "accountant": "gdp"}, {}, "defense.dp.accountant"),
        ({"mode": "global", "epsilion": 1.0}, {}, "defense.dp.epsilion"),
        ({"mode": "central", "epsilon": 1.0}, {}, "defense.dp.mode"),
        ({"mode": "distributed", "epsilon": 1.0}, {}, "defense.dp.mode"),
        (
            {"mode": "global", "epsilon": 1.0, "clipping": "server"},
            {"secure_aggregation": "additive"},
            "defense.dp.clipping",
        ),
        (
            {"mode": "client", "epsilon": 1.0, "noise_multiplier": 1.0},
            {},
            "defense.dp.noise_multiplier",
        ),
        (
            {"mode": "client", "epsilon": 1.0, "party_sampling_rate": 0.5},
            {},
            "defense.dp.party_sampling_rate",
        ),
        (
            {"mode": "global", "epsilon": 1.0, "party_sampling_rate": 0.0},
            {},
            "defense.dp.party_sampling_rate",
        ),
        (
            {"mode": "distributed", "epsilon": 1.0, "max_wrap_probability": 0.0},
            {"secure_aggregation": "masking"},
            "defense.dp.max_wrap_probability",
        ),
        (
            {"mode": "client", "epsilon": 1.0, "grad_sample_mode": "fast"},
            {},
            "defense.dp.grad_sample_mode",
        ),
    ],
)
def test_misspecified_dp_block_is_a_clear_error(dp, extra, key):
    raw = {"data": {"parties": 4}, "defense": {"dp": dp, **extra}}
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")):
        Scenario.from_dict(raw)


def test_dp_global_update_rejects_other_modes():
    with pytest.raises(ValueError, match="'global' or 'distributed'"):
        DPGlobalUpdate.from_scenario(FedAvg(), _scenario({"mode": "client", "epsilon": 1.0}))
