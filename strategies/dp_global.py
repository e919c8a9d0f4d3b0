"""DP-FedAvg (McMahan et al., ICLR 2018) as a wrapper around any Flower strategy.

``DPGlobalUpdate(inner, noise_multiplier=..., clipping_norm=..., delta=...)`` takes
explicit numbers, like Flower's ``DifferentialPrivacyServerSideFixedClipping``; it is
privfl's own rather than Flower's because it (a) runs under secure aggregation, where
the server holds one aggregate and no single update, (b) adds the noise *before* the
inner strategy's server step, so a server optimiser (FedAdam, FedYogi, a user's
momentum) only ever sees the privatised mean, (c) accounts party sampling with
amplification through Opacus' accountants, and (d) draws its noise from an AES-CTR
keystream. :meth:`DPGlobalUpdate.from_scenario` reads a scenario's ``defense.dp``.

Modes:

``global``
    Every party's update Δ = reply − global model is clipped to L2 norm C on the server
    (or by the parties' clip mod, where the server re-clips as a no-op safeguard unless
    secure aggregation hides single updates). Every reply is weighted 1 and the
    unweighted mean gets Gaussian noise of std σ·C/n.
``distributed``
    The parties add integer noise inside secure aggregation; this wrapper only accounts.

The inner strategy receives ONE synthetic reply carrying ``global + noisy mean`` with
weight (``num-examples`` or the inner's ``weighted_by_key``) the number of parties, so a
FedAvg-family inner returns that model unchanged and a FedOpt-family inner takes its
server step from it. Under secure aggregation (``SecureAggregation`` ⊃ this wrapper,
``secure_aggregation=True``) the reply it receives is already that aggregate.

Budget: party-level ε over rounds (one sampled Gaussian step per round). When the next
round would exceed ``epsilon_budget``, :meth:`configure_train` sets ``exhausted`` and
sends nothing; :meth:`aggregate_train` then returns ``(None, None)``, so Flower's
``Strategy.start`` keeps the last released model and the run ends normally. A custom
server loop can check ``exhausted`` and break. ``on_exhausted="raise"`` raises Flower's
``PrivacyBudgetExhausted`` instead (Flower's own ending: the ServerApp exits with its
"precondition unmet" code), for apps that rely on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from privfl.config import Scenario
from privfl.dp import (
    GaussianAggregateMechanism,
    KeyStream,
    PartyAccountant,
    accounted_sampling_rate,
    derive_noise_key,
    effective_noise_multiplier,
    global_noise_multiplier,
)
from privfl.flower import side
from privfl.flower.update import flat_delta, weights_of, with_delta
from privfl.strategies.wrapper import StrategyWrapper, weighted_by_key

log = logging.getLogger(__name__)


def _sole_key(records: Mapping, what: str) -> str:
    if len(records) != 1:
        raise ValueError(
            f"DPGlobalUpdate: a reply must carry exactly one {what}, got {len(records)}"
        )
    return next(iter(records))


class DPGlobalUpdate(StrategyWrapper):
    """Party-level DP for the global model (DP-FedAvg), wrapping ``inner``.

    Parameters
    ----------
    inner : Strategy
        A mean-based strategy (FedAvg, FedProx, FedAdam, ... with ``fraction_train =
        1``): this wrapper does the party sampling, Poisson at ``party_sampling_rate``.
    noise_multiplier : float
        σ: the noise std on the sum of clipped updates is σ·C.
    clipping_norm : float
        C, the L2 bound of one party's update.
    delta : float
        δ of the reported (ε, δ).
    mode : {"global", "distributed"}
        Who adds the noise: this server, or the parties inside secure aggregation.
    epsilon_budget : float, optional
        Stop before a round that would spend more (``None``: report ε only).
    party_sampling_rate : float
        Each party joins a round with this probability (server-side coins).
    accounted_sampling_rate : float, optional
        The rate the accountant may credit (default ``party_sampling_rate``; 1.0 where
        the parties do not trust the server's sampling).
    accountant : {"rdp", "prv"}
        The Opacus accountant.
    secure_aggregation : bool
        The wrapper sits inside :class:`SecureAggregation` and receives one aggregate.
    frac_bits : int, optional
        ``distributed`` mode: the fixed-point grid of the secure sum (its rounding slack
        lowers the effective noise multiplier the accountant uses).
    noise_seed : int, optional
        Key material of the server's coins and noise (reproducible lab runs; global DP
        trusts the server by construction). ``None``: the OS CSPRNG.
    party_of : Mapping[int, int], optional
        Node id → party index, used to report per-party update norms.
    on_exhausted : {"stop", "raise"}
        When the budget would be exceeded: send nothing more and keep the last released
        model, or raise ``flwr.serverapp.exception.PrivacyBudgetExhausted``.

    Attributes
    ----------
    epsilon_history : dict[int, float]
        ε after each released round.
    exhausted : bool
        The budget stopped the run; later rounds send nothing.
    update_norms : dict[int, dict[int, float]]
        Round → party → L2 norm of its update before clipping (server-side clipping).
    canary_parties : callable, optional
        The privacy auditor's canary parties: ``() -> (their summed updates, the count
        they stand for)``, added to the released sum as parties would be.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        delta: float,
        mode: Literal["global", "distributed"] = "global",
        epsilon_budget: float | None = None,
        party_sampling_rate: float = 1.0,
        accounted_sampling_rate: float | None = None,
        accountant: str = "rdp",
        secure_aggregation: bool = False,
        frac_bits: int | None = None,
        noise_seed: int | None = None,
        party_of: Mapping[int, int] | None = None,
        on_exhausted: Literal["stop", "raise"] = "stop",
    ) -> None:
        if on_exhausted not in ("stop", "raise"):
            raise ValueError(f"on_exhausted must be 'stop' or 'raise', got {on_exhausted!r}")
        if mode not in ("global", "distributed"):
            raise ValueError(
                f"DPGlobalUpdate needs defense.dp.mode 'global' or 'distributed', got {mode!r}"
            )
        if mode == "distributed" and (not secure_aggregation or frac_bits is None):
            raise ValueError(
                "DPGlobalUpdate: mode='distributed' runs inside secure aggregation "
                "(secure_aggregation=True) and needs its frac_bits"
            )
        if not noise_multiplier >= 0 or not clipping_norm > 0 or not 0 < delta < 1:
            raise ValueError(
                "DPGlobalUpdate: need noise_multiplier >= 0, clipping_norm > 0, 0 < delta < 1, "
                f"got {noise_multiplier}, {clipping_norm}, {delta}"
            )
        if not 0 < party_sampling_rate <= 1:
            raise ValueError(
                f"DPGlobalUpdate: party_sampling_rate must be in (0, 1], got {party_sampling_rate}"
            )
        super().__init__(inner)
        self.mode = mode
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.mechanism = GaussianAggregateMechanism(
            clip=clipping_norm, noise_multiplier=noise_multiplier
        )
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.party_sampling_rate = party_sampling_rate
        self.accounted_sampling_rate = (
            party_sampling_rate if accounted_sampling_rate is None else accounted_sampling_rate
        )
        self.accountant = accountant
        self.secure_aggregation = secure_aggregation
        self.frac_bits = frac_bits
        self.party_of = dict(party_of or {})
        self.on_exhausted = on_exhausted
        self.exhausted = False
        self.update_norms: dict[int, dict[int, float]] = {}
        self._accountant: PartyAccountant | None = None
        self._current: ArrayRecord | None = None
        self.canary_parties: Callable[[], tuple[np.ndarray, int]] | None = None
        self._secret = None if noise_seed is None else noise_seed.to_bytes(16, "big", signed=True)

    @classmethod
    def from_scenario(
        cls, inner: Strategy, scenario: Scenario, *, party_of: Mapping[int, int] | None = None
    ) -> DPGlobalUpdate:
        """The wrapper ``defense.dp`` describes (σ calibrated from ``epsilon`` unless set)."""
        dp = scenario.defense.dp
        if dp.mode not in ("global", "distributed"):
            raise ValueError(
                f"DPGlobalUpdate needs defense.dp.mode 'global' or 'distributed', got {dp.mode!r}"
            )
        return cls(
            inner,
            noise_multiplier=global_noise_multiplier(scenario),
            clipping_norm=dp.clip,
            delta=dp.delta,
            mode=dp.mode,
            epsilon_budget=dp.epsilon if dp.epsilon > 0 and dp.stop_when_exhausted else None,
            party_sampling_rate=dp.party_sampling_rate,
            accounted_sampling_rate=accounted_sampling_rate(scenario),
            accountant=dp.accountant,
            secure_aggregation=scenario.defense.secure_aggregation != "none",
            frac_bits=scenario.defense.secagg.frac_bits,
            noise_seed=scenario.scenario.seed,
            party_of=party_of,
        )

    # ------------------------------------------------------------------ accounting
    @property
    def epsilon_history(self) -> dict[int, float]:
        """ε after each released round."""
        return dict(self._accountant.history) if self._accountant else {}

    @property
    def epsilon(self) -> float:
        """ε spent so far."""
        return self._accountant.epsilon if self._accountant else 0.0

    def _ensure_accountant(self, arrays: ArrayRecord) -> PartyAccountant:
        if self._accountant is None:
            sigma = self.noise_multiplier
            if self.mode == "distributed":
                assert self.frac_bits is not None
                dim = sum(a.size for a in arrays.to_numpy_ndarrays())
                sigma = effective_noise_multiplier(sigma, self.clipping_norm, self.frac_bits, dim)
            self._accountant = PartyAccountant(
                noise_multiplier=sigma,
                sample_rate=self.accounted_sampling_rate,
                delta=self.delta,
                accountant=self.accountant,
                budget=self.epsilon_budget,
            )
        return self._accountant

    def _stream(self, purpose: str, server_round: int) -> KeyStream:
        return KeyStream(derive_noise_key(self._secret, purpose, -1, server_round))

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the parties of this round, or send nothing once the budget is spent."""
        acc = self._ensure_accountant(arrays)
        if self.exhausted:
            return []
        if acc.would_exceed():
            self.exhausted = True
            if self.on_exhausted == "raise":
                raise PrivacyBudgetExhausted(
                    f"round {server_round} would take party-level ε past {acc.budget:g} "
                    f"(spent {acc.epsilon:.4f})"
                )
            log.warning(
                "DP budget exhausted before round %d: ε=%.4f, one more round would exceed "
                "the budget ε=%g; stopping (the last released model is kept)",
                server_round,
                acc.epsilon,
                acc.budget,
            )
            return []
        self._current = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        q = self.party_sampling_rate
        if q < 1.0:
            keep = self._stream("party-sampling", server_round).uniform(len(messages)) < q
            messages = [m for m, k in zip(messages, keep, strict=True) if k]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server side), average, add noise (global mode), account; then hand
        ``inner`` one reply carrying the released model."""
        if self.exhausted or self._current is None:
            return None, None
        current = self._current
        # In party order: float sums in Flower's random sampling order would differ in
        # their last bits from run to run.
        valid = sorted(
            (r for r in replies if not r.has_error()),
            key=lambda r: self.party_of.get(r.metadata.src_node_id, r.metadata.src_node_id),
        )
        weight_key = weighted_by_key(self.inner)
        num_parties = 0
        if self.secure_aggregation:
            # One synthetic reply carrying the secure sum's average; its weight counts parties.
            for reply in valid:
                metrics = reply.content.metric_records[
                    _sole_key(reply.content.metric_records, "MetricRecord")
                ]
                num_parties += int(metrics[weight_key])
        else:
            norms = self.update_norms.setdefault(server_round, {})
            for reply in valid:
                name, record = weights_of(reply.content)
                delta, norm = self.mechanism.constrain_sensitivity(flat_delta(current, record))
                reply.content[name] = with_delta(current, delta, like=record)
                metrics = reply.content.metric_records[
                    _sole_key(reply.content.metric_records, "MetricRecord")
                ]
                metrics[weight_key] = 1  # unweighted mean: sensitivity C/n
                node = reply.metadata.src_node_id
                norms[self.party_of.get(node, node)] = norm
            num_parties = len(valid)
        eps = self._ensure_accountant(current).step(server_round)  # a configured round
        if not valid:
            return None, MetricRecord({"epsilon": eps})
        # The mean of the (clipped) updates, as FedAvg weighs them.
        mean_record = aggregate_arrayrecords([r.content for r in valid], weight_key)
        released = mean_record
        if self.mode == "global" or self.canary_parties is not None:
            mean = flat_delta(current, mean_record)
            if self.canary_parties is not None:
                # The auditor's canary parties join the (secure, noisy) sum as parties would.
                canary_sum, count = self.canary_parties()
                mean = (mean * num_parties + canary_sum) / (num_parties + count)
                num_parties += count
            if self.mode == "global":
                stream = self._stream("dp-fedavg", server_round)
                mean = self.mechanism.add_noise(mean, num_parties=num_parties, stream=stream)
            released = with_delta(current, mean, like=mean_record)
        arrays, metrics = self.inner.aggregate_train(
            server_round, [self._release(server_round, released, valid, weight_key, num_parties)]
        )
        metrics = MetricRecord() if metrics is None else metrics
        metrics["epsilon"] = eps
        log.info("round %d: party-level ε=%.4f (δ=%g)", server_round, eps, self.delta)
        return arrays, metrics

    def _release(
        self,
        server_round: int,
        arrays: ArrayRecord,
        replies: list[Message],
        weight_key: str,
        num_parties: int,
    ) -> Message:
        """The one reply ``inner`` aggregates: the released model, the parties' mean
        metrics (each weighted 1), and their public side channels (under the name
        secure aggregation gives them, ``privfl.side.<node>.<key>``)."""
        content = RecordDict({"arrays": arrays})
        metrics = MetricRecord({weight_key: num_parties})
        records = [
            r.content.metric_records[_sole_key(r.content.metric_records, "MetricRecord")]
            for r in replies
        ]
        for key in sorted(set().union(*(m.keys() for m in records)) - {weight_key}):
            vals = [float(m[key]) for m in records if key in m]
            metrics[key] = sum(vals) / len(vals)
        content["metrics"] = metrics
        for key, rec in side.collect(replies).items():
            content[key] = rec
        if self.secure_aggregation and len(replies) == 1:
            return Message(content, metadata=replies[0].metadata)
        meta = Metadata(
            run_id=replies[0].metadata.run_id,
            message_id="",
            src_node_id=0,  # the released model comes from no single node
            dst_node_id=replies[0].metadata.dst_node_id,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=time.time(),
            ttl=replies[0].metadata.ttl,
            message_type="train",
        )
        return Message(content, metadata=meta)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; nothing once the budget is spent (the model no longer changes)."""
        if self.exhausted:
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def summary(self) -> None:
        """Log the DP settings, then the inner strategy's summary."""
        log.info(
            "DPGlobalUpdate: mode=%s clip=%g σ=%.4f δ=%g budget ε=%s sampling q=%g",
            self.mode,
            self.clipping_norm,
            self.noise_multiplier,
            self.delta,
            self.epsilon_budget or "none",
            self.party_sampling_rate,
        )
        self.inner.summary()
