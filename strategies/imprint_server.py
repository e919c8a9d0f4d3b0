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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from privfl.attacks.imprint import (
    BIAS_KEY,
    WEIGHT_KEY,
    ImprintInfo,
    aggregate_noise_std,
    attack_round_scenario,
    evaluate_imprint,
    expected_fraction,
    imprint_bins_of,
    imprinted_samples,
    reconstruct_from_update,
    strongest_bins_readout,
)
from privfl.strategies.wrapper import StrategyWrapper

from privfl.config import SCENARIO_KEY, Scenario
from privfl.results import AttackReport

_KEYS = (WEIGHT_KEY, BIAS_KEY)
_BLOCK_PREFIX = "imprint."


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
        # What the attack round asks the parties for (the server's own hyper-parameters).
        self._attack_scenario = attack_round_scenario(scenario)
        self._sent: ArrayRecord | None = None  # the global model of the attack round
        self._reports: list[AttackReport] = []
        # The block as first shipped (attack.imprint.rearm puts it back every round).
        self._armed: dict[str, Array] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the rigged global model of the attack round, then let ``inner`` send it."""
        if self._armed is None:
            self._armed = {
                k: Array(a.numpy().copy()) for k, a in arrays.items() if k.startswith(_BLOCK_PREFIX)
            }
        if server_round == self.scenario.attack.imprint.round:
            self._sent = arrays
            config = self._attack_config(config)
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
            if arrays is not None and self._attack_scenario is not self.scenario:
                # The round ran on the server's own hyper-parameters (one big step on a
                # few samples): keep the model it sent rather than set training back.
                arrays = self._sent
            self._sent = None
        if arrays is not None and self.scenario.attack.imprint.rearm and self._armed:
            arrays = self._rearm(arrays)
        return arrays, metrics

    def attack_reports(self) -> list[AttackReport]:
        """The attack's outcome (one entry once the attack round has run)."""
        return list(self._reports)

    # ----------------------------------------------------------------- internals
    def _attack_config(self, config: ConfigRecord) -> ConfigRecord:
        """The attack round's train config: the scenario with the server's own local
        steps / batch size (``attack.imprint.local_steps``, ``batch_size``)."""
        if self._attack_scenario is self.scenario or SCENARIO_KEY not in config:
            return config
        out = ConfigRecord(dict(config.items()))
        out[SCENARIO_KEY] = self._attack_scenario.to_json()
        return out

    def _rearm(self, arrays: ArrayRecord) -> ArrayRecord:
        """The new global model with the block's shipped weights put back (the server
        decides what it broadcasts; the task part is the honest aggregate)."""
        assert self._armed is not None
        return ArrayRecord(
            {
                k: self._armed.get(k, a) if k.startswith(_BLOCK_PREFIX) else a
                for k, a in arrays.items()
            }
        )

    def _parties(self, replies: list[Message]) -> list[int]:
        """Parties whose samples can be in the aggregate (evaluator's view)."""
        seen = {
            self.party_of[m.metadata.src_node_id]
            for m in replies
            if not m.has_error() and m.metadata.src_node_id in self.party_of
        }
        return sorted(seen) or list(range(self.scenario.data.parties))

    def _attack(self, arrays: ArrayRecord, parties: list[int]) -> AttackReport:
        from privfl.data import load_federation
        from privfl.training import round_batch_data

        assert self._sent is not None
        new, sent = _arrays(arrays), _arrays(self._sent)
        update = {k: new[k].double() - sent[k].double() for k in _KEYS}
        # The server knows the shape of the data from its own public samples.
        shape = load_federation(self.scenario).public.sample_shape
        info = ImprintInfo.from_state(new, shape)
        recon = reconstruct_from_update(update, info, noise_std=aggregate_noise_std(self.scenario))
        im = self.scenario.attack.imprint
        bins = imprint_bins_of(self.scenario)
        notes = [f"attacked the aggregate of round {im.round} over parties {parties}"]
        total = None
        chosen = self._attack_scenario
        if self.scenario.defense.dp.mode == "client":
            # DP-SGD batches are Poisson samples drawn inside each party.
            fed = load_federation(self.scenario)
            trains = [fed.parties[p].train for p in parties]
            # The parties' Poisson batches are drawn from their own secrets: score
            # against every record they hold (a best match can only flatter the attacker).
            truth = torch.cat([t.images for t in trains])
            total = imprinted_samples(self.scenario)
            notes.append(
                f"DP-SGD batches are the parties' secret: readouts matched against all "
                f"{truth.shape[0]} records the parties hold; total = the {total} samples expected"
            )
        else:
            truth = torch.cat([round_batch_data(chosen, p, im.round).images for p in parties])
        images = recon.images
        if images.shape[0] == 0:
            # Nothing verified (a DP-noised update fails the rank-one test everywhere):
            # score the readouts of the bins the attacker would bet on instead.
            expect = imprinted_samples(self.scenario)
            images = strongest_bins_readout(update, info, expect)
            notes.append(
                f"no bin passed the single-sample test; scored the unverified readouts of "
                f"the {images.shape[0]} strongest bins (the attacker expects {expect} samples)"
            )
        return evaluate_imprint(
            images,
            truth,
            scenario=self.scenario,
            role="malicious-server",
            bins=bins,
            expected=expected_fraction(len(truth), bins),
            seconds=recon.seconds,
            collisions=recon.collisions,
            notes=notes,
            verified=recon.images.shape[0],
            total=total,
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
