"""Flower server strategies: secure aggregation, DP global update, curious and malicious servers."""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it; imported on first use, so importing the
# package costs nothing and no module here is pulled into an import cycle.
_EXPORTS = {
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
