"""The attack wrappers and the honest trainer built from explicit parameters.

Each malicious server is built without a scenario around Flower's FedAvg (under the
honest server's secure aggregation and DP) and runs in process (LoopbackGrid, no Ray)
against privfl's parties; ``from_scenario`` gives the configuration the scenario names.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from privfl.architecture import build_model
from privfl.attacks.active_server import ActiveServerEvaluator
from privfl.attacks.imprint import (
    BIAS_KEY,
    WEIGHT_KEY,
    aggregate_noise_std,
    imprint_bins_of,
    imprinted_samples,
)
from privfl.clients import TrainConfig, make_client_app, train_local
from privfl.config import ACTIVE_ATTACKS, SCENARIO_KEY, Scenario, load_scenario, scenario_dir
from privfl.data import load_federation
from privfl.dp import distributed_noise, seed_secret
from privfl.fixedpoint import FixedPointCodec
from privfl.flower.loopback import LoopbackGrid
from privfl.strategies import (
    DPGlobalUpdate,
    ImprintServer,
    ImprintServerEvaluator,
    SecureAggregation,
    build_strategy,
    strategy_chain,
)
from privfl.strategies.active_server import ACTIVE_SERVERS, downgraded_scenario
from privfl.strategies.wrapper import StrategyWrapper
from privfl.training import local_batches, round_batch_data

SECRET = bytes(range(32))  # the lab secret of the simulated parties
NODES = {100 + p: p for p in range(3)}
# What each attack goes after: one party's input, or every party's.
TOTAL = {
    "downgrade": 3,
    "noise_strip": 3,
    "key_mitm": 1,
    "isolation": 1,
    "round_replay": 3,
    "model_inconsistency": 1,
}


pytestmark = pytest.mark.usefixtures("task_identity", "quiet_flower")


def _honest_server(sc: Scenario) -> Strategy:
    """Flower's FedAvg under the defenses of ``sc`` (the wrappers' own from_scenario)."""
    strategy: Strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    if sc.defense.dp.mode in ("global", "distributed"):
        strategy = DPGlobalUpdate.from_scenario(strategy, sc, party_of=NODES)
    if sc.defense.secure_aggregation != "none":
        strategy = SecureAggregation.from_scenario(strategy, sc, party_of=NODES)
    return strategy


def _run(strategy: Strategy, sc: Scenario, rounds: int) -> None:
    """``rounds`` rounds of ``strategy`` against privfl's parties of ``sc``."""
    grid = LoopbackGrid(make_client_app(sc, secret=SECRET), NODES)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_model(sc, load_federation(sc).num_classes).state_dict()),
        num_rounds=rounds,
        timeout=60.0,
        train_config=ConfigRecord({SCENARIO_KEY: sc.to_json()}),
    )


# --------------------------------------------------------------------------- the trainer


