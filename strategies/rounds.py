"""privfl's round bookkeeping around any Flower strategy.

:class:`FederationRounds` adds to whatever strategy aggregates (Flower's FedAvg, FedAdam,
FedProx, a user's own class) what a privfl run needs from the server: the public side
channels a party attaches (``privfl.side.*``) are collected and removed before Flower's
reply validation, cross-device rounds ask only a seeded sample of the parties, every
refusal and divergence is recorded, the run stops after a party diverged, no evaluation
is requested when the parties withhold it, and the released model keeps the dtypes of
the model sent (Flower's FedOpt strategies step with float64 scalars, which NumPy 2
promotes a float32 model to).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privfl.flower import side
from privfl.refusal import diverged_reason, refusal_reason
from privfl.seeding import parts_rng
from privfl.strategies.wrapper import StrategyWrapper


def sample_parties(
    parties: Iterable[int], per_round: int, *, seed: int, server_round: int
) -> list[int]:
    """The ``per_round`` parties of round ``server_round``, sorted; all of them when
    ``per_round`` is 0 or not below their number.

    Drawn without replacement from ``seed`` and the round alone, so a run is reproducible
    and every reader (server, evaluators) can recompute the sample. The sample is public:
    the server draws it, so it is no secret and no party's DP guarantee relies on it.
    """
    pool = sorted(set(parties))
    if not per_round or per_round >= len(pool):
        return pool
    rng = parts_rng(seed, server_round, _SAMPLE_TAG)
    return sorted(int(p) for p in rng.choice(pool, size=per_round, replace=False))


# Separates the party sample's random stream from any other stream seeded by (seed, round).
_SAMPLE_TAG = 0x5A4D


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the parties' metrics; parties without examples carry no weight.

    Passed to Flower's strategies as ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``:
    unlike Flower's default it tolerates a metric some parties do not report (a DP party
    withholds its train loss).
    """
    records = [r for r in records if float(r.metric_records["metrics"][weight_key]) > 0]
    total = sum(float(r.metric_records["metrics"][weight_key]) for r in records)
    out = MetricRecord({weight_key: total})
    if not records:
        return out
    keys = set().union(*(r.metric_records["metrics"].keys() for r in records)) - {weight_key}
    for key in sorted(keys):
        vals = [
            (
                float(r.metric_records["metrics"][key]),
                float(r.metric_records["metrics"][weight_key]),
            )
            for r in records
            if key in r.metric_records["metrics"]
        ]
        out[key] = sum(v * w for v, w in vals) / total
    return out


class FederationRounds(StrategyWrapper):
    """Side channels, faults and early stop around ``inner`` (innermost wrapper).

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy; built by the caller with every party in every round.
    evaluate : bool
        False when the parties withhold evaluation (their policy is public): the server
        does not ask for it.
    party_of : Mapping[int, int], optional
        Node id -> party index. Replies are aggregated in party order: Flower samples
        nodes with an unseeded ``random.sample``, and float sums in a different order
        differ in their last bits, so the same seed would not give the same numbers.
    parties_per_round : int
        Cross-device rounds: only the :func:`sample_parties` of a round (drawn from
        ``seed`` and the round, not by Flower's unseeded sampling) are asked to train and
        to evaluate; 0 asks every party ``inner`` asks. Needs ``party_of``.
    seed : int
        Seed of the party sample.

    Attributes
    ----------
    side_channel : dict[int, dict[str, Any]]
        Round -> ``privfl.side.<node>.<name>`` -> record, for every side record
        (:mod:`privfl.flower.side`).
    faults : dict[int, list[dict]]
        Round -> ``{node, stage, reason}`` for every refusal and divergence.
    stop_reason : str or None
        Set by the run when a party's training diverged: no further rounds are sent.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        evaluate: bool = True,
        party_of: Mapping[int, int] | None = None,
        parties_per_round: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(inner)
        self.evaluate = evaluate
        self.party_of = dict(party_of or {})
        if parties_per_round < 0:
            raise ValueError(f"parties_per_round must be >= 0, got {parties_per_round}")
        if parties_per_round and not self.party_of:
            raise ValueError("parties_per_round needs party_of (node id -> party index)")
        self.parties_per_round = parties_per_round
        self.seed = seed
        # Round -> the parties sampled for it (all parties when not sampling).
        self.sampled: dict[int, list[int]] = {}
        self.side_channel: dict[int, dict[str, Any]] = {}
        self.faults: dict[int, list[dict[str, Any]]] = {}
        self.stop_reason: str | None = None
        self._sent: ArrayRecord | None = None

    def _in_party_order(self, replies: Iterable[Message]) -> list[Message]:
        def party(msg: Message) -> int:
            node = msg.metadata.src_node_id
            return self.party_of.get(node, node)

        return sorted(replies, key=party)

    def _only_sampled(self, server_round: int, msgs: Iterable[Message]) -> list[Message]:
        """``msgs`` to the parties of this round's sample (all when not sampling)."""
        msgs = list(msgs)
        if not self.parties_per_round:
            return msgs
        chosen = set(
            sample_parties(
                self.party_of.values(),
                self.parties_per_round,
                seed=self.seed,
                server_round=server_round,
            )
        )
        self.sampled[server_round] = sorted(chosen)
        return [m for m in msgs if self.party_of.get(m.metadata.dst_node_id) in chosen]

    def _record_refusals(self, server_round: int, stage: str, replies: list[Message]) -> None:
        for msg in replies:
            if (reason := refusal_reason(msg)) is not None:
                text = "refused: " + reason
            elif (reason := diverged_reason(msg)) is not None:
                text = "diverged: " + reason
            else:
                continue
            self.faults.setdefault(server_round, []).append(
                {"node": msg.metadata.src_node_id, "stage": stage, "reason": text}
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, or send nothing once the run was stopped."""
        if self.stop_reason:
            return []
        self._sent = arrays
        return self._only_sampled(
            server_round, self.inner.configure_train(server_round, arrays, config, grid)
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, unless the run was stopped or the parties withhold evaluation; when
        sampling, the round's sampled parties evaluate."""
        if self.stop_reason or not self.evaluate:
            return []
        return self._only_sampled(
            server_round, self.inner.configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record refusals, then delegate."""
        replies = self._in_party_order(replies)
        self._record_refusals(server_round, "evaluate", replies)
        return self.inner.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record refusals, keep and strip the side channels, then delegate."""
        replies = self._in_party_order(replies)
        self._record_refusals(server_round, "train", replies)
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            for k, rec in side.records_of(msg.content).items():
                self.side_channel.setdefault(server_round, {})[side.tagged(k, node)] = rec
                del msg.content[k]
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        return _like(arrays, self._sent), metrics


def _like(arrays: ArrayRecord | None, sent: ArrayRecord | None) -> ArrayRecord | None:
    """``arrays`` with the dtype of the same-named array in ``sent``."""
    if arrays is None or sent is None:
        return arrays
    dtypes = {k: v.dtype for k, v in sent.items()}
    if all(v.dtype == dtypes.get(k, v.dtype) for k, v in arrays.items()):
        return arrays
    return ArrayRecord(
        {
            k: Array(v.numpy().astype(dtypes[k])) if k in dtypes and v.dtype != dtypes[k] else v
            for k, v in arrays.items()
        }
    )
