"""The isolation: re-run a finished additive sum without the target and subtract it."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import Score
from privfl.config import Scenario
from privfl.flower import wire
from privfl.secagg.additive import AdditiveServer, RoundAbortedError
from privfl.strategies.active_server.base import ActiveServer, Exchange


def _vectors(ex: Exchange) -> dict[int, np.ndarray]:
    """The ring vectors the parties sent back in ``ex``."""
    return {p: v for p, c in ex.received.items() if (v := wire.read_vector(c)) is not None}


class IsolationServer(ActiveServer):
    """After a finished round, sum everyone but the target again (additive).

    The server alone sends a re-share and a partial-sum request for all parties but the
    target, as if the target had dropped out, and subtracts that sum from the round's:
    what is left is the target's encoded input (its weighted update, its number of
    examples and loss). Stopped by parties that refuse to re-share once they released a
    partial sum in the round, and sums smaller than ``party.min_parties``.
    """

    method = "isolation"

    def __init__(self, inner: Strategy, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self._require_protocol("additive")
        if len(self.party_of) < 3:
            raise ValueError("IsolationServer needs >= 3 parties (a sum of the others)")
        self.recovered: np.ndarray | None = None

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        cls._require(
            scenario.defense.secure_aggregation == "additive",
            'defense.secure_aggregation = "additive"',
        )
        cls._require(scenario.data.parties >= 3, "data.parties >= 3 (a sum of the others)")

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_round(server_round, replies)
        if server_round == self.attack_round and arrays is not None:
            self._isolate(server_round)
        return arrays, metrics

    def _isolate(self, server_round: int) -> None:
        done = next(
            (
                ex
                for ex in reversed(self.transcript.get(server_round, []))
                if ex.message_type == wire.PARTIAL_SUM
            ),
            None,
        )
        if done is None:
            self._failed(server_round, "the round ran no partial-sum stage")
            return
        cfg = done.config()
        parties = wire.ids(cfg[wire.PREFIX + "parties"])
        dim = int(cfg[wire.PREFIX + "dim"])
        server = AdditiveServer(self.codec)
        partials = {
            p: v for p, c in done.received.items() if (v := wire.read_vector(c)) is not None
        }
        others = [p for p in parties if p != self.target]
        attempt = int(cfg[wire.PREFIX + "attempt"]) + 1
        try:
            total = server.combine(partials, parties, dim)
            ask = {wire.PREFIX + "attempt": attempt, wire.PREFIX + "parties": others}
            got = self._exchange(server_round, wire.RESHARE, {p: ask for p in others})
            routed = server.route(
                {p: wire.unpack_shares(c) for p, c in got.received.items()}, others
            )
            ask = {**ask, wire.PREFIX + "dim": dim}
            got = self._exchange(
                server_round,
                wire.PARTIAL_SUM,
                {p: ask for p in others},
                {p: {wire.SHARES: wire.pack_shares(routed[p])} for p in others},
            )
            sub = server.combine(_vectors(got), others, dim)
        except RoundAbortedError as exc:
            self._failed(server_round, f"the sum without party {self.target}: {exc}")
            return
        self.recovered = self.codec.decode(self.codec.sub(total, sub))

    def _evaluate(self) -> Score:
        assert self.evaluator is not None
        rnd = self.attack_round
        return self.evaluator.score_input(self.target, rnd, self.sent.get(rnd), self.recovered)
