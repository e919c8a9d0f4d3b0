"""An honest-but-curious server that inverts one party's update.

``CuriousServer(inner, scenario=..., party_of=...)`` is the outermost strategy wrapper:
every Strategy call is forwarded to ``inner`` unchanged, so training is exactly what it
would be without the attack. Its :meth:`CuriousServer.start` hands ``inner`` a
:class:`RecordingGrid` that keeps deep copies of every message the server sends to and
receives from the target party, per round and exchange: the attack can only use
what the server really saw. After the run the target round's update is extracted
from that transcript and inverted with
:func:`privfl.attacks.gradient_inversion.invert_update`.

Roles are kept apart: the *attacker* gets the sent global weights, the recorded reply
and :class:`AttackerKnowledge` from the scenario; the *evaluator*
(:class:`privfl.evaluation.inversion.InversionEvaluator`, which
:meth:`CuriousServer.attack_reports` hands the reconstruction) separately rebuilds the
true batch with :func:`privfl.training.round_batch_data` only to score it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from privfl.architecture import build_model
from privfl.attacks.gradient_inversion import (
    AttackerKnowledge,
    Reconstruction,
    SpanError,
    invert_update,
)
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.evaluation.inversion import InversionEvaluator
from privfl.flower.transcript import RecordingGrid, Transcript
from privfl.flower.update import UpdateError, delta_arrays, weights_of
from privfl.flower.wire import curious_read
from privfl.results import AttackReport
from privfl.strategies.wrapper import StrategyWrapper
from privfl.training import local_steps, resolve_device

UpdateReader = Callable[[RecordDict, ArrayRecord, Scenario], Mapping[str, np.ndarray] | None]


def plain_update(content: RecordDict, sent: ArrayRecord) -> dict[str, np.ndarray] | None:
    """``received − sent`` weights of a plain FedAvg reply (None: no weights that match)."""
    try:
        return delta_arrays(sent, weights_of(content)[1])
    except UpdateError:
        return None


def secagg_reader() -> UpdateReader:
    """The secure-aggregation plug-in: how a curious server reads one stage payload."""
    return curious_read


class CuriousServer(StrategyWrapper):
    """Honest-but-curious wrapper: runs ``inner`` faithfully and inverts the update of
    ``attack.gradient_inversion.target_party`` in round ``...round``.

    Parameters
    ----------
    inner : Strategy
        The strategy that really runs the protocol (FedAvg, DP, secure aggregation).
    scenario : Scenario
        Gives the attack settings and the attacker's knowledge.
    party_of : Mapping[int, int]
        Node id -> party index.
    model : torch.nn.Module, optional
        The architecture (default: ``privfl.architecture.build_model`` of the scenario); the
        weights come from what the server sent.
    num_classes : int, optional
        Default: from the federation.
    input_shape : tuple of int, optional
        Shape of one input (default: that of the federation's public images).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        scenario: Scenario,
        party_of: Mapping[int, int],
        model: torch.nn.Module | None = None,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(inner)
        self._input_shape = input_shape
        self.scenario = scenario
        self.party_of = dict(party_of)
        self.settings = scenario.attack.gradient_inversion
        target = self.settings.target_party
        if target not in self.party_of.values():
            raise ValueError(
                f"attack.gradient_inversion.target_party = {target} is held by no node "
                f"(party_of: {self.party_of})"
            )
        self._model = model
        self._num_classes = num_classes
        self.recording: RecordingGrid | None = None
        self.reconstruction: Reconstruction | None = None
        self.knowledge: AttackerKnowledge | None = None
        self.observed: dict[str, np.ndarray] | None = None
        self.failure = ""

    def start(self, grid: Grid, *args: object, **kwargs: object) -> Result:
        """Run ``inner.start`` on a recording grid, then attack the recorded update."""
        self.recording = RecordingGrid(
            grid, Transcript(self.party_of, watch=[self.settings.target_party])
        )
        result = self.inner.start(self.recording, *args, **kwargs)  # type: ignore[arg-type]
        self.attack()
        return result

    # ------------------------------------------------------------------ the attack
    def observed_update(
        self, reader: UpdateReader | None = None
    ) -> tuple[dict[str, np.ndarray], ArrayRecord, RecordDict]:
        """The target's update in the attacked round, from the recorded traffic only.

        Returns ``(update, global arrays sent, the reply it was read from)``. Plain
        replies give ``received − sent``; under secure aggregation each reply is passed
        to ``reader`` (default :func:`curious_read`) and the first one it can decode is
        used.
        """
        if self.recording is None:
            raise RuntimeError("start() has not run: nothing was recorded")
        rnd = self.settings.round
        exchanges = self.recording.transcript.exchanges(rnd)
        sent = next(
            (
                c["arrays"]
                for ex in exchanges
                for c in ex.sent.values()
                if "arrays" in c.array_records
            ),
            None,
        )
        if sent is None:
            raise RuntimeError(
                f"round {rnd}: the server sent no model to party {self.settings.target_party}"
            )
        secure = self.scenario.defense.secure_aggregation != "none"
        if secure and reader is None:
            reader = secagg_reader()
        for ex in exchanges:
            if not ex.message_type.startswith("train"):
                continue
            for content in ex.received.values():
                upd = (
                    reader(content, sent, self.scenario)
                    if reader is not None
                    else plain_update(content, sent)
                )
                if upd is not None:
                    return {k: np.asarray(v) for k, v in upd.items()}, sent, content
        raise RuntimeError(
            f"round {rnd}: no readable train reply from party {self.settings.target_party}"
        )

    def _knowledge(
        self,
        reply: RecordDict,
        num_classes: int,
        auxiliary: torch.Tensor | None,
        input_shape: tuple[int, ...],
    ) -> AttackerKnowledge:
        t = self.scenario.training
        # The server sees num-examples in a plain reply; otherwise it assumes the scenario's.
        n = self.scenario.data.samples_per_party or t.batch_size
        metrics = reply.metric_records.get("metrics")
        if metrics is not None and "num-examples" in metrics:
            n = int(metrics["num-examples"])
        steps = local_steps(n, self.scenario)
        # feature-span peels the steps off one by one: it needs them as they were taken
        simulate = self.settings.multi_step == "simulate" or self.settings.method == "feature-span"
        # The server set lr, steps and batch size itself; simulating, it unrolls steps of
        # one batch each over the distinct samples those steps can have touched.
        batch = min(n, t.batch_size) if simulate else min(n, steps * t.batch_size)
        samples = min(n, steps * t.batch_size) if simulate else 0
        return AttackerKnowledge(
            batch_size=batch,
            labels_known=self.settings.labels_known,
            local_steps=steps,
            lr=t.lr,
            input_shape=input_shape,
            num_classes=num_classes,
            auxiliary_images=auxiliary,
            samples=samples,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
        )

    def _truth(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluator's rebuild of the target's samples; the attacker takes only their
        labels, and only when ``labels_known`` hands them to it."""
        return InversionEvaluator(self.scenario).truth()

    def attack(self) -> None:
        """Extract the target's update from the transcript and invert it (once)."""
        if self.reconstruction is not None or self.failure:
            return
        try:
            update, sent, reply = self.observed_update()
        except RuntimeError as exc:
            self.failure = str(exc)
            return
        self.observed = update
        if self._num_classes is None:
            self._num_classes = load_federation(self.scenario).num_classes
        if self._model is None:
            self._model = build_model(self.scenario, self._num_classes)
        model = copy.deepcopy(self._model)
        model.load_state_dict(sent.to_torch_state_dict())
        aux = self.settings.auxiliary_samples
        public = load_federation(self.scenario).public.images
        self.knowledge = self._knowledge(
            reply,
            self._num_classes,
            public[:aux] if aux else None,
            # the task's image shape (channels, height, width) is public, like the model
            self._input_shape or tuple(public.shape[1:]),
        )
        labels = self._truth()[1] if self.knowledge.labels_known else None
        try:
            self.reconstruction = self._invert(model, update, labels)
        except SpanError as exc:  # the model or the update does not fit the method
            self.failure = str(exc)

    def _invert(
        self, model: torch.nn.Module, update: dict, labels: torch.Tensor | None
    ) -> Reconstruction:
        s = self.settings
        assert self.knowledge is not None
        return invert_update(
            model,
            {k: torch.as_tensor(v) for k, v in update.items()},
            self.knowledge,
            s.method,
            iterations=s.iterations,
            restarts=s.restarts,
            lr=s.lr,
            tv_weight=s.tv_weight,
            seed=self.scenario.scenario.seed,
            device=resolve_device(self.scenario.scenario.device),
            labels=labels,
            multi_step=s.multi_step,
            label_recovery=s.label_recovery,
            trial_iterations=s.trial_iterations,
        )

    def attack_reports(self) -> list[AttackReport]:
        """The attack's :class:`AttackReport`, scored against the true batch by the
        evaluator."""
        s = self.settings
        target = f"party {s.target_party}, round {s.round}"
        self.attack()
        if self.reconstruction is None:
            return [
                AttackReport(
                    "gradient-inversion",
                    "curious-server",
                    target,
                    0,
                    0,
                    notes=[f"attack did not run: {self.failure}"],
                )
            ]
        assert self.knowledge is not None
        return [InversionEvaluator(self.scenario).score(self.reconstruction, self.knowledge)]
