"""Flower server strategies: secure aggregation, DP global update, curious and malicious
servers, and the factory that builds them from a scenario.

``SecureAggregation``, ``DPGlobalUpdate``, ``ImprintServer`` and the malicious servers of
``active_server`` wrap any ``flwr.serverapp.strategy.Strategy`` and take explicit
parameters (``from_scenario`` reads them from a scenario); ``build_strategy(scenario,
party_of)`` is the one place a scenario is read."""

from __future__ import annotations

from privfl.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "SecureAggregation": "privfl.strategies.secure_aggregation",
        "SecureAggregationError": "privfl.strategies.secure_aggregation",
        "curious_read": "privfl.flower.wire",
        "DPGlobalUpdate": "privfl.strategies.dp_global",
        "CuriousServer": "privfl.strategies.curious_server",
        "ImprintServer": "privfl.strategies.imprint_server",
        "ImprintServerEvaluator": "privfl.evaluation.imprint",
        "ActiveServer": "privfl.strategies.active_server",
        "DowngradeServer": "privfl.strategies.active_server",
        "NoiseStripServer": "privfl.strategies.active_server",
        "KeyMitmServer": "privfl.strategies.active_server",
        "IsolationServer": "privfl.strategies.active_server",
        "RoundReplayServer": "privfl.strategies.active_server",
        "ModelInconsistencyServer": "privfl.strategies.active_server",
        "build_active_server": "privfl.strategies.active_server",
        "StrategyWrapper": "privfl.strategies.wrapper",
        "GridProxy": "privfl.flower.transcript",
        "strategy_chain": "privfl.strategies.wrapper",
        "FederationRounds": "privfl.strategies.rounds",
        "aggregate_metrics": "privfl.strategies.rounds",
        "build_strategy": "privfl.strategies.factory",
        "aggregation_strategy": "privfl.strategies.factory",
        "BUILTIN_STRATEGIES": "privfl.strategies.factory",
    },
)
