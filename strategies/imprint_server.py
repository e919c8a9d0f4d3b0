"""A malicious server that reads the parties' samples out of the aggregate it obtains.

:class:`ImprintServer` wraps the rest of the server (``ImprintServer ⊃ SecureAggregation
⊃ DPGlobalUpdate ⊃ FedAvg``): it is the server, so it sees what a server sees — the
global model it sends and the aggregate its inner strategy returns — and nothing of a
single party's update. The model it ships is rigged by ``privfl.models.build_model``
(an imprint block in front of the task model, :mod:`privfl.attacks.imprint`); honest
parties train it normally and aggregation runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from privfl.attacks.imprint import (
    BIAS_KEY,
    WEIGHT_KEY,
    ImprintInfo,
    aggregate_noise_std,
    evaluate_imprint,
    expected_fraction,
    imprint_bins_of,
    reconstruct_from_update,
)
from privfl.strategies.wrapper import StrategyWrapper

from privfl.config import Scenario
from privfl.results import AttackReport

_KEYS = (WEIGHT_KEY, BIAS_KEY)


def _arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in _KEYS}


class ImprintServer(StrategyWrapper):
    """Forward every call to ``inner``; at ``attack.imprint.round`` reconstruct from the
    aggregate update (new global minus the global sent).

    Parameters
    ----------
    inner : Strategy
        The honest server (plain FedAvg, or secure aggregation / DP around it).
    scenario : Scenario
        The run's scenario (``attack.imprint``).
    party_of : Mapping[int, int]
        Node id → party index. Used only by the evaluator, to rebuild the ground truth of
        the parties that replied (``privfl.training.round_batch_data``); the attacker
        never reads it.
    """

    def __init__(self, inner: Strategy, *, scenario: Scenario, party_of: Mapping[int, int]) -> None:
        super().__init__(inner)
        self.scenario = scenario
        self.party_of = dict(party_of)
        self._sent: dict[str, torch.Tensor] | None = None
        self._reports: list[AttackReport] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the rigged global model of the attack round, then let ``inner`` send it."""
        if server_round == self.scenario.attack.imprint.round:
            self._sent = _arrays(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate through ``inner``; at the attack round, also attack the result."""
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if server_round == self.scenario.attack.imprint.round and self._sent is not None:
            if arrays is None:
                self._reports.append(self._report_nothing("the round produced no aggregate"))
            else:
                self._reports.append(self._attack(arrays, self._parties(replies)))
            self._sent = None
        return arrays, metrics

    def attack_reports(self) -> list[AttackReport]:
        """The attack's outcome (one entry once the attack round has run)."""
        return list(self._reports)

    # ----------------------------------------------------------------- internals
    def _parties(self, replies: list[Message]) -> list[int]:
        """Parties whose samples can be in the aggregate (evaluator's view)."""
        seen = {
            self.party_of[m.metadata.src_node_id]
            for m in replies
            if not m.has_error() and m.metadata.src_node_id in self.party_of
        }
        return sorted(seen) or list(range(self.scenario.data.parties))

    def _attack(self, arrays: ArrayRecord, parties: list[int]) -> AttackReport:
        from privfl.training import round_batch_data

        assert self._sent is not None
        new = _arrays(arrays)
        update = {k: new[k].double() - self._sent[k].double() for k in _KEYS}
        recon = reconstruct_from_update(
            update, ImprintInfo.from_state(new), noise_std=aggregate_noise_std(self.scenario)
        )
        im = self.scenario.attack.imprint
        truth = torch.cat([round_batch_data(self.scenario, p, im.round).images for p in parties])
        bins = imprint_bins_of(self.scenario)
        return evaluate_imprint(
            recon.images,
            truth,
            scenario=self.scenario,
            role="malicious-server",
            bins=bins,
            expected=expected_fraction(len(truth), bins),
            seconds=recon.seconds,
            collisions=recon.collisions,
            notes=[f"attacked the aggregate of round {im.round} over parties {parties}"],
        )

    def _report_nothing(self, why: str) -> AttackReport:
        bins = imprint_bins_of(self.scenario)
        return AttackReport(
            name="imprint",
            role="malicious-server",
            target="aggregate",
            recovered=0,
            total=0,
            metrics={"expected_fraction": float("nan"), "bins": bins},
            notes=[why],
        )
