"""Server side of secure aggregation as a Flower strategy wrapper.

``SecureAggregation(inner, party_of=..., protocol=..., codec=...)`` runs the protocol's
message stages through the Grid inside each round and hands ``inner.aggregate_train``
one synthetic reply carrying ``global + sum_i w_i Δ_i / sum_i w_i`` (its weight,
``num-examples``, is ``sum_i w_i``: the parties' example counts, or their number where
DP weighs every party 1) and the weighted mean train loss. Any mean-based Flower
strategy (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, a user's subclass) aggregates
that one reply as it would the parties' own; an aggregator that ranks single updates
(FedMedian, FedTrimmedAvg, Krum) cannot, and the factory refuses that combination.
:meth:`SecureAggregation.from_scenario` reads a scenario's ``defense`` section.

privfl's own protocol is used rather than Flower's ``SecAggPlusWorkflow``: that one
runs only with the legacy API, derives its masks from a 32-bit seeded Mersenne twister,
and leaves every party's example count and metrics in plaintext.

One file for the server's side of both protocols: the key epochs (additive), the static
keys (masking), the stage runner and the fault log they share are the strategy's state.

Round trips per FL round: 2 (train + shares/masked input, then partial sums
/ unmask); key setup adds 1: once per key epoch (additive), or in a round where parties
take part for the first time, for those parties only (masking).

The strategy keeps no party's payload beyond the round that needs it. What the server
receives is what its grid carries: a :class:`privfl.flower.transcript.RecordingGrid`
around the grid records it (a curious server's transcript), and
:func:`privfl.flower.wire.curious_read` decodes one payload the way a curious server would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privfl.config import SCENARIO_KEY, Scenario
from privfl.errors import PrivflError
from privfl.fixedpoint import FixedPointCodec
from privfl.flower import side, wire
from privfl.flower.update import coordinates, with_delta
from privfl.refusal import diverged_reason, refusal_reason
from privfl.secagg.additive import AdditiveServer, RoundAbortedError
from privfl.secagg.identity import IdentityError, dh_public
from privfl.secagg.masking import MaskingError, MaskingServer, neighbourhoods
from privfl.strategies.wrapper import StrategyWrapper, strategy_chain, weighted_by_key

# Reply polling of stage exchanges: first wait, and the cap when the grid names none.
_MIN_POLL_S = 0.001
_MAX_POLL_S = 0.1


class SecureAggregationError(PrivflError, RuntimeError):
    """A round could not be aggregated securely (never replaced by a wrong sum)."""


_T = TypeVar("_T")


def _started(value: _T | None, what: str) -> _T:
    """``value``, set by ``configure_train``; a stage called before it is a caller's bug."""
    if value is None:
        raise SecureAggregationError(f"{what} before configure_train started the round")
    return value


