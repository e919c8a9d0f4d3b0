"""The round replay: run a finished masking round again so its pairwise masks repeat."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import Score
from privfl.config import Scenario
from privfl.flower import wire
from privfl.secagg import prg, shamir
from privfl.strategies.active_server.base import ActiveServer, Exchange
from privfl.strategies.secure_aggregation import (
    SecureAggregationError,
)


class RoundReplayServer(ActiveServer):
    """Run a finished round again, same round number, same session (masking).

    The pairwise masks of a round depend on the static keys, the session and the round
    number only, and the unmask stage reveals every self mask: ``y - PRG(b) = x + M``
    with the same pairwise mask sum ``M`` both times. The replay sends the round's own aggregate as
    the global model, so the difference of the two unmasked inputs is each party's
    ``x - x'`` for two different models. Stopped by parties that never train twice in a
    round.
    """

    method = "round_replay"
    targets_one_party = False

    def __init__(self, inner: Strategy, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self._require_protocol("masking")
        self.replayed: ArrayRecord | None = None
        self.differences: dict[int, np.ndarray] = {}

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        cls._require(
            scenario.defense.secure_aggregation == "masking",
            'defense.secure_aggregation = "masking"',
        )

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_round(server_round, replies)
        if server_round == self.attack_round and arrays is not None:
            self._replay(server_round, arrays)
        return arrays, metrics

    def _self_masked(self, exchanges: list[Exchange]) -> dict[int, np.ndarray]:
        """``y - PRG(b)`` of every party whose masked input and self-mask seed were seen."""
        train = next((ex for ex in exchanges if ex.message_type == "train"), None)
        unmask = next((ex for ex in exchanges if ex.message_type == wire.UNMASK), None)
        if train is None or unmask is None:
            return {}
        revealed: dict[int, dict[int, bytes]] = {}
        for holder, content in unmask.received.items():
            rec = content.config_records.get(wire.PAYLOAD)
            for owner, share in (wire.unpack_cts(rec, "b_") if rec else {}).items():
                # Shamir x-coordinates are party index + 1 (privfl.secagg.shamir).
                revealed.setdefault(owner, {})[holder + 1] = share
        out = {}
        for party, content in train.received.items():
            y = wire.read_vector(content)
            shares = revealed.get(party, {})
            if y is None or not shares:
                continue
            b = shamir.reconstruct_bytes(shares, len(shares))
            out[party] = self.codec.sub(y, prg.expand(b, y.size, self.codec.ring_bits))
        return out

    def _replay(self, server_round: int, model: ArrayRecord) -> None:
        assert self._grid is not None
        first = self._self_masked(self.transcript[server_round])
        start = len(self.transcript[server_round])
        self.replayed = model
        try:
            msgs = list(
                self.inner.configure_train(
                    server_round, model, self._configs[server_round], self._grid
                )
            )
            replies = list(self._grid.send_and_receive(msgs, timeout=self.timeout))
            self.inner.aggregate_train(server_round, replies)  # runs the unmask stage
        except SecureAggregationError as exc:
            self._failed(server_round, f"replay: {exc}")
        finally:
            self._read_faults(server_round)
        second = self._self_masked(self.transcript[server_round][start:])
        self.differences = {
            p: self.codec.decode(self.codec.sub(first[p], second[p]))
            for p in sorted(set(first) & set(second))
        }

    def _evaluate(self) -> Score:
        assert self.evaluator is not None
        rnd = self.attack_round
        return self.evaluator.score_differences(
            rnd, self.sent.get(rnd), self.replayed, self.differences
        )
