"""The base of privfl's wrapper strategies: everything is delegated to ``inner``.

A wrapper (secure aggregation, DP global update, curious or malicious server) overrides
the two or three methods it changes and inherits the rest, the way Flower's own DP
wrappers wrap any strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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


class GridProxy(Grid):
    """A Grid that forwards everything to the grid it wraps; an attacker's grid subclasses
    it and overrides the exchanges it watches or rewrites."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward."""
        return self.grid.pull_messages(message_ids)

    def set_run(self, run):  # noqa: ANN001, ANN201 - Flower's signature
        """Forward."""
        return self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's signature
        """Forward."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forward."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forward."""
        return self.grid.get_node_ids()
