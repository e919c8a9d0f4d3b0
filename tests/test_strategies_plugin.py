"""Bring your own strategy: the ``[strategy]`` key, the factory, and privfl's wrappers
around Flower's strategies in a plain Flower app."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, Strategy

from privfl.clients import (
    SecAggSettings,
    make_clip_update_mod,
    make_secagg_mod,
    register_secure_aggregation,
)
from privfl.config import SCENARIO_KEY, STRATEGIES, Scenario, ScenarioError
from privfl.fixedpoint import FixedPointCodec
from privfl.flower.loopback import LoopbackGrid
from privfl.plugins import load_object
from privfl.server import run_federation
from privfl.strategies import (
    BUILTIN_STRATEGIES,
    DPGlobalUpdate,
    FederationRounds,
    SecureAggregation,
    build_strategy,
    strategy_chain,
)
from privfl.training import round_batch_data, train_local

NODES = {100 + i: i for i in range(3)}


def _scenario(strategy=None, **sections) -> Scenario:
    raw = {
        "scenario": {"rounds": 2, "seed": 3},
        "data": {"parties": 3, "samples_per_party": 48, "server_test_samples": 60},
        "model": {"name": "mlp", "hidden": 16},
        "training": {"local_steps": 2, "batch_size": 8, "lr": 0.1},
        "defense": {"secure_aggregation": "none"},
        **sections,
    }
    if strategy is not None:
        raw["strategy"] = strategy
    return Scenario.from_dict(raw)


# --------------------------------------------------------------------------- a user's strategy


class ServerMomentum(FedAvg):
    """FedAvg with server momentum (FedAvgM): what a user writes in their own module."""

    def __init__(self, *, server_momentum: float = 0.9, server_lr: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.server_momentum = server_momentum
        self.server_lr = server_lr
        self.velocity: dict[str, np.ndarray] | None = None
        self._global: dict[str, np.ndarray] = {}
        self.rounds_aggregated = 0

    def configure_train(self, server_round, arrays, config, grid):
        self._global = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        step = {k: v.numpy() - self._global[k] for k, v in arrays.items()}
        if self.velocity is None:
            self.velocity = step
        else:
            self.velocity = {k: self.server_momentum * self.velocity[k] + step[k] for k in step}
        self.rounds_aggregated += 1
        new = {k: self._global[k] + self.server_lr * self.velocity[k] for k in step}
        return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in new.items()}), metrics


class Exploding(FedAvg):
    def __init__(self, **kwargs):
        raise RuntimeError("no GPU for my strategy")


class NotAStrategy:
    pass


class MyMedian(FedMedian):
    pass


SPEC = f"{__name__}:ServerMomentum"


def test_every_builtin_name_builds_flowers_class():
    assert set(BUILTIN_STRATEGIES) == set(STRATEGIES)
    for name, cls in BUILTIN_STRATEGIES.items():
        strategy = build_strategy(_scenario({"name": name}), NODES)
        chain = strategy_chain(strategy)
        assert isinstance(chain[0], FederationRounds)
        assert type(chain[-1]) is cls
        assert chain[-1].min_available_nodes == 3 and chain[-1].min_train_nodes == 3


def test_default_is_fedavg_and_keys_are_keyword_arguments():
    assert type(strategy_chain(build_strategy(_scenario(), NODES))[-1]) is FedAvg
    sc = _scenario({"name": "fedadam", "eta": 0.05, "beta_1": 0.8})
    adam = strategy_chain(build_strategy(sc, NODES))[-1]
    assert isinstance(adam, FedAdam) and adam.eta == 0.05 and adam.beta_1 == 0.8
    # the keys survive the scenario's JSON round trip (it travels in every message)
    assert Scenario.from_json(sc.to_json()).strategy.options == {"eta": 0.05, "beta_1": 0.8}
    prox = strategy_chain(build_strategy(_scenario({"name": "fedprox", "proximal_mu": 0.1}), NODES))
    assert isinstance(prox[-1], FedProx) and prox[-1].proximal_mu == 0.1
    sc = _scenario(
        {"name": "fedavgm", "server_momentum": 0.9},
        defense={"secure_aggregation": "masking", "dp": {"mode": "distributed", "epsilon": 3.0}},
    )
    avgm = strategy_chain(build_strategy(sc, NODES))
    assert isinstance(avgm[-1], FedAvgM) and avgm[-1].server_momentum == 0.9


def test_plugin_class_is_built_under_the_wrappers():
    sc = _scenario(
        {"name": SPEC, "server_momentum": 0.5},
        defense={"secure_aggregation": "additive", "dp": {"mode": "global", "epsilon": 5.0}},
    )
    chain = strategy_chain(build_strategy(sc, NODES))
    assert [type(s) for s in chain] == [
        SecureAggregation,
        DPGlobalUpdate,
        FederationRounds,
        ServerMomentum,
    ]
    assert chain[-1].server_momentum == 0.5 and chain[-1].min_available_nodes == 3


@pytest.mark.parametrize(
    ("strategy", "defense", "key", "what"),
    [
        ({"name": "fedbogus"}, {}, "strategy.name", "unknown strategy"),
        ({"name": "fedavg:"}, {}, "strategy.name", "unknown strategy"),
        ({"name": "fedavg", "fraction_trian": 1.0}, {}, "strategy.fraction_trian", "unknown"),
        ({"name": "fedavg", "min_train_nodes": 2}, {}, "strategy.min_train_nodes", "set by"),
        ({"name": "no_such_module_xyz:Thing"}, {}, "strategy.name", "no module named"),
        ({"name": f"{__name__}:Nope"}, {}, "strategy.name", "has no attribute 'Nope'"),
        ({"name": f"{__name__}:NotAStrategy"}, {}, "strategy.name", "not a subclass"),
        ({"name": f"{__name__}:Exploding"}, {}, "strategy.name", "no GPU for my strategy"),
        ({"name": SPEC, "momentum": 0.9}, {}, "strategy.momentum", "server_momentum"),
        (
            {"name": "krum"},
            {"secure_aggregation": "additive"},
            "strategy.name",
            "only ever sees their sum",
        ),
        (
            {"name": "fedmedian"},
            {"dp": {"mode": "global", "epsilon": 1.0}},
            "strategy.name",
            "mean of clipped",
        ),
        (
            {"name": f"{__name__}:MyMedian"},
            {"secure_aggregation": "masking"},
            "strategy.name",
            "sum",
        ),
        (
            {"name": "flwr.serverapp.strategy:QFedAvg"},
            {"secure_aggregation": "additive"},
            "strategy.name",
            "single updates",
        ),
        (
            {"name": "fedprox"},
            {"dp": {"mode": "client", "epsilon": 1.0}},
            "strategy.name",
            "DP-SGD",
        ),
        ({"name": "fedavg", "when": {"a": float("nan")}}, {}, "strategy.when", "must be"),
    ],
)
def test_bad_strategy_settings_name_the_key(strategy, defense, key, what):
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")) as err:
        build_strategy(
            _scenario(strategy, defense={"secure_aggregation": "none", **defense}), NODES
        )
    assert what in str(err.value)


def test_plugin_module_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "lab_strategy_mod.py").write_text(
        textwrap.dedent(
            """
            from flwr.serverapp.strategy import FedAvg

            class Mine(FedAvg):
                pass
            """
        )
    )
    (tmp_path / "broken_mod.py").write_text("import not_installed_anywhere_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".")])
    assert load_object("lab_strategy_mod:Mine", "strategy.name").__name__ == "Mine"
    with pytest.raises(ScenarioError, match=r"strategy\.name: importing 'broken_mod' failed"):
        load_object("broken_mod:X", "strategy.name")


def test_readme_imports_work():
    from privfl.strategies import CuriousServer  # named in the README

    assert issubclass(CuriousServer, Strategy)


# --------------------------------------------------------------------------- FedProx on the party


def test_proximal_term_keeps_the_party_near_the_global_model():
    from privfl.architecture import build_model

    sc = _scenario(training={"local_steps": 6, "batch_size": 8, "lr": 0.5})
    data = round_batch_data(sc, 0, 1)
    drift = {}
    for mu in (0.0, 1.0):
        model = build_model(sc, 10)
        start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        cpu = torch.device("cpu")
        train_local(model, data, sc, party=0, server_round=1, device=cpu, proximal_mu=mu)
        after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        drift[mu] = float((after - start).norm())
    assert 0 < drift[1.0] < 0.8 * drift[0.0]


# --------------------------------------------------------------------------- a plain Flower app

DIM, CLASSES = 8, 2


def _party_data(party: int) -> tuple[np.ndarray, np.ndarray]:
    # Public toy data (not a secret): two Gaussian blobs, a different mix per party.
    rng = np.random.default_rng(10 + party)
    y = (rng.random(120) < 0.3 + 0.2 * party).astype(np.int64)
    x = rng.normal(0.0, 1.0, (120, DIM)) + 1.5 * (2 * y[:, None] - 1)
    return x.astype(np.float32), y


def _loss_acc(arrays: ArrayRecord, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    w, b = arrays["w"].numpy(), arrays["b"].numpy()
    logits = torch.from_numpy(x @ w.T + b)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    return float(loss), float((logits.argmax(1).numpy() == y).mean())


def _plain_client_app(clip: float, settings: SecAggSettings) -> ClientApp:
    """A user's own ClientApp: logistic regression on its own data, privfl's mods."""
    app = ClientApp()

    @app.train(mods=[make_secagg_mod(settings=settings), make_clip_update_mod(clip)])
    def train(msg: Message, context: Context) -> Message:
        x, y = _party_data(int(context.node_config["partition-id"]))
        arrays = msg.content["arrays"]
        # Flower's FedAdam returns float64 arrays (NumPy 2 promotion): train in float32.
        w = torch.tensor(arrays["w"].numpy(), dtype=torch.float32, requires_grad=True)
        b = torch.tensor(arrays["b"].numpy(), dtype=torch.float32, requires_grad=True)
        opt = torch.optim.SGD([w, b], lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                torch.from_numpy(x) @ w.T + b, torch.from_numpy(y)
            )
            loss.backward()
            opt.step()
        out = ArrayRecord({"w": Array(w.detach().numpy()), "b": Array(b.detach().numpy())})
        metrics = MetricRecord({"num-examples": len(y), "train-loss": float(loss)})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    register_secure_aggregation(app, settings=settings)
    return app


class SpyFedAdam(FedAdam):
    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen = [
            (len(r.content.array_records), r.content["metrics"]["num-examples"]) for r in replies
        ]
        return super().aggregate_train(server_round, replies)


class ConfigGrid(LoopbackGrid):
    """Keeps every config the server sends and every reply content it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configs: list[dict] = []
        self.received: list[RecordDict] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            self.configs.extend(dict(c) for c in m.content.config_records.values())
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.received.extend(r.content for r in replies if r.has_content())
        return replies


