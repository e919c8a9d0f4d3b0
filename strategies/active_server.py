"""Malicious servers that break the protocol to reach the parties' private inputs.

Each attack is an outermost strategy wrapper, like
:class:`~privfl.strategies.curious_server.CuriousServer`: the attacker *is* the server
and sees exactly what the server sees. Unlike the curious server it acts: it rewrites
the train messages of a round, hands the strategies it wraps a :class:`ServerGrid` whose
stage exchanges it may rewrite and read, and sends messages of its own. It never reads
ground truth: what it recovered is scored by
:class:`privfl.attacks.active_server.ActiveServerEvaluator`.

==========================  =======================================================
class (``method``)          what the server does
==========================  =======================================================
DowngradeServer             asks for a round without secure aggregation or DP
NoiseStripServer            regenerates distributed-DP noise keyed from the seed
KeyMitmServer               forges the key directory, relays shares in the middle
IsolationServer             re-runs a finished sum without the target
RoundReplayServer           replays a finished round: the pairwise masks repeat
ModelInconsistencyServer    sends all but the target a model whose ReLUs are dead
==========================  =======================================================

A party that refuses (``privfl.clients.policy``) answers with an error reply; the
attacker records the refusal, skips what cannot finish, and the run ends normally.

Every class takes explicit keyword parameters (the attack round, the target, what the
attack needs of its own) and wraps the strategies it subverts; ``from_scenario`` (and
:func:`build_active_server`) reads them from ``attack.active_server``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Self

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from privfl.architecture import build_model
from privfl.attacks.active_server import ActiveServerEvaluator, Score
from privfl.config import SCENARIO_KEY, Scenario
from privfl.data import load_federation
from privfl.dp import distributed_noise, flatten, seed_secret
from privfl.fixedpoint import FixedPointCodec
from privfl.flower import wire
from privfl.refusal import refusal_reason
from privfl.results import AttackReport
from privfl.secagg import prg, shamir
from privfl.secagg.additive import AdditiveServer, RoundAbortedError, share_stage
from privfl.secagg.channel import ChannelError, SecureChannel, private_bytes
from privfl.strategies.dp_global import DPGlobalUpdate
from privfl.strategies.secure_aggregation import (
    SecureAggregation,
    SecureAggregationError,
    stage_messages,
)
from privfl.strategies.wrapper import GridProxy, StrategyWrapper

ROLE = "malicious-server"
SERVER_ROUND = "server-round"


@dataclass(frozen=True)
class Refusal:
    """A party's refusal reply: who refused what, and the reason it gave."""

    server_round: int
    party: int
    message_type: str
    reason: str


@dataclass
class Exchange:
    """One send/receive of the server: contents sent and received, by party."""

    message_type: str
    sent: dict[int, RecordDict] = field(default_factory=dict)
    received: dict[int, RecordDict] = field(default_factory=dict)

    def config(self, party: int | None = None) -> ConfigRecord:
        """The config sent to ``party`` (default: the first party sent to)."""
        if not self.sent:
            return ConfigRecord()
        content = self.sent[party if party is not None else min(self.sent)]
        return content.config_records.get("config", ConfigRecord())


Relay = Callable[[list[Message], Callable[[list[Message]], Iterable[Message]]], list[Message]]