class SecureAggregation(StrategyWrapper):
    """Wrap ``inner`` so that it only ever sees the securely aggregated update.

    Parameters
    ----------
    inner : Strategy
        The strategy that aggregates: a mean-based one (FedAvg, FedAdam, ...), or a
        :class:`~privfl.strategies.DPGlobalUpdate` (``secure_aggregation=True``) around it.
    party_of : Mapping[int, int]
        Node id -> party index (the parties' clients know their own index).
    protocol : {"additive", "masking"}
        Additive secret sharing, or pairwise masking with dropout recovery (Bonawitz).
    codec : FixedPointCodec, optional
        The ring the parties encode their updates in (default: 62-bit ring, 20
        fractional bits, values clipped to ±4); must match the parties'.
    threshold, neighbours : int
        Masking: the Shamir threshold (0: floor(2m/3) + 1 for neighbourhoods of m), and
        the neighbours each party masks with (0: all pairs; else an even k < parties of a
        round; the deterministic graph's caveat is in
        :func:`privfl.secagg.masking.neighbourhoods`). The protocol runs among the
        parties ``inner`` asks to train each round, on a graph over them: with parties
        sampled per round, each sample gets its own graph, with no new keys.
    max_retries : int
        Additive: re-share rounds after a party drops out mid-round.
    timeout : float
        Seconds per stage exchange.
    on_failure : {"skip", "raise"}
        A round whose sum cannot be completed (too few parties, refusals, corrupt
        shares) is recorded in :attr:`faults` and releases nothing (``"skip"``, the run
        goes on), or raises :class:`SecureAggregationError`.
    release_train_loss : bool
        Pass the parties' summed train loss on to ``inner`` (False where the parties
        withhold it, under DP).
    message_config : Mapping, optional
        Entries added to the config of every message this wrapper sends (privfl's own
        parties read their round settings there).
    roster : Mapping[int, bytes], optional
        Masking: the federation's public roster (party -> Ed25519 identity public key),
        which every party of a deployment holds. A party's static masking key is its
        identity key on the Montgomery curve, so the server reads the keys of the
        parties on it from there and asks only the others to register theirs. Public
        keys only: it tells the server nothing a party's traffic does not.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        party_of: Mapping[int, int],
        protocol: str = "additive",
        codec: FixedPointCodec | None = None,
        threshold: int = 0,
        neighbours: int = 0,
        max_retries: int = 2,
        timeout: float = 600.0,
        on_failure: str = "skip",
        release_train_loss: bool = True,
        message_config: Mapping[str, Any] | None = None,
        roster: Mapping[int, bytes] | None = None,
    ) -> None:
        if on_failure not in ("skip", "raise"):
            raise ValueError(f"on_failure must be 'skip' or 'raise', got {on_failure!r}")
        self.on_failure = on_failure
        super().__init__(inner)
        self.party_of = dict(party_of)
        self.node_of = {p: n for n, p in self.party_of.items()}
        if len(self.node_of) != len(self.party_of):
            raise ValueError(f"party_of maps several nodes to one party: {dict(party_of)}")
        self.protocol = protocol
        if self.protocol not in ("additive", "masking"):
            raise ValueError(
                f"protocol must be 'additive' or 'masking', got {self.protocol!r} "
                "(defense.secure_aggregation)"
            )
        for s in strategy_chain(inner):
            if getattr(s, "secure_aggregation", True) is False:
                raise ValueError(
                    f"{type(s).__name__} inside SecureAggregation receives one aggregate: "
                    "build it with secure_aggregation=True"
                )
        self.threshold = threshold
        self.neighbours = neighbours
        self.max_retries = max_retries
        self.timeout = timeout
        self.codec = codec or FixedPointCodec()
        self.release_train_loss = release_train_loss
        self.message_config = dict(message_config or {})
        self.round_trips: dict[int, int] = {}
        # Round -> what went wrong: {party, stage, reason} for every refusal, failed
        # reply, exclusion and skipped round.
        self.faults: dict[int, list[dict[str, Any]]] = {}
        self._grid: Grid | None = None
        self._global: ArrayRecord | None = None
        self._parties: list[int] = []
        self._epoch: dict[str, Any] | None = None
        # Masking: the run's session and every known party's static X25519 key.
        self._session = os.urandom(16)
        self._static: dict[int, bytes] = {}
        if roster and protocol == "masking":
            try:
                self._static = {int(p): dh_public(k) for p, k in roster.items()}
            except IdentityError as exc:
                raise ValueError(f"roster: {exc}") from None

    @classmethod
    def from_scenario(
        cls,
        inner: Strategy,
        scenario: Scenario,
        *,
        party_of: Mapping[int, int],
        on_failure: str = "skip",
        **overrides: Any,
    ) -> SecureAggregation:
        """The wrapper ``defense.secure_aggregation`` / ``defense.secagg`` describe;
        ``overrides`` replace single parameters (tests, benches)."""
        sec = scenario.defense.secagg
        params: dict[str, Any] = {
            "protocol": scenario.defense.secure_aggregation,
            "codec": FixedPointCodec.from_section(sec),
            "threshold": sec.threshold,
            "neighbours": sec.neighbours,
            "max_retries": sec.max_retries,
            "timeout": scenario.scenario.timeout,
            "release_train_loss": scenario.defense.dp.mode == "none",
            "message_config": {SCENARIO_KEY: scenario.to_json()},
        }
        params.update(overrides)
        return cls(inner, party_of=party_of, on_failure=on_failure, **params)

    # ------------------------------------------------------------------ helpers
    def _exchange(
        self,
        server_round: int,
        stage: str,
        msg_type: str,
        configs: Mapping[int, ConfigRecord],
        extra: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[int, RecordDict]:
        """Send one message per party, return ``{party: content}`` of error-free replies."""
        _started(self._grid, "a protocol stage")
        msgs = wire.stage_messages(
            configs, self.node_of, self.message_config, server_round, msg_type, extra
        )
        replies = self._send_and_receive(msgs)
        out = self._collect(server_round, stage, replies)
        self.round_trips[server_round] = self.round_trips.get(server_round, 0) + 1
        return out

    def _send_and_receive(self, msgs: list[Message]) -> list[Message]:
        """``grid.send_and_receive`` with a short, growing poll interval.

        Flower's grids poll for replies at a fixed interval (0.1 s in simulation), which
        adds up to that much idle time to every stage; our stages are short, so the wait
        between polls is a tenth of the time spent so far (at least 1 ms, at most the
        grid's own interval): a reply is seen at most ~10% later than it arrived.
        """
        grid = _started(self._grid, "sending")
        try:
            pending = set(grid.push_messages(msgs))
        except NotImplementedError:  # e.g. the in-process LoopbackGrid
            return list(grid.send_and_receive(msgs, timeout=self.timeout))
        cap = max(float(getattr(grid, "pull_interval", _MAX_POLL_S)), _MIN_POLL_S)
        start = time.monotonic()
        replies: list[Message] = []
        while pending:
            got = list(grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            spent = time.monotonic() - start
            if not pending or spent >= self.timeout:
                break
            time.sleep(min(max(0.1 * spent, _MIN_POLL_S), cap))
        return replies

    def fault(self, server_round: int, party: int | None, stage: str, reason: str) -> None:
        """Record what went wrong in a round, and with whom where that is known."""
        self.faults.setdefault(server_round, []).append(
            {"party": party, "stage": stage, "reason": reason}
        )

    def _collect(
        self, server_round: int, stage: str, replies: Iterable[Message]
    ) -> dict[int, RecordDict]:
        """``{party: content}`` of the error-free replies; every refusal or failure is a
        fault of ``stage``."""
        out = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = refusal_reason(msg)
                party = self.party_of.get(node)
                if reason is not None:
                    self.fault(server_round, party, stage, f"refused: {reason}")
                elif (why := diverged_reason(msg)) is not None:
                    self.fault(server_round, party, stage, f"diverged: {why}")
                else:
                    last = str(msg.error.reason or "").strip().splitlines()
                    self.fault(server_round, party, stage, f"failed: {last[-1] if last else ''}")
                continue
            if not msg.has_content() or node not in self.party_of:
                continue
            out[self.party_of[node]] = msg.content
        return out

    def _advertise(self, server_round: int, parties: list[int], session: bytes) -> dict[int, Any]:
        """The setup stage: each party's reply payload (its public keys)."""
        dim = coordinates(_started(self._global, "key setup"))
        cfg = {
            wire.PREFIX + "stage": "advertise",
            wire.PREFIX + "session": session,
            wire.PREFIX + "dim": dim,
            wire.PREFIX + "n": len(parties),
        }
        got = self._exchange(
            server_round,
            "setup/advertise",
            wire.SETUP,
            {p: ConfigRecord(dict(cfg)) for p in parties},
        )
        return {p: rec for p, c in got.items() if (rec := c.config_records.get(wire.PAYLOAD))}

    def _setup(self, server_round: int, parties: list[int]) -> None:
        """Additive: fresh signed channel keys for ``parties``; the epoch holds those that
        completed setup."""
        session = os.urandom(16)
        keys, sigs = {}, {}
        for p, rec in self._advertise(server_round, parties, session).items():
            if "chan_pk" in rec:
                keys[p] = bytes(rec["chan_pk"])
                sigs[p] = bytes(rec.get("sig", b""))
        ps = sorted(keys)
        if len(ps) < 2:
            raise SecureAggregationError(
                f"round {server_round}: only parties {ps} completed key setup; need 2"
            )
        self._epoch = {"session": session, "keys": keys, "sigs": sigs, "parties": ps, "fresh": True}

    def _register(self, server_round: int, parties: list[int]) -> None:
        """Masking: learn the static keys of parties not met before (once per party)."""
        for p, rec in self._advertise(server_round, parties, self._session).items():
            key = bytes(rec.get("dh_pk", b""))
            if len(key) == 32:
                self._static[p] = key
            else:
                self.fault(server_round, p, "setup", "excluded: no 32-byte static key")

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Inner's train messages plus what parties need; key setup when due."""
        self._grid, self._global = grid, arrays
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._parties = []
        if not msgs:  # e.g. a DP budget is spent: no round, nothing to protect
            return []
        unknown = [
            m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in self.party_of
        ]
        if unknown:
            raise SecureAggregationError(
                f"round {server_round}: nodes {unknown} have no party index"
            )
        parties = sorted(self.party_of[m.metadata.dst_node_id] for m in msgs)
        try:
            extra = (
                self._masking_round(server_round, parties)
                if self.protocol == "masking"
                else self._additive_round(server_round, parties)
            )
        except SecureAggregationError as exc:
            if self.on_failure == "raise":
                raise
            self._epoch, self._parties = None, []
            self.fault(server_round, None, "setup", f"round skipped: {exc}")
            return []
        out = []
        for m in msgs:
            party = self.party_of[m.metadata.dst_node_id]
            if party not in self._parties:
                continue
            cfg = ConfigRecord(dict(m.content.config_records.get("config", ConfigRecord())))
            for key, value in self.message_config.items():
                cfg.setdefault(key, value)
            cfg["server-round"] = server_round
            cfg[wire.PREFIX + "parties"] = wire.pack_ids(self._parties)
            cfg.update(extra(party))
            content = RecordDict({k: v for k, v in m.content.items() if k != "config"})
            content["config"] = cfg
            out.append(
                Message(
                    content,
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                    group_id=m.metadata.group_id or str(server_round),
                )
            )
        self.round_trips[server_round] = self.round_trips.get(server_round, 0) + 1
        return out

    def _additive_round(
        self, server_round: int, parties: list[int]
    ) -> Callable[[int], dict[str, Any]]:
        """Key setup when due; what each party's train message carries."""
        ep = self._epoch
        if ep is None or not set(parties) <= set(ep["parties"]):
            self._setup(server_round, parties)
        ep = _started(self._epoch, "the round's key epoch")
        self._parties = [p for p in parties if p in ep["parties"]]
        fresh, ep["fresh"] = ep["fresh"], False
        directory = (
            {
                wire.PREFIX + "dir_parties": wire.pack_ids(ep["parties"]),
                wire.PREFIX + "dir_keys": [ep["keys"][p] for p in ep["parties"]],
                wire.PREFIX + "dir_sigs": [ep["sigs"][p] for p in ep["parties"]],
            }
            if fresh
            else {}
        )
        return lambda party: {wire.PREFIX + "session": ep["session"], **directory}

    def _masking_round(
        self, server_round: int, parties: list[int]
    ) -> Callable[[int], dict[str, Any]]:
        """Register parties met for the first time; what each party's train message
        carries: the session, the graph's settings and its neighbours' static keys."""
        new = [p for p in parties if p not in self._static]
        if new:
            self._register(server_round, new)
        self._parties = [p for p in parties if p in self._static]
        if len(self._parties) < 2:
            raise SecureAggregationError(
                f"round {server_round}: only parties {self._parties} hold a static key; need 2"
            )
        graph = neighbourhoods(self._parties, self.neighbours)
        common = {
            wire.PREFIX + "session": self._session,
            wire.PREFIX + "neighbours": self.neighbours,
            wire.PREFIX + "threshold": self.threshold,
        }
        # Each party's own key too, so that it can tell a stale registration.
        return lambda party: {
            **common,
            **wire.pack_cts(
                {j: self._static[j] for j in [party, *graph[party]]}, wire.PREFIX + "nb_"
            ),
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Finish the protocol, decode the sum, hand ``inner`` one synthetic reply."""
        replies = list(replies)
        if not self._parties:
            return self.inner.aggregate_train(server_round, replies)
        got = self._collect(server_round, "train", replies)
        sides = side.collect(replies)
        arrays = _started(self._global, "aggregation")
        dim = coordinates(arrays) + wire.EXTRA_COORDS
        try:
            if self.protocol == "additive":
                total, included = self._finish_additive(server_round, got, dim)
            else:
                total, included = self._finish_masking(server_round, got, dim)
            vals = self.codec.decode(total)
            weight, wloss = vals[-2], vals[-1]
            if not weight > 0:
                raise SecureAggregationError(
                    f"round {server_round}: decoded total weight is {weight}; nothing to average"
                )
        except SecureAggregationError as exc:
            if self.on_failure == "raise":
                raise
            # No wrong sum, no crash: the round releases nothing and the run goes on.
            self.fault(server_round, None, "aggregate", f"round skipped: {exc}")
            self.included = {server_round: []}
            return None, None
        arrays = with_delta(self._global, vals[: -wire.EXTRA_COORDS] / weight)
        n_w = round(weight) if abs(weight - round(weight)) < 1e-3 else float(weight)
        metrics = MetricRecord({weighted_by_key(self.inner): n_w})
        if self.release_train_loss:
            metrics["train-loss"] = float(wloss / weight)
        content = RecordDict({"arrays": arrays, "metrics": metrics, **sides})
        self.included = {server_round: included}
        return self.inner.aggregate_train(
            server_round, [self._synthetic(server_round, content, replies)]
        )

    def _synthetic(self, server_round: int, content: RecordDict, replies: list[Message]) -> Message:
        base = next((m for m in replies if m.has_content()), None)
        meta = Metadata(
            run_id=base.metadata.run_id if base else 0,
            message_id="",
            src_node_id=0,  # the aggregate comes from no single node
            dst_node_id=base.metadata.dst_node_id if base else 0,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=time.time(),
            ttl=self.timeout,
            message_type="train",
        )
        return Message(content, metadata=meta)

    def _finish_additive(
        self, server_round: int, got: Mapping[int, RecordDict], dim: int
    ) -> tuple[np.ndarray, list[int]]:
        server = AdditiveServer(self.codec)
        parties = list(self._parties)
        shares = self._parse_shares(got, parties)
        attempt = 0
        while True:
            try:
                routed = server.route(shares, parties)
                cfgs = {
                    p: ConfigRecord(
                        {
                            wire.PREFIX + "attempt": attempt,
                            wire.PREFIX + "parties": wire.pack_ids(parties),
                            wire.PREFIX + "dim": dim,
                        }
                    )
                    for p in parties
                }
                extra = {p: {wire.SHARES: wire.pack_shares(routed[p])} for p in parties}
                got = self._exchange(server_round, f"sum#{attempt}", wire.PARTIAL_SUM, cfgs, extra)
                partials = {p: v for p, c in got.items() if (v := wire.read_vector(c)) is not None}
                return server.combine(partials, parties, dim), parties
            except RoundAbortedError as exc:
                attempt += 1
                parties = [p for p in parties if p not in exc.missing]
                if attempt > self.max_retries or len(parties) < 2:
                    raise SecureAggregationError(
                        f"round {server_round}: additive secure aggregation aborted "
                        f"{attempt} time(s) ({exc}); {len(parties)} parties left, "
                        f"max_retries={self.max_retries}"
                    ) from exc
                cfgs = {
                    p: ConfigRecord(
                        {
                            wire.PREFIX + "attempt": attempt,
                            wire.PREFIX + "parties": wire.pack_ids(parties),
                        }
                    )
                    for p in parties
                }
                got = self._exchange(server_round, f"reshare#{attempt}", wire.RESHARE, cfgs)
                shares = self._parse_shares(got, parties)

    @staticmethod
    def _parse_shares(
        got: Mapping[int, RecordDict], parties: list[int]
    ) -> dict[int, dict[int, memoryview]]:
        # A party whose shares are absent counts as missing: the attempt aborts.
        return {p: wire.unpack_shares(got[p]) for p in parties if p in got}

    def _finish_masking(
        self, server_round: int, got: Mapping[int, RecordDict], dim: int
    ) -> tuple[np.ndarray, list[int]]:
        server = MaskingServer(
            self.codec,
            self._session,
            self._parties,
            threshold=self.threshold,
            neighbours=self.neighbours,
        )
        masked, self_mask_shares, commits = {}, {}, {}
        for p in self._parties:
            if p not in got:
                continue
            y = wire.read_vector(got[p])
            rec = got[p].config_records.get(wire.PAYLOAD)
            try:
                cts = wire.unpack_cts(rec) if rec is not None else None
            except ValueError:
                cts = None
            if y is None or y.shape != (dim,) or y.dtype != self.codec.dtype or cts is None:
                what = "none" if y is None else f"{y.dtype} {tuple(y.shape)}"
                self.fault(
                    server_round,
                    p,
                    "train",
                    f"excluded: malformed masked input ({what}; expected {self.codec.dtype} "
                    f"({dim},) with share ciphertexts)",
                )
                continue
            masked[p], self_mask_shares[p] = y, cts
            if rec is not None and "commit" in rec:
                commits[p] = bytes(rec["commit"])
        try:
            survivors, dropped, routed = server.plan_unmask(masked, self_mask_shares)
        except MaskingError as exc:
            raise SecureAggregationError(f"round {server_round}: {exc}") from exc
        cfgs = {
            p: ConfigRecord(
                {
                    wire.PREFIX + "survivors": wire.pack_ids(survivors),
                    wire.PREFIX + "dropped": wire.pack_ids(dropped),
                    **wire.pack_cts(routed[p], wire.PREFIX + "in_"),
                }
            )
            for p in survivors
        }
        got = self._exchange(server_round, "unmask", wire.UNMASK, cfgs)
        reveals = {}
        for p, c in got.items():
            rec = c.config_records.get(wire.PAYLOAD)
            try:
                reveals[p] = {
                    "b": wire.unpack_cts(rec, "b_"),
                    "seed": wire.unpack_cts(rec, "seed_"),
                }
            except (ValueError, AttributeError):
                self.fault(server_round, p, "unmask", "excluded: malformed unmask reply")
                continue
            for sender, why in zip(rec.get("bad_from", []), rec.get("bad_why", []), strict=False):
                self.fault(
                    server_round,
                    int(sender),
                    "unmask",
                    f"party {p} could not open its share of the self-mask seed: {why}",
                )
        try:
            total = server.unmask(
                server_round, masked, survivors, dropped, reveals, commitments=commits
            )
        except MaskingError as exc:
            raise SecureAggregationError(f"round {server_round}: {exc}") from exc
        finally:
            for f in server.faults:
                self.fault(server_round, f["party"], f["stage"], f["reason"])
        return total, survivors