@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_plain_flower_app_trains_fedadam_under_secure_aggregation_and_dp(protocol):
    # No privfl scenario anywhere: both sides are built with explicit parameters. Without
    # a roster a masking party registers a random static key of its own.
    codec = FixedPointCodec(clip_range=4.0, frac_bits=20, ring_bits=62)
    party_settings = SecAggSettings(protocol=protocol, codec=codec, equal_weights=True)
    adam = SpyFedAdam(
        fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3, eta=0.3, tau=1e-2
    )
    dp = DPGlobalUpdate(
        adam,
        noise_multiplier=0.05,
        clipping_norm=2.0,
        delta=1e-5,
        secure_aggregation=True,
        noise_seed=0,
    )
    strategy = SecureAggregation(
        dp,
        party_of=NODES,
        protocol=protocol,
        codec=codec,
        release_train_loss=False,
    )
    grid = ConfigGrid(_plain_client_app(2.0, party_settings), NODES)
    rng = np.random.default_rng(0)
    initial = ArrayRecord(
        {
            "w": Array((0.01 * rng.normal(size=(CLASSES, DIM))).astype(np.float32)),
            "b": Array(np.zeros(CLASSES, np.float32)),
        }
    )
    xs, ys = zip(*(_party_data(p) for p in range(3)), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    result = strategy.start(
        grid,
        initial,
        num_rounds=4,
        train_config=ConfigRecord(),
    )
    assert grid.configs and not any(SCENARIO_KEY in c for c in grid.configs)
    assert not strategy.faults and not grid.errors, (strategy.faults, grid.errors)
    loss0, acc0 = _loss_acc(initial, x, y)
    loss1, acc1 = _loss_acc(result.arrays, x, y)
    assert loss1 < 0.5 * loss0 and acc1 > max(acc0, 0.9)
    # FedAdam took its server step from one privatised aggregate of 3 parties (weight 1 each)
    assert adam.seen == [(1, 3)] and adam.m_t is not None
    assert sorted(dp.epsilon_history) == [1, 2, 3, 4] and dp.epsilon > 0
    # the server never held a party's weights: only protocol payloads
    assert grid.received and all("arrays" not in c for c in grid.received)
    assert not grid.errors
    setup = [c for c in grid.configs if c.get("privfl.secagg.stage") == "advertise"]
    assert len(setup) == 3  # key setup once per party, in the first round


def test_dp_adds_noise_before_the_server_optimiser():
    # Without secure aggregation the inner strategy still gets one privatised reply.
    adam = SpyFedAdam(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    dp = DPGlobalUpdate(adam, noise_multiplier=1.0, clipping_norm=0.5, delta=1e-5, noise_seed=1)
    base = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(dp.configure_train(1, base, ConfigRecord(), _FakeGrid()))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.full(4, 1.0 + i, np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10 * (i + 1)}),
                }
            ),
            reply_to=msg,
        )
        for i, msg in enumerate(sent)
    ]
    arrays, metrics = dp.aggregate_train(1, replies)
    assert adam.seen == [(1, 3)]
    assert arrays is not None and metrics["epsilon"] > 0


