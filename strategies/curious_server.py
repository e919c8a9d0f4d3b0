"""An honest-but-curious server that inverts one party's update.

``CuriousServer(inner, scenario=..., party_of=...)`` is the outermost strategy wrapper:
every Strategy call is forwarded to ``inner`` unchanged, so training is exactly what it
would be without the attack. Its :meth:`CuriousServer.start` hands ``inner`` a
:class:`RecordingGrid` that keeps deep copies of every message the server sends to and
receives from the target party's node, per round and exchange: the attack can only use
what the server really saw. After the run the target round's update is extracted
from that transcript and inverted with
:func:`privfl.attacks.gradient_inversion.invert_update`.

Roles are kept apart: the *attacker* gets the sent global weights, the recorded reply
and :class:`AttackerKnowledge` from the scenario; the *evaluator*
(:meth:`CuriousServer.attack_reports`) separately rebuilds the true batch with
:func:`privfl.training.round_batch_data` only to score the reconstruction.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from privfl.attacks.gradient_inversion import AttackerKnowledge, Reconstruction, invert_update
from privfl.config import Scenario
from privfl.results import AttackReport
from privfl.strategies.wrapper import GridProxy, StrategyWrapper

ROUND_KEY = "server-round"


@dataclass
class Exchange:
    """One send/receive with the target's node: what was sent and what came back."""

    message_type: str
    sent: list[RecordDict] = field(default_factory=list)
    received: list[RecordDict] = field(default_factory=list)


def _snapshot(content: RecordDict) -> RecordDict:
    """An independent copy of a message's content, made the way it crosses the wire
    (``deepcopy`` fails on the memoryview-backed arrays of aggregated models)."""
    return recorddict_from_proto(recorddict_to_proto(content))


class RecordingGrid(GridProxy):
    """A Grid that forwards everything and records the traffic of ``nodes``.

    ``transcript[round]`` lists the exchanges of that round in order. The round is read
    from the outgoing content's ``config["server-round"]``, else from the message's
    ``group_id``, else the last one seen.
    """

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        super().__init__(grid)
        self.nodes = set(nodes)
        self._pending: Exchange | None = None
        self.transcript: dict[int, list[Exchange]] = {}
        self._round = 0

    # -------------------------------------------------------------- recording
    def _round_of(self, msg: Message) -> int:
        if msg.has_content():
            cfg = msg.content.config_records.get("config")
            if cfg is not None and ROUND_KEY in cfg:
                return int(cfg[ROUND_KEY])
        gid = msg.metadata.group_id
        return int(gid) if gid and gid.isdigit() else self._round

    def _sent(self, messages: Iterable[Message]) -> tuple[list[Message], Exchange | None]:
        messages = list(messages)
        ours = [m for m in messages if m.metadata.dst_node_id in self.nodes]
        if not ours:
            return messages, None
        self._round = self._round_of(ours[0])
        ex = Exchange(message_type=ours[0].metadata.message_type)
        ex.sent = [_snapshot(m.content) for m in ours if m.has_content()]
        self.transcript.setdefault(self._round, []).append(ex)
        return messages, ex

    def _received(self, replies: Iterable[Message], ex: Exchange | None) -> list[Message]:
        replies = list(replies)
        if ex is not None:
            for m in replies:
                if m.metadata.src_node_id in self.nodes and m.has_content():
                    ex.received.append(_snapshot(m.content))
        return replies

    # -------------------------------------------------------------- Grid API
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward to the wrapped grid; keep copies of the target's traffic."""
        messages, ex = self._sent(messages)
        return self._received(self.grid.send_and_receive(messages, timeout=timeout), ex)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward; pushes to the target open an exchange that pulls fill."""
        messages, ex = self._sent(messages)
        if ex is not None:
            self._pending = ex
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward; replies from the target go to the last pushed exchange."""
        return self._received(self.grid.pull_messages(message_ids), self._pending)


UpdateReader = Callable[[RecordDict, ArrayRecord, Scenario], Mapping[str, np.ndarray] | None]


def plain_update(content: RecordDict, sent: ArrayRecord) -> dict[str, np.ndarray] | None:
    """``received − sent`` weights of a plain FedAvg reply (None without arrays)."""
    recs = list(content.array_records.values())
    if not recs:
        return None
    got = recs[0]
    return {
        k: got[k].numpy().astype(np.float64) - a.numpy().astype(np.float64)
        for k, a in sent.items()
        if k in got
    }


