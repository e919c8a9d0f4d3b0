"""Flower server strategies: secure aggregation, DP global update, curious and malicious servers."""

from __future__ import annotations

from privfl.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "SecureAggregation": "privfl.strategies.secure_aggregation",
        "SecureAggregationError": "privfl.strategies.secure_aggregation",
        "curious_read": "privfl.strategies.secure_aggregation",
        "DPGlobalUpdate": "privfl.strategies.dp_global",
        "CuriousServer": "privfl.strategies.curious_server",
        "ImprintServer": "privfl.strategies.imprint_server",
        "ActiveServer": "privfl.strategies.active_server",
        "build_active_server": "privfl.strategies.active_server",
        "StrategyWrapper": "privfl.strategies.wrapper",
        "GridProxy": "privfl.strategies.wrapper",
    },
)
