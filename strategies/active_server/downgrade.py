"""The downgrade: ask every party for a round with no secure aggregation and no DP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import Score
from privfl.config import SCENARIO_KEY, Scenario
from privfl.strategies.active_server.base import SERVER_ROUND, ActiveServer


def downgraded_scenario(scenario: Scenario) -> Scenario:
    """``scenario`` with no secure aggregation and no DP: what the downgrade asks for."""
    return scenario.replace(['defense.secure_aggregation="none"', 'defense.dp.mode="none"'])


class DowngradeServer(ActiveServer):
    """In the attack round, ask every party for a round with no defenses at all.

    The train messages carry ``request``: for privfl's parties a scenario whose
    ``defense.secure_aggregation`` and ``defense.dp.mode`` are ``"none"``
    (:func:`downgraded_scenario`); a party that takes its defenses from the message
    answers with its plain local weights, number of examples and loss. The round is
    aggregated with plain FedAvg on whatever came back (skipped if nothing did).
    Stopped by parties that keep their own defenses and refuse the request.

    Parameters
    ----------
    request : Mapping[str, Any]
        Config entries the attack round's train messages carry in place of the round's.
    **kwargs
        Those of :class:`ActiveServer`.
    """

    method = "downgrade"
    targets_one_party = False

    def __init__(self, inner: Strategy, *, request: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        if not request:
            raise ValueError("DowngradeServer: request names no config entry to send")
        self.request = dict(request)
        self.plain: dict[int, RecordDict] = {}

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        d = scenario.defense
        cls._require(
            d.secure_aggregation != "none" or d.dp.mode != "none",
            "a defense to downgrade (defense.secure_aggregation or defense.dp.mode)",
        )

    @classmethod
    def _scenario_options(cls, scenario: Scenario) -> dict[str, Any]:
        request = {SCENARIO_KEY: downgraded_scenario(scenario).to_json()}
        return {**super()._scenario_options(scenario), "request": request}

    def _configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        if server_round != self.attack_round:
            return super()._configure_round(server_round, arrays, config)
        cfg = ConfigRecord(dict(config))
        cfg.update(self.request)
        cfg[SERVER_ROUND] = server_round
        return [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord(dict(cfg))}),
                dst_node_id=node,
                message_type="train",
                group_id=str(server_round),
            )
            for node in sorted(self.party_of)
        ]

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round != self.attack_round:
            return super()._aggregate_round(server_round, replies)
        assert self._train is not None
        self.plain = {
            p: c
            for p, c in self._train.received.items()
            if "arrays" in c.array_records and "metrics" in c.metric_records
        }
        plain = [
            r
            for r in replies
            if not r.has_error() and self.party_of.get(r.metadata.src_node_id) in self.plain
        ]
        if not plain:
            self._failed(server_round, "no party sent a plain update")
            return None, None
        # Plain FedAvg, the strategy at the bottom, aggregates the plain updates.
        return self._chain()[-1].aggregate_train(server_round, plain)

    def _evaluate(self) -> Score:
        rnd = self.attack_round
        got = {
            p: (
                {k: a.numpy() for k, a in c["arrays"].items()},
                float(c["metrics"].get("num-examples", float("nan"))),
            )
            for p, c in self.plain.items()
        }
        assert self.evaluator is not None
        return self.evaluator.score_plain_updates(rnd, self.sent.get(rnd), self.request, got)