def secagg_reader() -> UpdateReader:
    """The secure-aggregation plug-in: how a curious server reads one stage payload."""
    from privfl.strategies.secure_aggregation import curious_read

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
        nodes = [n for n, p in self.party_of.items() if p == target]
        if not nodes:
            raise ValueError(
                f"attack.gradient_inversion.target_party = {target} is held by no node "
                f"(party_of: {self.party_of})"
            )
        self.target_node = nodes[0]
        self._model = model
        self._num_classes = num_classes
        self.recording: RecordingGrid | None = None
        self.reconstruction: Reconstruction | None = None
        self.knowledge: AttackerKnowledge | None = None
        self.observed: dict[str, np.ndarray] | None = None
        self.failure = ""

    def start(self, grid: Grid, *args: object, **kwargs: object) -> Result:
        """Run ``inner.start`` on a recording grid, then attack the recorded update."""
        self.recording = RecordingGrid(grid, [self.target_node])
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
        exchanges = self.recording.transcript.get(rnd, [])
        sent = next(
            (c["arrays"] for ex in exchanges for c in ex.sent if "arrays" in c.array_records),
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
            for content in ex.received:
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
        from privfl.training import local_steps

        t = self.scenario.training
        # The server sees num-examples in a plain reply; otherwise it assumes the scenario's.
        n = self.scenario.data.samples_per_party or t.batch_size
        metrics = reply.metric_records.get("metrics")
        if metrics is not None and "num-examples" in metrics:
            n = int(metrics["num-examples"])
        steps = local_steps(n, self.scenario)
        simulate = self.settings.multi_step == "simulate"
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
        """Evaluator only: the distinct samples the target trained on in the round."""
        from privfl.training import round_batch_data

        data = round_batch_data(self.scenario, self.settings.target_party, self.settings.round)
        flat = torch.cat([data.images.flatten(1), data.labels[:, None].float()], 1)
        _, first = np.unique(flat.numpy(), axis=0, return_index=True)
        idx = torch.as_tensor(np.sort(first))
        return data.images[idx], data.labels[idx]

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
        from privfl.data import load_federation

        if self._num_classes is None:
            self._num_classes = load_federation(self.scenario).num_classes
        if self._model is None:
            from privfl.architecture import build_model

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
        from privfl.training import resolve_device

        s = self.settings
        self.reconstruction = invert_update(
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
        """The attack's :class:`AttackReport`, scored against the true batch."""
        from privfl.metrics import evaluate_reconstruction, image_grid_figure

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
        t0 = time.perf_counter()
        truth, truth_labels = self._truth()
        rec = self.reconstruction
        ev = evaluate_reconstruction(rec.images, rec.labels, truth, truth_labels, s.recovered_psnr)
        fig = image_grid_figure(
            truth,
            rec.images,
            perm=ev["perm"],
            psnr_per_image=ev["psnr_per_image"],
            truth_labels=truth_labels.tolist(),
            recon_labels=rec.labels.tolist(),
            title=f"{s.method}: party {s.target_party}, round {s.round}",
        )
        kn = self.knowledge
        assert kn is not None
        secure = self.scenario.defense.secure_aggregation
        budget = (
            f"best of {s.restarts} start(s) after {s.trial_iterations or s.iterations} "
            f"Adam steps each, run to {s.iterations}"
            if s.method == "inverting-gradients"
            else f"best of {s.restarts} start(s), run to {s.iterations} L-BFGS iterations"
        )
        notes = [
            f"method {s.method}, {budget}; "
            f"attacker knows batch size {kn.batch_size}, {kn.local_steps} local step(s) "
            f"at lr {kn.lr}, labels {'known' if kn.labels_known else 'recovered'}",
            f"recovered = PSNR >= {s.recovered_psnr} dB after optimal matching; "
            f"evaluation took {time.perf_counter() - t0:.1f} s",
        ]
        if secure != "none":
            notes.append(
                f"inverted the server's real view under secure aggregation "
                f"({secure}): the decoded stage payload (masked input or partial sum of "
                f"shares), not the party's update"
            )
        if kn.local_steps > 1:
            notes.append(f"{kn.local_steps} local steps modelled as '{s.multi_step}'")
        if kn.momentum or kn.weight_decay:
            notes.append(
                f"the party's SGD momentum {kn.momentum} and weight decay {kn.weight_decay} "
                "are modelled"
            )
        if self.scenario.training.optimizer != "sgd":
            notes.append(
                f"the parties train with {self.scenario.training.optimizer}: the attack "
                "models their update as SGD steps, so expect less"
            )
        return [
            AttackReport(
                name="gradient-inversion",
                role="curious-server",
                target=target,
                recovered=ev["recovered"],
                total=ev["total"],
                metrics={
                    "psnr_mean": ev["psnr_mean"],
                    "psnr_max": ev["psnr_max"],
                    "ssim_mean": ev["ssim_mean"],
                    "label_accuracy": ev["label_accuracy"],
                    "seconds": rec.seconds,
                    "objective": rec.objective,
                },
                figures={"gradient_inversion.png": fig},
                notes=notes,
            )
        ]