class _FakeGrid:
    def get_node_ids(self):
        return list(NODES)


# --------------------------------------------------------------------------- privfl's runner


def test_scenario_with_a_plugin_strategy_runs(tmp_path):
    sc = _scenario({"name": SPEC, "server_momentum": 0.5}, scenario={"rounds": 2, "seed": 3})
    from privfl.clients.app import make_client_app

    grid = LoopbackGrid(make_client_app(sc), NODES)
    results = run_federation(grid, sc, tmp_path / "run", progress=False)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["config"]["strategy"] == {"name": SPEC, "server_momentum": 0.5}
    assert (tmp_path / "run" / "results.json").is_file()


def test_worked_example_builds(monkeypatch):
    from privfl.config import load_scenario

    example = Path(__file__).resolve().parent.parent / "examples" / "custom_strategy"
    monkeypatch.chdir(example)
    monkeypatch.setattr("sys.path", list(sys.path))  # load_object adds the working dir
    sc = load_scenario(example / "scenario.toml")
    chain = strategy_chain(build_strategy(sc, NODES))
    assert type(chain[0]) is SecureAggregation
    assert type(chain[-1]).__name__ == "ServerMomentum" and chain[-1].server_momentum == 0.5


def test_cli_reports_a_bad_strategy_key_before_running(tmp_path, capsys):
    from privfl.cli import main as cli_main

    args = ["run", "three_hospitals", "--set", "strategy.name=fedadam", "--set", "strategy.etta=1"]
    assert cli_main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "privfl: error: strategy.etta: unknown parameter" in err and "eta" in err
    assert not (tmp_path / "r").exists()


