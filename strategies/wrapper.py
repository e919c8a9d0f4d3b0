"""The base of privfl's wrapper strategies: everything is delegated to ``inner``.

A wrapper (secure aggregation, DP global update, curious or malicious server) overrides
the two or three methods it changes and inherits the rest, the way Flower's own DP
wrappers wrap any strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """A strategy that forwards every call to the strategy it wraps."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to ``inner``."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegated to ``inner``."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to ``inner``."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated to ``inner``."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Delegated to ``inner``."""
        self.inner.summary()


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (through ``.inner``), outermost first."""
    chain = [strategy]
    while hasattr(chain[-1], "inner"):
        chain.append(chain[-1].inner)
    return chain


def weighted_by_key(strategy: Strategy) -> str:
    """The metric the innermost aggregating strategy weighs replies by (FedAvg's
    ``weighted_by_key``; ``num-examples`` for a strategy that has none)."""
    return getattr(strategy_chain(strategy)[-1], "weighted_by_key", "num-examples")
