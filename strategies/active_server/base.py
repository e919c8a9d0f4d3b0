"""What every malicious server shares: the relay grid, the transcript, the refusals.

:class:`ActiveServer` is the base of every attack of this package; :class:`ServerGrid`
is the grid it hands the strategies it wraps, so each exchange passes through it
(:class:`Exchange` records it, :class:`Refusal` a party's refusal).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import ActiveServerEvaluator, Score
from privfl.config import SCENARIO_KEY, Scenario
from privfl.fixedpoint import FixedPointCodec
from privfl.flower import wire
from privfl.flower.transcript import Exchange, GridProxy, Transcript
from privfl.refusal import refusal_reason
from privfl.results import AttackReport
from privfl.strategies.secure_aggregation import SecureAggregation, SecureAggregationError
from privfl.strategies.wrapper import StrategyWrapper

ROLE = "malicious-server"
SERVER_ROUND = "server-round"


@dataclass(frozen=True)
class Refusal:
    """A party's refusal reply: who refused what, and the reason it gave."""

    server_round: int
    party: int
    message_type: str
    reason: str


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
        # What the server sent and received, by party: the live contents, as relayed.
        self.recorder = Transcript(self.party_of, copy=False)
        self.transcript = self.recorder.rounds
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
        ex = self.recorder.open(self._round, messages)
        if ex is None:  # no party among the recipients: an empty exchange keeps the order
            ex = Exchange(messages[0].metadata.message_type if messages else "")
            self.transcript.setdefault(self._round, []).append(ex)
        return ex

    def _close(self, ex: Exchange, replies: Iterable[Message]) -> None:
        """Record the replies of ``ex``: contents, refusals, failures."""
        replies = list(replies)
        self.recorder.close(ex, replies)
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
        msgs = wire.stage_messages(
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