def test_dp_budget_can_end_the_run_the_flower_way():
    from flwr.serverapp.exception import PrivacyBudgetExhausted

    adam = FedAdam(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    dp = DPGlobalUpdate(
        adam,
        noise_multiplier=1.0,
        clipping_norm=1.0,
        delta=1e-5,
        epsilon_budget=0.01,
        on_exhausted="raise",
    )
    base = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    with pytest.raises(PrivacyBudgetExhausted, match="past 0.01"):
        dp.configure_train(1, base, ConfigRecord(), _FakeGrid())
    assert dp.exhausted


def test_party_with_own_settings_never_releases_in_the_clear():
    from privfl.clients.secagg import SecAggClientError

    LoopbackGrid(lambda m, c: m, {})  # sets Flower's run identity for a bare Message
    mod = make_secagg_mod(settings=SecAggSettings())
    base = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    msg = Message(
        RecordDict({"arrays": base, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=100,
        message_type="train",
    )
    ctx = Context(
        run_id=1, node_id=100, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    trained = []
    with pytest.raises(SecAggClientError, match="only inside secure aggregation"):
        mod(msg, ctx, lambda m, c: trained.append(m))
    assert not trained


@pytest.mark.parametrize(
    ("strategy", "protocol"),
    [
        ({"name": "fedadam", "eta": 0.01}, "additive"),
        ({"name": "fedprox", "proximal_mu": 0.1}, "none"),
    ],
)
def test_flower_strategies_run_with_privfls_parties(tmp_path, strategy, protocol):
    from privfl.clients.app import make_client_app

    sc = _scenario(
        strategy,
        defense={"secure_aggregation": protocol},
        training={"local_steps": 8, "batch_size": 8, "lr": 0.1},
    )
    grid = LoopbackGrid(make_client_app(sc), NODES)
    results = run_federation(grid, sc, tmp_path / "run", progress=False)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert not any("faults" in r for r in results["rounds"])
    assert results["final"]["loss"] < results["round_0"]["loss"]


def test_released_model_keeps_the_dtypes_it_was_sent_with():
    class Promoting(FedAvg):
        def aggregate_train(self, server_round, replies):
            return ArrayRecord({"w": Array(np.ones(3, np.float64))}), MetricRecord()

    rounds = FederationRounds(Promoting())
    sent = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    rounds.configure_train(1, sent, ConfigRecord(), _FakeGrid())
    arrays, _ = rounds.aggregate_train(1, [])
    assert arrays["w"].numpy().dtype == np.float32
    np.testing.assert_array_equal(arrays["w"].numpy(), 1.0)
