"""The one place a scenario becomes server strategies.

Every strategy and wrapper of :mod:`privfl.strategies` takes explicit parameters and
wraps any ``flwr.serverapp.strategy.Strategy``; :func:`build_strategy` reads the
scenario and composes them, outermost first: the attack wrapper (it *is* the server and
sees what the server sees) ⊃ :class:`SecureAggregation` ⊃ :class:`DPGlobalUpdate` ⊃
:class:`FederationRounds` ⊃ the aggregation strategy of ``[strategy]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from privfl.config import Scenario, ScenarioError
from privfl.plugins import call_object, check_kwargs, is_plugin_spec, load_object
from privfl.strategies.dp_global import DPGlobalUpdate
from privfl.strategies.rounds import FederationRounds, aggregate_metrics
from privfl.strategies.secure_aggregation import SecureAggregation

# ``strategy.name`` -> Flower's class.
BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Aggregators that rank, select or reweight single updates: they cannot work on a secure
# sum (the server holds one aggregate), and party-level DP calibrates its noise to a mean.
PER_UPDATE_AGGREGATORS: tuple[type[Strategy], ...] = (
    FedMedian,
    FedTrimmedAvg,
    MultiKrum,
    Bulyan,
    QFedAvg,
)


def strategy_class(scenario: Scenario) -> type[Strategy]:
    """The class ``strategy.name`` names: a built-in or a user's ``module:Class``."""
    name = scenario.strategy.name
    if not is_plugin_spec(name):
        return BUILTIN_STRATEGIES[name]
    cls = load_object(name, "strategy.name")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ScenarioError(
            f"strategy.name: {name!r} is not a subclass of flwr.serverapp.strategy.Strategy"
        )
    return cls


def _privfl_kwargs(cls: type[Strategy], parties: int, evaluate: bool) -> dict[str, Any]:
    """What privfl sets on the aggregation strategy, where its class accepts it: every
    party trains and evaluates each round, and metrics some parties withhold (a DP
    party's loss) are averaged over those that report them."""
    wanted: dict[str, Any] = {
        "fraction_evaluate": 1.0 if evaluate else 0.0,
        "min_train_nodes": parties,
        "min_evaluate_nodes": parties,
        "min_available_nodes": parties,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    params = inspect.signature(cls).parameters
    # A FedAvg subclass taking **kwargs forwards them to FedAvg.
    forwards = issubclass(cls, FedAvg) and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    return {k: v for k, v in wanted.items() if k in params or forwards}


def aggregation_strategy(scenario: Scenario, *, evaluate: bool = True) -> Strategy:
    """The ``[strategy]`` class, built with its keys as keyword arguments."""
    cls = strategy_class(scenario)
    robust = issubclass(cls, PER_UPDATE_AGGREGATORS)
    sa, dp_mode = scenario.defense.secure_aggregation, scenario.defense.dp.mode
    if robust and (sa != "none" or dp_mode in ("global", "distributed")):
        what = (
            f"defense.secure_aggregation = {sa!r} (the server sees only the sum)"
            if sa != "none"
            else f"defense.dp.mode = {dp_mode!r} (the noise is calibrated to a mean)"
        )
        raise ScenarioError(
            f"strategy.name: {scenario.strategy.name!r} needs the parties' single updates "
            f"(it ranks, selects or reweights them), which cannot work with {what}"
        )
    supplied = _privfl_kwargs(cls, scenario.data.parties, evaluate)
    options = scenario.strategy.options
    check_kwargs(cls, options, "strategy", supplied=supplied)
    return call_object(cls, "strategy.name", **supplied, **options)


def build_strategy(
    scenario: Scenario, party_of: Mapping[int, int], *, roster: Mapping[int, bytes] | None = None
) -> Strategy:
    """The server strategy a scenario asks for (see the module docstring for the order).

    ``roster`` is the federation's public roster (party -> identity public key), where the
    server holds it: masking then needs no key registration from the parties on it.

    Errors in ``[strategy]`` (an unknown class, a keyword its class does not take, an
    error raised while building it) are :class:`~privfl.config.ScenarioError` naming the key.
    """
    # The parties' evaluation policy is public: a server does not ask for what they withhold.
    ev = scenario.party.evaluation
    withheld = ev == "withhold" or (ev == "auto" and scenario.defense.dp.mode != "none")
    strategy: Strategy = FederationRounds(
        aggregation_strategy(scenario, evaluate=not withheld),
        evaluate=not withheld,
        party_of=party_of,
        parties_per_round=scenario.scenario.parties_per_round,
        seed=scenario.scenario.seed,
    )
    if scenario.defense.dp.mode in ("global", "distributed"):
        strategy = DPGlobalUpdate.from_scenario(strategy, scenario, party_of=party_of)
    if scenario.defense.secure_aggregation != "none":
        strategy = SecureAggregation.from_scenario(
            strategy, scenario, party_of=party_of, roster=roster
        )
    if scenario.attack.kind == "gradient-inversion":
        from privfl.strategies.curious_server import CuriousServer  # imports the attacks

        strategy = CuriousServer(strategy, scenario=scenario, party_of=party_of)
    elif scenario.attack.kind == "active-server":
        from privfl.strategies.active_server import build_active_server  # imports the attacks

        strategy = build_active_server(strategy, scenario=scenario, party_of=party_of)
    elif scenario.attack.kind == "imprint" and scenario.attack.imprint.role == "malicious-server":
        from privfl.strategies.imprint_server import ImprintServer  # imports the attacks

        strategy = ImprintServer.from_scenario(strategy, scenario, party_of=party_of)
    return strategy