class ServerGrid(GridProxy):
    """The grid the attacker hands the strategies it wraps.

    Every exchange passes through ``relay(messages, send)``, which may rewrite the
    messages before ``send`` delivers them and reads every reply. Push/pull is refused,
    so secure aggregation falls back to ``send_and_receive``: one exchange at a time,
    each seen whole by the attacker before anything else is sent.
    """

    def __init__(self, grid: Grid, relay: Relay) -> None:
        super().__init__(grid)
        self.relay = relay

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Relay one exchange through the attacker."""
        return self.relay(
            list(messages), lambda msgs: self.grid.send_and_receive(msgs, timeout=timeout)
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Refused: exchanges go through :meth:`send_and_receive`."""
        raise NotImplementedError("ServerGrid relays whole exchanges only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Refused: exchanges go through :meth:`send_and_receive`."""
        raise NotImplementedError("ServerGrid relays whole exchanges only")


def _with_content(msg: Message, content: RecordDict) -> Message:
    """``msg`` to the same node, of the same type, carrying ``content``."""
    return Message(
        content,
        dst_node_id=msg.metadata.dst_node_id,
        message_type=msg.metadata.message_type,
        group_id=msg.metadata.group_id,
    )


def _vectors(ex: Exchange) -> dict[int, np.ndarray]:
    """The ring vectors the parties sent back in ``ex``."""
    return {p: v for p, c in ex.received.items() if (v := wire.read_vector(c)) is not None}


def _error_line(reply: Message) -> str:
    lines = [ln for ln in str(reply.error.reason or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"error code {reply.error.code}"


class ActiveServer(StrategyWrapper):
    """What every malicious server shares: the relay, the transcript, the refusals.

    Parameters
    ----------
    inner : Strategy
        The honest server it subverts (secure aggregation, DP, FedAvg).
    party_of : Mapping[int, int]
        Node id -> party index (the server learns it at start-up).
    attack_round : int
        The round the attack acts in.
    target_party : int
        The party whose input the attack goes after (attacks on one party).
    codec : FixedPointCodec, optional
        The parties' fixed-point ring (default: that of the :class:`SecureAggregation`
        it wraps).
    timeout : float
        Seconds per exchange the attacker sends itself.
    message_config : Mapping, optional
        Entries added to the config of every message the attacker sends itself (default:
        those of the :class:`SecureAggregation` it wraps: privfl's parties read their
        round settings there).
    evaluator : ActiveServerEvaluator, optional
        Judges what the attack recovered against the parties' honest training (it holds
        the ground truth, the attacker does not). Without one :meth:`attack_reports` is
        empty and the findings stay in the attacker's attributes.

    Attributes
    ----------
    transcript : dict[int, list[Exchange]]
        Round -> every exchange of the round, in order (train messages included).
    refusals : list[Refusal]
        Every refusal reply the parties sent.
    errors : list[str]
        Every other failed reply (the last line of its error).
    failures : list[str]
        Rounds or sums that could not finish, and why.
    protocol_faults : list[str]
        Everything else secure aggregation logged (e.g. shares a party could not open).
    """

    method: ClassVar[str] = ""
    targets_one_party: ClassVar[bool] = True

    def __init__(
        self,
        inner: Strategy,
        *,
        party_of: Mapping[int, int],
        attack_round: int,
        target_party: int = 0,
        codec: FixedPointCodec | None = None,
        timeout: float = 600.0,
        message_config: Mapping[str, Any] | None = None,
        evaluator: ActiveServerEvaluator | None = None,
    ) -> None:
        super().__init__(inner)
        self.party_of = dict(party_of)
        self.node_of = {p: n for n, p in self.party_of.items()}
        self.attack_round = attack_round
        self.target = target_party
        if self.targets_one_party and self.target not in self.node_of:
            raise ValueError(
                f"{type(self).__name__}: target_party = {self.target} is held by no node "
                f"(parties: {sorted(self.node_of)}; attack.active_server.target_party)"
            )
        self._secagg = next((s for s in self._chain() if isinstance(s, SecureAggregation)), None)
        if codec is None:
            codec = self._secagg.codec if self._secagg is not None else FixedPointCodec()
        self.codec = codec
        self.timeout = timeout
        if message_config is None and self._secagg is not None:
            message_config = self._secagg.message_config
        self.message_config = dict(message_config or {})
        self.transcript: dict[int, list[Exchange]] = {}
        self.refusals: list[Refusal] = []
        self.errors: list[str] = []
        self.failures: list[str] = []
        self.protocol_faults: list[str] = []
        self.sent: dict[int, ArrayRecord] = {}
        self.evaluator = evaluator
        self._configs: dict[int, ConfigRecord] = {}
        self._round = 0
        self._grid: ServerGrid | None = None
        self._train: Exchange | None = None
        self._score: Score | None = None
        self._faults_read: dict[int, int] = {}

    @classmethod
    def from_scenario(
        cls, inner: Strategy, scenario: Scenario, *, party_of: Mapping[int, int]
    ) -> Self:
        """The attacker ``attack.active_server`` describes, with an evaluator of the run.

        Raises
        ------
        ValueError
            The scenario lacks what the attack needs (naming the key).
        """
        cls._check_scenario(scenario)
        return cls(inner, party_of=party_of, **cls._scenario_options(scenario))

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        """What the attack needs of the scenario (subclasses)."""

    @classmethod
    def _scenario_options(cls, scenario: Scenario) -> dict[str, Any]:
        """The keyword parameters ``scenario`` gives (subclasses add their own)."""
        settings = scenario.attack.active_server
        return {
            "attack_round": settings.round,
            "target_party": settings.target_party,
            "codec": FixedPointCodec.from_section(scenario.defense.secagg),
            "timeout": scenario.scenario.timeout,
            "message_config": {SCENARIO_KEY: scenario.to_json()},
            "evaluator": ActiveServerEvaluator(scenario),
        }

    def _chain(self) -> list[Strategy]:
        """The strategies this one wraps, outermost first."""
        chain = [self.inner]
        while isinstance(chain[-1], StrategyWrapper):
            chain.append(chain[-1].inner)
        return chain

    # ------------------------------------------------------------------ checks
    @classmethod
    def _require(cls, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"attack.active_server.method = {cls.method!r} needs {what}")

    def _require_protocol(self, *protocols: str) -> None:
        """The wrapped strategies run secure aggregation with one of ``protocols``."""
        if self._secagg is None or self._secagg.protocol not in protocols:
            raise ValueError(
                f"{type(self).__name__} needs a SecureAggregation inside it with protocol "
                f"{' or '.join(repr(p) for p in protocols)}"
            )

    # ------------------------------------------------------------------ the relay
    def _open(self, messages: list[Message]) -> Exchange:
        """Record an exchange about to be sent."""
        mtype = messages[0].metadata.message_type if messages else ""
        ex = Exchange(mtype)
        for m in messages:
            party = self.party_of.get(m.metadata.dst_node_id)
            if party is not None and m.has_content():
                ex.sent[party] = m.content
        self.transcript.setdefault(self._round, []).append(ex)
        return ex

    def _close(self, ex: Exchange, replies: Iterable[Message]) -> None:
        """Record the replies of ``ex``: contents, refusals, failures."""
        for reply in replies:
            party = self.party_of.get(reply.metadata.src_node_id)
            if party is None:
                continue
            if reply.has_error():
                reason = refusal_reason(reply)
                if reason is not None:
                    self.refusals.append(Refusal(self._round, party, ex.message_type, reason))
                else:
                    self.errors.append(
                        f"round {self._round}, party {party}, {ex.message_type}: "
                        f"{_error_line(reply)}"
                    )
            elif reply.has_content():
                ex.received[party] = reply.content

    def _relay(
        self, messages: list[Message], send: Callable[[list[Message]], Iterable[Message]]
    ) -> list[Message]:
        messages = self._rewrite_stage(messages)
        ex = self._open(messages)
        replies = list(send(messages))
        self._close(ex, replies)
        return replies

    def _rewrite_stage(self, messages: list[Message]) -> list[Message]:
        """A protocol stage the wrapped strategies send (unchanged unless overridden)."""
        return messages

    def _failed(self, server_round: int, why: object) -> None:
        self.failures.append(f"round {server_round}: {why}")

    def _read_faults(self, server_round: int) -> None:
        """What secure aggregation logged as going wrong since the last read: a skipped
        round is a failed sum; refusals and failed replies the relay saw already."""
        if self._secagg is None:
            return
        entries = self._secagg.faults.get(server_round, [])
        for f in entries[self._faults_read.get(server_round, 0) :]:
            reason = str(f.get("reason", ""))
            if reason.startswith("round skipped"):
                self._failed(server_round, f"{f.get('stage')}: {reason}")
            elif not reason.startswith(("refused: ", "failed: ")):
                who = f"party {f['party']}, " if f.get("party") is not None else ""
                self.protocol_faults.append(
                    f"round {server_round}, {who}{f.get('stage')}: {reason}"
                )
        self._faults_read[server_round] = len(entries)

    def _exchange(
        self,
        server_round: int,
        msg_type: str,
        configs: Mapping[int, Mapping[str, Any]],
        extra: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> Exchange:
        """Send one message of the attacker's own per party; the exchange as recorded."""
        assert self._grid is not None, "configure_train must run first"
        msgs = stage_messages(
            configs, self.node_of, self.message_config, server_round, msg_type, extra
        )
        self._grid.send_and_receive(msgs, timeout=self.timeout)
        return self.transcript[self._round][-1]

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages, as the attack wants them; recorded."""
        self._round = server_round
        self._grid = ServerGrid(grid, self._relay)
        self.sent[server_round] = arrays
        self._configs[server_round] = config
        msgs = self._configure_round(server_round, arrays, config)
        self._train = self._open(msgs) if msgs else None
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies, then aggregate as the attack wants."""
        replies = list(replies)
        if self._train is not None:
            self._close(self._train, replies)
        return self._aggregate_round(server_round, replies)

    def _configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        """The wrapped strategies' train messages (a failed key setup skips the round)."""
        assert self._grid is not None
        try:
            return list(self.inner.configure_train(server_round, arrays, config, self._grid))
        except SecureAggregationError as exc:
            self._failed(server_round, exc)
            return []
        finally:
            self._read_faults(server_round)

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategies' aggregate (a sum that cannot finish skips the round)."""
        try:
            return self.inner.aggregate_train(server_round, replies)
        except SecureAggregationError as exc:
            self._failed(server_round, exc)
            return None, None
        finally:
            self._read_faults(server_round)

    # ------------------------------------------------------------------ results
    @property
    def target_label(self) -> str:
        """``party <i>`` or ``all parties``."""
        return f"party {self.target}" if self.targets_one_party else "all parties"

    def _attempted(self) -> int:
        """How many inputs or noise vectors the attack went after."""
        return 1 if self.targets_one_party else len(self.node_of)

    def _evaluate(self) -> Score:
        """The evaluator's verdict on what was recovered (subclasses)."""
        raise NotImplementedError

    def attack_reports(self) -> list[AttackReport]:
        """One report: what was recovered (judged by the evaluator), what the parties
        refused; none without an evaluator."""
        if self.evaluator is None:
            return []
        if self._score is None:
            t0 = time.perf_counter()
            self._score = self._evaluate()
            self._score.metrics["evaluation_seconds"] = time.perf_counter() - t0
        score = self._score
        metrics: dict[str, float] = {
            "refusals": len(self.refusals),
            "failed_sums": len(self.failures),
            "errors": len(self.errors),
            "protocol_faults": len(self.protocol_faults),
            "attack_round": self.attack_round,
            **self.evaluator.party_metrics(),
            **score.metrics,
        }
        notes = [
            *score.notes,
            *(
                f"refused by party {r.party} (round {r.server_round}, {r.message_type}): {r.reason}"
                for r in self.refusals
            ),
            *(f"failed: {f}" for f in self.failures),
            *(f"protocol: {f}" for f in self.protocol_faults),
            *(f"error: {e}" for e in self.errors),
        ]
        return [
            AttackReport(
                name=self.method,
                role=ROLE,
                target=self.target_label,
                recovered=score.recovered,
                total=self._attempted(),
                metrics=metrics,
                notes=notes,
            )
        ]


# --------------------------------------------------------------------------- 1. downgrade


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


# --------------------------------------------------------------------------- 2. noise strip


class NoiseStripServer(ActiveServer):
    """Strip the distributed-DP noise off the attack round's sum.

    A party that trusts the server keys its noise share from the scenario seed
    (:func:`privfl.dp.seed_secret`) and sizes it for ``data.parties`` parties; the server
    regenerates every share with :func:`privfl.dp.distributed_noise` and subtracts them
    from the decoded sum, leaving the sum of the clipped updates. Stopped by parties that
    key their noise from a secret of their own (or the OS).

    Parameters
    ----------
    noise_share : callable
        ``noise_share(size, party=, server_round=)``: the noise vector (ring units,
        ``codec.scale`` per unit) the server believes ``party`` added to its input.
    **kwargs
        Those of :class:`ActiveServer`.
    """

    method = "noise_strip"
    targets_one_party = False

    def __init__(
        self, inner: Strategy, *, noise_share: Callable[..., np.ndarray], **kwargs: Any
    ) -> None:
        super().__init__(inner, **kwargs)
        if not any(
            isinstance(s, DPGlobalUpdate) and s.mode == "distributed" for s in self._chain()
        ):
            raise ValueError(
                "NoiseStripServer needs a DPGlobalUpdate(mode='distributed') inside it"
            )
        self.noise_share = noise_share
        self.residual: np.ndarray | None = None
        self.summed: list[int] = []
        self.noise_norm = float("nan")

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        cls._require(scenario.defense.dp.mode == "distributed", 'defense.dp.mode = "distributed"')

    @classmethod
    def _scenario_options(cls, scenario: Scenario) -> dict[str, Any]:
        options = super()._scenario_options(scenario)
        # What a party that trusts the server adds: noise keyed from the scenario seed.
        options["noise_share"] = partial(
            distributed_noise,
            scenario=scenario,
            scale=options["codec"].scale,
            secret=seed_secret(scenario),
            min_parties=scenario.data.parties,
        )
        return options

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_round(server_round, replies)
        if server_round == self.attack_round and arrays is not None:
            self._strip(server_round, arrays, metrics)
        return arrays, metrics

    def _strip(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> None:
        assert self._train is not None
        sent = flatten(self.sent[server_round].to_numpy_ndarrays())
        self.summed = sorted(self._train.received)
        # Every party weighs 1 under distributed DP: the mean times the count is the sum.
        count = float(metrics["num-examples"]) if metrics and "num-examples" in metrics else 0
        count = count or len(self.summed)
        total = (flatten(arrays.to_numpy_ndarrays()) - sent) * count
        noise = np.zeros_like(total)
        for party in self.summed:
            noise += self.noise_share(total.size, party=party, server_round=server_round)
        noise /= self.codec.scale
        self.noise_norm = float(np.linalg.norm(noise))
        self.residual = total - noise

    def _evaluate(self) -> Score:
        assert self.evaluator is not None
        return self.evaluator.score_noise_strip(
            self.residual, self.summed, noise_norm=self.noise_norm
        )


# --------------------------------------------------------------------------- 3. key MITM


class KeyMitmServer(ActiveServer):
    """Put the server's own channel keys between the target and everyone else (additive).

    The first train message of a key epoch carries the key directory. The target gets a
    directory in which every other party's channel key is one the server made; every
    other party gets one in which the target's key is the server's. Shares to and from
    the target are opened and re-sealed in the partial-sum stage, so every sum stays
    correct; with the target's partial sum, ``x_t = P_t - Σ_j s_jt + Σ_j s_tj``. Stopped
    by parties that check the directory's signatures against their roster.
    """

    method = "key_mitm"

    def __init__(self, inner: Strategy, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self._require_protocol("additive")
        self._session = b""
        self._real: dict[int, bytes] = {}  # the channel keys the parties advertised
        self._fake_sk: dict[int, bytes] = {}  # the server's stand-in for each party
        self._fake: dict[int, SecureChannel] = {}
        # (round, attempt) -> {"to": {j: s_tj}, "from": {j: s_jt}}, opened in the middle
        self._opened: dict[tuple[int, int], dict[str, dict[int, np.ndarray]]] = {}
        self.recovered: np.ndarray | None = None

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        cls._require(
            scenario.defense.secure_aggregation == "additive",
            'defense.secure_aggregation = "additive" (its key directory travels in train messages)',
        )

    def _configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        msgs = super()._configure_round(server_round, arrays, config)
        return [self._forge(m) for m in msgs]

    def _forge(self, msg: Message) -> Message:
        cfg = msg.content.config_records.get("config")
        if cfg is None or wire.PREFIX + "dir_parties" not in cfg:
            return msg
        parties = [int(p) for p in cfg[wire.PREFIX + "dir_parties"]]
        session = bytes(cfg[wire.PREFIX + "session"])
        if session != self._session:  # a new key epoch: new stand-ins
            self._session = session
            self._real = dict(zip(parties, map(bytes, cfg[wire.PREFIX + "dir_keys"]), strict=True))
            self._fake_sk = {p: private_bytes(X25519PrivateKey.generate()) for p in parties}
            self._fake = {p: SecureChannel(p, session, sk) for p, sk in self._fake_sk.items()}
        me = self.party_of[msg.metadata.dst_node_id]
        keys = [
            self._real[p]
            if p == me or (me != self.target and p != self.target)
            else self._fake[p].public_key
            for p in parties
        ]
        out = ConfigRecord(dict(cfg))
        out[wire.PREFIX + "dir_keys"] = keys
        content = RecordDict({k: v for k, v in msg.content.items() if k != "config"})
        content["config"] = out
        return _with_content(msg, content)

    def _open_as(self, me: int, sender: int, ct: bytes | memoryview, rnd: int, stage: str) -> bytes:
        # A fresh channel per ciphertext: the server keeps no replay state of its own.
        chan = SecureChannel(me, self._session, self._fake_sk[me])
        return chan.open(sender, self._real[sender], ct, rnd=rnd, stage=stage)

    def _rewrite_stage(self, messages: list[Message]) -> list[Message]:
        return [
            self._relay_shares(m) if m.metadata.message_type == wire.PARTIAL_SUM else m
            for m in messages
        ]

    def _relay_shares(self, msg: Message) -> Message:
        """Open the shares sealed for the server's stand-ins; re-seal them for the real party."""
        if not self._fake:
            return msg
        cfg = msg.content["config"]
        rnd, attempt = int(cfg[SERVER_ROUND]), int(cfg[wire.PREFIX + "attempt"])
        stage = share_stage(attempt)  # the additive protocol authenticates it in every share
        to = self.party_of[msg.metadata.dst_node_id]
        t = self.target
        opened = self._opened.setdefault((rnd, attempt), {"to": {}, "from": {}})
        shares: dict[int, bytes | memoryview] = dict(wire.unpack_shares(msg.content))
        try:
            for sender, ct in list(shares.items()):
                if to == t and sender != t:  # s_jt, sealed for the stand-in of t
                    pt = self._open_as(t, sender, ct, rnd, stage)
                    opened["from"][sender] = np.frombuffer(pt, dtype=self.codec.dtype).copy()
                    shares[sender] = self._fake[sender].seal(
                        t, self._real[t], pt, rnd=rnd, stage=stage
                    )
                elif to != t and sender == t:  # s_tj, sealed for the stand-in of j
                    pt = self._open_as(to, t, ct, rnd, stage)
                    opened["to"][to] = np.frombuffer(pt, dtype=self.codec.dtype).copy()
                    shares[t] = self._fake[t].seal(to, self._real[to], pt, rnd=rnd, stage=stage)
        except ChannelError as exc:  # the party did not take the forged directory
            self._failed(rnd, f"relaying shares to party {to}: {exc}")
            return msg
        content = RecordDict({k: v for k, v in msg.content.items() if k != wire.SHARES})
        content[wire.SHARES] = wire.pack_shares(shares)
        return _with_content(msg, content)

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_round(server_round, replies)
        if server_round == self.attack_round and arrays is not None:
            self._recover(server_round)
        return arrays, metrics

    def _recover(self, server_round: int) -> None:
        t = self.target
        for ex in reversed(self.transcript.get(server_round, [])):
            if ex.message_type != wire.PARTIAL_SUM or t not in ex.received:
                continue
            cfg = ex.config(t)
            opened = self._opened.get((server_round, int(cfg[wire.PREFIX + "attempt"])))
            partial = wire.read_vector(ex.received[t])
            others = [int(p) for p in cfg[wire.PREFIX + "parties"] if int(p) != t]
            if (
                partial is None
                or opened is None
                or set(opened["to"]) != set(others)
                or set(opened["from"]) != set(others)
            ):
                break
            x = partial.copy()
            for j in others:
                self.codec.sub(x, opened["from"][j], out=x)
                self.codec.add(x, opened["to"][j], out=x)
            self.recovered = self.codec.decode(x)
            return
        self._failed(server_round, f"no complete set of party {t}'s shares was opened")

    def _evaluate(self) -> Score:
        assert self.evaluator is not None
        rnd = self.attack_round
        return self.evaluator.score_input(self.target, rnd, self.sent.get(rnd), self.recovered)


# --------------------------------------------------------------------------- 4. isolation


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
        parties = [int(p) for p in cfg[wire.PREFIX + "parties"]]
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


# --------------------------------------------------------------------------- 5. round replay


class RoundReplayServer(ActiveServer):
    """Run a finished round again, same round number, same key epoch (masking).

    The pairwise masks of a round depend on the epoch's keys and the round number only,
    and the unmask stage reveals every self mask: ``y - PRG(b) = x + M`` with the same
    pairwise mask sum ``M`` both times. The replay sends the round's own aggregate as
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


# --------------------------------------------------------------------------- 6. model inconsistency


def dead_relu_model(
    model: nn.Module, arrays: ArrayRecord, probe: torch.Tensor
) -> tuple[ArrayRecord, str]:
    """``arrays`` with every ReLU of ``model`` switched off, and the output bias's key.

    Every layer but the output layer gets zero weights and a bias of -1, so every
    pre-activation is negative (a GroupNorm of a constant is its bias): local training
    then changes nothing but the output layer's bias. Checked on ``probe`` inputs with
    ``model`` (whose weights this overwrites: pass the attacker's own copy).

    Raises
    ------
    ValueError
        When ``model`` has no ReLU, or one stays alive on ``probe``.
    """
    layers = [(name, m) for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    out_layer = layers[-1][0]
    values = {k: a.numpy().copy() for k, a in arrays.items()}
    for name, m in layers[:-1]:
        for pname, _ in m.named_parameters(recurse=False):
            values[f"{name}.{pname}"][...] = -1.0 if pname == "bias" else 0.0
    dead = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("the model has no ReLU to switch off (model.name: use cnn or mlp)")
    alive: list[bool] = []
    hooks = [r.register_forward_hook(lambda _m, _i, o: alive.append(bool(o.any()))) for r in relus]
    try:
        model.load_state_dict(dead.to_torch_state_dict())
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    if any(alive):
        raise ValueError("a ReLU of the model stays alive with zero weights and bias -1")
    return dead, f"{out_layer}.bias"


class ModelInconsistencyServer(ActiveServer):
    """Send the target the real model and everyone else one whose ReLUs are dead (masking).

    Pasquini et al., "Eluding secure aggregation in federated learning via model
    inconsistency" (CCS 2022). The other parties' updates are zero except in the output
    bias, so the aggregate's weights are the target's update alone (scaled by its share
    of the examples). Stopped by parties that bind the model they received into their
    ciphertexts: parties sent different models cannot complete the sum.

    Parameters
    ----------
    model : nn.Module
        The attacker's own copy of the task model's architecture (its weights are
        overwritten) to check the dead model on.
    probe : Tensor
        Public inputs on which every ReLU must stay off.
    **kwargs
        Those of :class:`ActiveServer`.
    """

    method = "model_inconsistency"

    def __init__(
        self, inner: Strategy, *, model: nn.Module, probe: torch.Tensor, **kwargs: Any
    ) -> None:
        super().__init__(inner, **kwargs)
        self._require_protocol("additive", "masking")
        self._model = model
        self._probe = probe
        self.excluded = ""
        self.aggregate: dict[str, np.ndarray] | None = None

    @classmethod
    def _check_scenario(cls, scenario: Scenario) -> None:
        cls._require(scenario.defense.secure_aggregation != "none", "defense.secure_aggregation")

    @classmethod
    def _scenario_options(cls, scenario: Scenario) -> dict[str, Any]:
        fed = load_federation(scenario)
        return {
            **super()._scenario_options(scenario),
            "model": build_model(scenario, fed.num_classes),
            "probe": fed.public.images[:64],
        }

    def _configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        msgs = super()._configure_round(server_round, arrays, config)
        if server_round != self.attack_round:
            return msgs
        dead, self.excluded = dead_relu_model(self._model, arrays, self._probe)
        out = []
        for m in msgs:
            if self.party_of[m.metadata.dst_node_id] != self.target:
                content = RecordDict({k: v for k, v in m.content.items() if k != "arrays"})
                content["arrays"] = dead
                m = _with_content(m, content)
            out.append(m)
        return out

    def _aggregate_round(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_round(server_round, replies)
        if server_round == self.attack_round and arrays is not None:
            sent = self.sent[server_round]
            self.aggregate = {
                k: a.numpy().astype(np.float64) - sent[k].numpy().astype(np.float64)
                for k, a in arrays.items()
            }
        return arrays, metrics

    def _evaluate(self) -> Score:
        assert self.evaluator is not None
        rnd = self.attack_round
        return self.evaluator.score_isolated_update(
            self.target, rnd, self.sent.get(rnd), self.aggregate, exclude=[self.excluded]
        )


# --------------------------------------------------------------------------- factory

ACTIVE_SERVERS: dict[str, type[ActiveServer]] = {
    cls.method: cls
    for cls in (
        DowngradeServer,
        NoiseStripServer,
        KeyMitmServer,
        IsolationServer,
        RoundReplayServer,
        ModelInconsistencyServer,
    )
}


def build_active_server(
    strategy: Strategy, *, scenario: Scenario, party_of: Mapping[int, int]
) -> ActiveServer:
    """The malicious server ``attack.active_server.method`` names, wrapping ``strategy``
    (its ``from_scenario``)."""
    method = scenario.attack.active_server.method
    if method not in ACTIVE_SERVERS:
        raise ValueError(
            f"attack.active_server.method: unknown method {method!r}; accepted: "
            f"{', '.join(ACTIVE_SERVERS)}"
        )
    return ACTIVE_SERVERS[method].from_scenario(strategy, scenario, party_of=party_of)
