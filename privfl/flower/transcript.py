"""What the server sent and received: the one recorder of server traffic.

A :class:`Transcript` keeps, per round, every exchange of the server with the parties
it watches, in order: the message type, the content sent to each party and the content
each party answered with. It is what an attacker on the server side is handed — a
curious server reads one party's update from it, a malicious server the stage payloads
it subverts, a test what secure aggregation let through — and nothing else.

:class:`RecordingGrid` fills a transcript from a Grid's traffic, for strategies that run
unmodified; :class:`GridProxy` is the Grid that forwards everything, which the recording
grid and an attacker's rewriting grid subclass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid

ROUND_KEY = "server-round"


def snapshot(content: RecordDict) -> RecordDict:
    """An independent copy of a message's content, made the way it crosses the wire
    (``deepcopy`` fails on the memoryview-backed arrays of aggregated models)."""
    return recorddict_from_proto(recorddict_to_proto(content))


@dataclass
class Exchange:
    """One send/receive of the server: contents sent and received, by party (or node)."""

    message_type: str
    sent: dict[int, RecordDict] = field(default_factory=dict)
    received: dict[int, RecordDict] = field(default_factory=dict)

    def config(self, party: int | None = None) -> ConfigRecord:
        """The config sent to ``party`` (default: the first party sent to)."""
        if not self.sent:
            return ConfigRecord()
        content = self.sent[party if party is not None else min(self.sent)]
        return content.config_records.get("config", ConfigRecord())


class Transcript:
    """Round -> the exchanges of that round, in order.

    Parameters
    ----------
    party_of : Mapping[int, int], optional
        Node id -> party index: exchanges are keyed by party, and nodes without one are
        not recorded. Without it, by node id.
    watch : Iterable[int], optional
        Record only these parties (or nodes); default all.
    copy : bool
        Keep snapshots of the contents (default), not the live objects a strategy may
        still change.
    """

    def __init__(
        self,
        party_of: Mapping[int, int] | None = None,
        *,
        watch: Iterable[int] | None = None,
        copy: bool = True,
    ) -> None:
        self.party_of = dict(party_of) if party_of is not None else None
        self.watch = set(watch) if watch is not None else None
        self.copy = copy
        self.rounds: dict[int, list[Exchange]] = {}

    def who(self, node: int) -> int | None:
        """The key a node's traffic is recorded under, or None when it is not watched."""
        key = node if self.party_of is None else self.party_of.get(node)
        if key is None or (self.watch is not None and key not in self.watch):
            return None
        return key

    def _keep(self, content: RecordDict) -> RecordDict:
        return snapshot(content) if self.copy else content

    def open(self, server_round: int, messages: Iterable[Message]) -> Exchange | None:
        """Record an exchange about to be sent (None: it concerns no watched party)."""
        messages = list(messages)
        ours = [(k, m) for m in messages if (k := self.who(m.metadata.dst_node_id)) is not None]
        if not ours:
            return None
        ex = Exchange(messages[0].metadata.message_type)
        for k, m in ours:
            if m.has_content():
                ex.sent[k] = self._keep(m.content)
        self.rounds.setdefault(server_round, []).append(ex)
        return ex

    def close(self, ex: Exchange | None, replies: Iterable[Message]) -> None:
        """Record the contents of the error-free replies of ``ex``."""
        if ex is None:
            return
        for m in replies:
            k = self.who(m.metadata.src_node_id)
            if k is not None and not m.has_error() and m.has_content():
                ex.received[k] = self._keep(m.content)

    def exchanges(self, server_round: int, message_type: str | None = None) -> list[Exchange]:
        """The exchanges of a round, optionally only those of one message type."""
        return [
            ex
            for ex in self.rounds.get(server_round, [])
            if message_type is None or ex.message_type == message_type
        ]

    def received(self, server_round: int, key: int) -> list[RecordDict]:
        """Everything party (or node) ``key`` answered in a round, in order."""
        return [ex.received[key] for ex in self.exchanges(server_round) if key in ex.received]


class GridProxy(Grid):
    """A Grid that forwards everything to the grid it wraps; a recording or an attacker's
    grid subclasses it and overrides the exchanges it watches or rewrites."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward."""
        return self.grid.pull_messages(message_ids)

    def set_run(self, run):  # noqa: ANN001, ANN201 - Flower's signature
        """Forward."""
        return self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's signature
        """Forward."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forward."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forward."""
        return self.grid.get_node_ids()


class RecordingGrid(GridProxy):
    """A Grid that forwards everything and records the traffic into ``transcript``.

    The round of an exchange is read from the outgoing content's
    ``config["server-round"]``, else from the message's ``group_id``, else the last one
    seen.
    """

    def __init__(self, grid: Grid, transcript: Transcript | None = None) -> None:
        super().__init__(grid)
        self.transcript = transcript if transcript is not None else Transcript()
        self._pending: Exchange | None = None
        self._round = 0

    def _round_of(self, messages: list[Message]) -> int:
        for msg in messages:
            if msg.has_content():
                cfg = msg.content.config_records.get("config")
                if cfg is not None and ROUND_KEY in cfg:
                    return int(cfg[ROUND_KEY])
            gid = msg.metadata.group_id
            if gid and gid.isdigit():
                return int(gid)
        return self._round

    def _open(self, messages: list[Message]) -> Exchange | None:
        if messages:
            self._round = self._round_of(messages)
        return self.transcript.open(self._round, messages)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward; record the exchange."""
        messages = list(messages)
        ex = self._open(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.transcript.close(ex, replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward; a push that the grid takes opens an exchange that the pulls fill."""
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))  # a grid may refuse push/pull
        ex = self._open(messages)
        if ex is not None:
            self._pending = ex
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward; replies go to the last pushed exchange."""
        replies = list(self.grid.pull_messages(message_ids))
        self.transcript.close(self._pending, replies)
        return replies
