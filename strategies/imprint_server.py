"""A malicious server that reads the parties' samples out of the aggregate it obtains.

:class:`ImprintServer` wraps the rest of the server (``ImprintServer ⊃ SecureAggregation
⊃ DPGlobalUpdate ⊃ FedAvg``): it is the server, so it sees what a server sees — the
global model it sends and the aggregate its inner strategy returns — and nothing of a
single party's update. The model it ships is rigged before the run
(``privfl.architecture.build_model`` or :func:`privfl.attacks.imprint.rig_model`: an imprint
block in front of the task model, :mod:`privfl.attacks.imprint`); honest parties train
it normally and aggregation runs unchanged.

The attacker takes explicit parameters; what it recovered is scored by
:class:`~privfl.evaluation.imprint.ImprintServerEvaluator`, a separate object that holds
the scenario and rebuilds the samples the parties trained on (the attacker never sees
them).
:meth:`ImprintServer.from_scenario` builds both from ``attack.imprint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privfl.attacks.imprint import (
    BIAS_KEY,
    FAMILIES,
    WEIGHT_KEY,
    ImprintInfo,
    aggregate_noise_std,
    imprint_bins_of,
    imprinted_samples,
    reconstruct_from_update,
    state_update,
    strongest_bins_readout,
)
from privfl.config import SCENARIO_KEY, Scenario, scenario_from_json
from privfl.data import sample_shape
from privfl.evaluation.imprint import ImprintServerEvaluator
from privfl.results import AttackReport
from privfl.strategies.wrapper import StrategyWrapper, strategy_chain

_KEYS = (WEIGHT_KEY, BIAS_KEY)
_BLOCK_PREFIX = "imprint."
ROLE = "malicious-server"
# Config keys of the attack round's hyper-parameters for a ClientApp that reads no
# privfl scenario (privfl's parties read them from the scenario's [training]).
PLAIN_CONFIG_KEYS = {"local_steps": "local-steps", "batch_size": "batch-size", "lr": "lr"}


def _arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in _KEYS}


class ImprintServer(StrategyWrapper):
    """Forward every call to ``inner``; in ``attack_round`` reconstruct samples from the
    aggregate update (new global minus the global sent).

    Parameters
    ----------
    inner : Strategy
        The honest server (plain FedAvg, or secure aggregation / DP around it).
    attack_round : int
        The round whose aggregate is attacked.
    sample_shape : tuple[int, ...]
        Shape of one sample (the server knows it from its own public samples).
    expected_samples : int
        Samples the attacker expects in the aggregate (parties × batch × steps): when no
        bin passes the single-sample test it bets on this many strongest bins.
    local_steps, batch_size, lr : int, int, float
        The attack round's training, asked of the parties (0: the parties' own). A round
        run on them (one big step on a few samples) is attacked and then discarded: the
        model sent stays the global model. privfl's parties read them from the scenario
        in the message; another ClientApp from the config keys ``local-steps``,
        ``batch-size``, ``lr``.
    rearm : bool
        Put the imprint block's shipped weights back into every global model broadcast.
    noise_std : float
        Per-coordinate std of the rounding secure aggregation puts in the aggregate
        (``privfl.attacks.imprint.aggregate_noise_std``).
    bins : int, optional
        Neurons per probe family of the shipped block (default: read off its weights).
    party_of : Mapping[int, int], optional
        Node id → party index: which parties' samples can be in the aggregate, for the
        evaluator only.
    evaluator : ImprintServerEvaluator, optional
        Scores the readouts (it holds the ground truth, the attacker does not). Without
        one nothing is scored: the readouts stay in :attr:`readouts`.

    Attributes
    ----------
    readouts : torch.Tensor or None
        What the attacker read off the aggregate of the attack round.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        attack_round: int,
        sample_shape: tuple[int, ...],
        expected_samples: int,
        local_steps: int = 0,
        batch_size: int = 0,
        lr: float = 0.0,
        rearm: bool = True,
        noise_std: float = 0.0,
        bins: int | None = None,
        party_of: Mapping[int, int] | None = None,
        evaluator: ImprintServerEvaluator | None = None,
    ) -> None:
        if attack_round < 1 or expected_samples < 1:
            raise ValueError(
                "ImprintServer: need attack_round >= 1 and expected_samples >= 1, got "
                f"{attack_round}, {expected_samples}"
            )
        if local_steps < 0 or batch_size < 0 or lr < 0 or noise_std < 0:
            raise ValueError(
                "ImprintServer: local_steps, batch_size, lr and noise_std must be >= 0 "
                "(0: the parties' own)"
            )
        super().__init__(inner)
        self.attack_round = attack_round
        self.sample_shape = tuple(sample_shape)
        self.expected_samples = expected_samples
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.lr = lr
        self.rearm = rearm
        self.noise_std = noise_std
        self.bins = bins
        self.party_of = dict(party_of or {})
        self.evaluator = evaluator
        self.readouts: torch.Tensor | None = None
        # The attack round's own hyper-parameters, in the order privfl's scenario takes them.
        asked = {"local_steps": local_steps, "batch_size": batch_size, "lr": lr}
        self._training = {name: value for name, value in asked.items() if value}
        self._sent: ArrayRecord | None = None  # the global model of the attack round
        self._reports: list[AttackReport] = []
        # The block as first shipped (rearm puts it back every round).
        self._armed: dict[str, Array] | None = None

    @classmethod
    def from_scenario(
        cls, inner: Strategy, scenario: Scenario, party_of: Mapping[int, int]
    ) -> ImprintServer:
        """The attacker ``attack.imprint`` describes, with an evaluator of the scenario."""
        im = scenario.attack.imprint
        return cls(
            inner,
            attack_round=im.round,
            sample_shape=sample_shape(scenario),
            expected_samples=imprinted_samples(scenario),
            local_steps=im.local_steps,
            batch_size=im.batch_size,
            lr=im.lr,
            rearm=im.rearm,
            noise_std=aggregate_noise_std(scenario),
            bins=imprint_bins_of(scenario),
            party_of=party_of,
            evaluator=ImprintServerEvaluator(scenario),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the rigged global model of the attack round, then let ``inner`` send it."""
        if self._armed is None:
            self._armed = {
                k: Array(a.numpy().copy()) for k, a in arrays.items() if k.startswith(_BLOCK_PREFIX)
            }
        if server_round == self.attack_round:
            self._sent = arrays
            config = self._attack_config(config)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate through ``inner``; at the attack round, also attack the result."""
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if server_round == self.attack_round and self._sent is not None:
            if arrays is None:
                self._reports.append(self._report_nothing("the round produced no aggregate"))
            else:
                self._attack(arrays, self._parties(server_round, replies))
            if arrays is not None and self._training:
                # The round ran on the server's own hyper-parameters (one big step on a
                # few samples): keep the model it sent rather than set training back.
                arrays = self._sent
            self._sent = None
        if arrays is not None and self.rearm and self._armed:
            arrays = self._rearm(arrays)
        return arrays, metrics

    def attack_reports(self) -> list[AttackReport]:
        """The attack's outcome (one entry once the attack round has run and was scored)."""
        return list(self._reports)

    # ----------------------------------------------------------------- internals
    def _attack_config(self, config: ConfigRecord | None) -> ConfigRecord | None:
        """The attack round's train config: the server's own local steps / batch size /
        learning rate in place of the parties'."""
        if not self._training or config is None:
            return config
        out = ConfigRecord(dict(config.items()))
        if SCENARIO_KEY in config:
            asked = scenario_from_json(str(config[SCENARIO_KEY]))
            overrides = [f"training.{name}={value}" for name, value in self._training.items()]
            out[SCENARIO_KEY] = asked.replace(overrides).to_json()
        else:
            out.update({PLAIN_CONFIG_KEYS[k]: v for k, v in self._training.items()})
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

    def _parties(self, server_round: int, replies: list[Message]) -> list[int]:
        """Parties whose samples are in the aggregate (evaluator's view): those secure
        aggregation summed when it ran (a party that dropped out after its masked input
        left is in the sum; one excluded from it is not), else those that replied."""
        for strategy in strategy_chain(self.inner):
            included = getattr(strategy, "included", None)
            if isinstance(included, Mapping) and server_round in included:
                return sorted(int(p) for p in included[server_round])
        return sorted(
            {
                self.party_of[m.metadata.src_node_id]
                for m in replies
                if not m.has_error() and m.metadata.src_node_id in self.party_of
            }
        )

    def _block_bins(self) -> int:
        if self.bins is not None:
            return self.bins
        assert self._armed is not None and WEIGHT_KEY in self._armed, "no imprint block shipped"
        return int(self._armed[WEIGHT_KEY].shape[0]) // FAMILIES

    def _attack(self, arrays: ArrayRecord, parties: list[int]) -> None:
        assert self._sent is not None
        new, sent = _arrays(arrays), _arrays(self._sent)
        update = state_update(sent, new, _KEYS)
        info = ImprintInfo.from_state(new, self.sample_shape)
        recon = reconstruct_from_update(update, info, noise_std=self.noise_std)
        notes: list[str] = []
        images = recon.images
        if images.shape[0] == 0:
            # Nothing verified (a DP-noised update fails the rank-one test everywhere):
            # score the readouts of the bins the attacker would bet on instead.
            images = strongest_bins_readout(update, info, self.expected_samples)
            notes.append(
                f"no bin passed the single-sample test; scored the unverified readouts of "
                f"the {images.shape[0]} strongest bins (the attacker expects "
                f"{self.expected_samples} samples)"
            )
        self.readouts = images
        if self.evaluator is None:
            return
        self._reports.append(
            self.evaluator.score(
                images,
                parties=parties,
                attack_round=self.attack_round,
                bins=self._block_bins(),
                seconds=recon.seconds,
                collisions=recon.collisions,
                verified=recon.images.shape[0],
                notes=notes,
                occupied=recon.occupied,
            )
        )

    def _report_nothing(self, why: str) -> AttackReport:
        return AttackReport(
            name="imprint",
            role=ROLE,
            target="aggregate",
            recovered=0,
            total=0,
            metrics={"expected_fraction": float("nan"), "bins": self._block_bins()},
            notes=[why],
        )
