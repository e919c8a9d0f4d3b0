"""The key man-in-the-middle: forge the key directory, open the target's shares in transit."""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import Score
from privfl.config import Scenario
from privfl.flower import wire
from privfl.secagg.additive import share_stage
from privfl.secagg.channel import ChannelError, SecureChannel, private_bytes
from privfl.strategies.active_server.base import SERVER_ROUND, ActiveServer, _with_content


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
        parties = wire.ids(cfg[wire.PREFIX + "dir_parties"])
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
            others = [p for p in wire.ids(cfg[wire.PREFIX + "parties"]) if p != t]
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