def test_train_config_gives_the_scenarios_batches_and_weights():
    sc = Scenario.from_dict(
        {
            "scenario": {"seed": 5},
            "data": {"samples_per_party": 120},
            "model": {"name": "mlp", "hidden": 16},
            "training": {"local_epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.5},
        }
    )
    config = TrainConfig.from_scenario(sc)
    assert (config.seed, config.local_epochs, config.batch_size, config.momentum) == (5, 2, 16, 0.5)
    explicit = TrainConfig(lr=0.1, momentum=0.5, batch_size=16, local_epochs=2, seed=5)
    assert explicit == config
    for got, want in zip(
        local_batches(100, config, 1, 3), local_batches(100, sc, 1, 3), strict=True
    ):
        assert torch.equal(got, want)
    data = round_batch_data(sc, 0, 1)
    weights = []
    for how in (sc, config):
        model = build_model(sc, 10)
        stats = train_local(model, data, how, party=0, server_round=1, device=torch.device("cpu"))
        weights.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
        assert stats.steps == 2 * -(-len(data) // 16)
    assert torch.equal(weights[0], weights[1])
    # another seed, other batches
    other = local_batches(100, TrainConfig(batch_size=16, seed=6), 1, 3)
    assert not torch.equal(torch.cat(other), torch.cat(local_batches(100, config, 1, 3)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"optimizer": "rmsprop"}, "optimizer"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch")],
)
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# --------------------------------------------------------------------------- imprint


def _imprint_scenario() -> Scenario:
    # One round, the attack round: 3 parties x 8 samples x 1 step in the aggregate.
    return load_scenario(
        scenario_dir() / "imprint_secagg.toml", ["scenario.rounds=1", "attack.imprint.round=1"]
    )


def _explicit_imprint(inner: Strategy, **kwargs: Any) -> ImprintServer:
    return ImprintServer(
        inner,
        attack_round=1,
        sample_shape=(1, 28, 28),
        expected_samples=24,
        local_steps=1,
        batch_size=8,
        lr=1.0,
        rearm=True,
        noise_std=2.0**-20 / np.sqrt(12.0 * 3),
        party_of=NODES,
        **kwargs,
    )


def test_imprint_server_from_scenario_is_the_explicit_server():
    sc = _imprint_scenario()
    im = sc.attack.imprint
    built = ImprintServer.from_scenario(FedAvg(), sc, NODES)
    assert (built.attack_round, built.local_steps, built.batch_size, built.lr, built.rearm) == (
        im.round,
        im.local_steps,
        im.batch_size,
        im.lr,
        im.rearm,
    )
    assert built.sample_shape == load_federation(sc).public.sample_shape
    assert built.expected_samples == imprinted_samples(sc) == 24
    assert built.noise_std == aggregate_noise_std(sc)
    assert built.bins == imprint_bins_of(sc)
    assert isinstance(built.evaluator, ImprintServerEvaluator) and built.evaluator.scenario is sc
    explicit = _explicit_imprint(FedAvg(), bins=imprint_bins_of(sc))
    fields = ("attack_round", "sample_shape", "expected_samples", "local_steps", "batch_size")
    fields += ("lr", "rearm", "noise_std", "bins", "party_of")
    assert {f: getattr(explicit, f) for f in fields} == {f: getattr(built, f) for f in fields}


def test_explicit_imprint_server_runs_a_round_and_scores_like_the_factory():
    sc = _imprint_scenario()
    # bins: read off the block it ships
    explicit = _explicit_imprint(_honest_server(sc), evaluator=ImprintServerEvaluator(sc))
    _run(explicit, sc, rounds=1)
    built = ImprintServer.from_scenario(_honest_server(sc), sc, NODES)
    _run(built, sc, rounds=1)
    (mine,), (theirs,) = explicit.attack_reports(), built.attack_reports()
    assert mine.total == theirs.total == 24
    assert mine.recovered == theirs.recovered > 0
    drop = ("seconds",)
    assert {k: v for k, v in mine.metrics.items() if k not in drop} == {
        k: v for k, v in theirs.metrics.items() if k not in drop
    }
    assert explicit.readouts is not None and explicit.readouts.shape[1:] == (1, 28, 28)


def test_imprint_server_without_evaluator_keeps_readouts_and_asks_plain_apps_by_key():
    shipped = ArrayRecord(
        {
            WEIGHT_KEY: Array(np.zeros((12, 784), np.float32)),
            BIAS_KEY: Array(np.zeros(12, np.float32)),
        }
    )
    seen: list[ConfigRecord] = []

    class Inner(StrategyWrapper):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(config)
            return []

        def aggregate_train(self, server_round, replies):
            return shipped, None

    server = _explicit_imprint(Inner(None))
    server.configure_train(1, shipped, ConfigRecord({"lr": 0.01, "epochs": 3}), None)
    out, _ = server.aggregate_train(1, [])
    # a ClientApp without privfl's scenario reads the attack round's training by key
    assert dict(seen[0]) == {"lr": 1.0, "epochs": 3, "local-steps": 1, "batch-size": 8}
    assert out is not None and not out[WEIGHT_KEY].numpy().any()  # the model sent stays
    assert server.attack_reports() == [] and server.readouts is not None
    with pytest.raises(ValueError, match="attack_round"):
        ImprintServer(FedAvg(), attack_round=0, sample_shape=(4,), expected_samples=1)


# --------------------------------------------------------------------------- active servers


def _active_scenario(method: str) -> Scenario:
    return load_scenario(scenario_dir() / f"server_{method}.toml", ["party.trust_server=true"])


def _own_options(method: str, sc: Scenario) -> dict[str, Any]:
    """What each attack needs of its own, built by hand."""
    if method == "downgrade":
        return {"request": {SCENARIO_KEY: downgraded_scenario(sc).to_json()}}
    if method == "noise_strip":
        share = partial(
            distributed_noise,
            scenario=sc,
            scale=FixedPointCodec.from_section(sc.defense.secagg).scale,
            secret=seed_secret(sc),
            min_parties=3,
        )
        return {"noise_share": share}
    if method == "model_inconsistency":
        fed = load_federation(sc)
        return {"model": build_model(sc, fed.num_classes), "probe": fed.public.images[:64]}
    return {}


@pytest.mark.parametrize("method", sorted(ACTIVE_ATTACKS))
def test_active_server_from_scenario_is_the_explicit_server(method):
    sc = _active_scenario(method)
    settings = sc.attack.active_server
    cls = ACTIVE_SERVERS[method]
    built = cls.from_scenario(_honest_server(sc), sc, party_of=NODES)
    explicit = cls(
        _honest_server(sc),
        party_of=NODES,
        attack_round=settings.round,
        target_party=settings.target_party,
        timeout=sc.scenario.timeout,
        **_own_options(method, sc),
    )
    for server in (built, explicit):
        assert (server.attack_round, server.target) == (settings.round, settings.target_party)
        assert server.codec == FixedPointCodec.from_section(sc.defense.secagg)
        assert server.timeout == sc.scenario.timeout
        # the attacker's own messages carry the scenario as privfl's parties expect it
        assert server.message_config == {SCENARIO_KEY: sc.to_json()}
        assert server.party_of == NODES
    assert isinstance(built.evaluator, ActiveServerEvaluator) and explicit.evaluator is None
    if method == "downgrade":
        assert built.request == explicit.request
    if method == "noise_strip":
        a = built.noise_share(50, party=1, server_round=1)
        assert np.array_equal(a, explicit.noise_share(50, party=1, server_round=1))
    if method == "model_inconsistency":
        assert torch.equal(built._probe, explicit._probe)
        for (k, v), (k2, v2) in zip(
            built._model.state_dict().items(), explicit._model.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2)
    # the factory builds the same class around the same honest server
    chain = strategy_chain(build_strategy(sc, NODES))
    assert type(chain[0]) is cls and type(chain[1]) is SecureAggregation


@pytest.mark.parametrize("method", sorted(ACTIVE_ATTACKS))
def test_explicit_active_server_runs_against_trusting_parties(method):
    sc = _active_scenario(method)
    settings = sc.attack.active_server
    server = ACTIVE_SERVERS[method](
        _honest_server(sc),
        party_of=NODES,
        attack_round=settings.round,
        target_party=settings.target_party,
        timeout=60.0,
        evaluator=ActiveServerEvaluator(sc),
        **_own_options(method, sc),
    )
    _run(server, sc, rounds=settings.round)
    (report,) = server.attack_reports()
    assert report.name == method and report.total == TOTAL[method]
    assert report.recovered == TOTAL[method], report.notes
    assert report.metrics["trust_server"] == 1.0 and report.metrics["refusals"] == 0


@pytest.mark.parametrize(
    ("method", "inner", "match"),
    [
        ("key_mitm", lambda: FedAvg(), "SecureAggregation"),
        ("round_replay", lambda: FedAvg(), "masking"),
        ("noise_strip", lambda: FedAvg(), "DPGlobalUpdate"),
    ],
)
def test_explicit_active_server_names_what_it_needs_inside(method, inner, match):
    sc = _active_scenario(method)
    with pytest.raises(ValueError, match=match):
        ACTIVE_SERVERS[method](inner(), party_of=NODES, attack_round=1, **_own_options(method, sc))


def test_active_server_without_evaluator_reports_nothing():
    sc = _active_scenario("isolation")
    server = ACTIVE_SERVERS["isolation"](_honest_server(sc), party_of=NODES, attack_round=1)
    assert server.attack_reports() == []
    assert server.codec == FixedPointCodec.from_section(sc.defense.secagg)
