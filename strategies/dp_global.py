"""DP-FedAvg (McMahan et al., ICLR 2018) as a wrapper around any Flower strategy.

Modes (``defense.dp.mode``):

``global``
    Every party's update Δ = reply − global model is clipped to L2 norm C (on the server,
    ``clipping = "server"``; or by :func:`privfl.clients.dp_mods.clip_update_mod` on the
    parties, ``clipping = "client"``, where the server re-clips as a no-op safeguard
    unless secure aggregation hides single updates). Every reply is weighted 1 and the
    unweighted mean gets Gaussian noise of std σ·C/n.
``distributed``
    The parties add integer noise inside secure aggregation
    (:func:`privfl.dp.distributed_noise`); this wrapper only accounts.

Under secure aggregation (``SecureAggregation`` ⊃ this wrapper) the wrapper receives ONE
synthetic reply carrying the decoded average model; its ``num-examples`` is the number
of parties summed (the secure-aggregation mod weights every party 1 in these modes).

Budget: party-level ε over rounds (one sampled Gaussian step per round at
``party_sampling_rate``, Opacus accountant). When the next round would exceed
``defense.dp.epsilon`` (and ``stop_when_exhausted``), :meth:`configure_train` sets
``exhausted`` and sends nothing; :meth:`aggregate_train` then returns ``(None, None)``, so
Flower's ``Strategy.start`` keeps the last released model and the run ends normally
with its results. A custom server loop can check ``exhausted`` and break.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from privfl.strategies.wrapper import StrategyWrapper

from privfl.config import Scenario
from privfl.dp import (
    GaussianAggregateMechanism,
    KeyStream,
    PartyAccountant,
    distributed_noise_multiplier,
    flatten,
    global_noise_multiplier,
    noise_key,
    party_accountant,
    record_with_vector,
    seed_secret,
)

log = logging.getLogger(__name__)


def _only(records: Mapping, what: str) -> str:
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
        The aggregation strategy (FedAvg with ``fraction_train = 1``: this wrapper does
        the party sampling, Poisson at ``defense.dp.party_sampling_rate``).
    scenario : Scenario
        ``defense.dp.mode`` must be ``global`` or ``distributed``.
    party_of : Mapping[int, int], optional
        Node id → party index, used to report per-party update norms.

    Attributes
    ----------
    epsilon_history : dict[int, float]
        ε after each released round.
    delta : float
    noise_multiplier : float
        σ of the mechanism (calibrated from ``defense.dp.epsilon`` unless given).
    exhausted : bool
        The budget stopped the run; later rounds send nothing.
    update_norms : dict[int, dict[int, float]]
        Round → party → L2 norm of its update before clipping (server-side clipping).
    """

    def __init__(
        self, inner: Strategy, *, scenario: Scenario, party_of: Mapping[int, int] | None = None
    ) -> None:
        dp = scenario.defense.dp
        if dp.mode not in ("global", "distributed"):
            raise ValueError(
                f"DPGlobalUpdate needs defense.dp.mode 'global' or 'distributed', got {dp.mode!r}"
            )
        super().__init__(inner)
        self.scenario = scenario
        self.party_of = dict(party_of or {})
        self.noise_multiplier = global_noise_multiplier(scenario)
        self.mechanism = GaussianAggregateMechanism(
            clip=dp.clip, noise_multiplier=self.noise_multiplier
        )
        self.delta = dp.delta
        self.exhausted = False
        self.update_norms: dict[int, dict[int, float]] = {}
        self._accountant: PartyAccountant | None = None
        self._current: ArrayRecord | None = None
        self._secure = scenario.defense.secure_aggregation != "none"
        # The auditor's canary parties (a lab instrument): () -> (their summed updates,
        # the public count they stand for in the average).
        self.canary_parties: Callable[[], tuple[np.ndarray, int]] | None = None
        # The server's own coins and (global mode) noise: global DP trusts the server by
        # construction, so they are keyed from the scenario for reproducible lab runs.
        self._secret = seed_secret(scenario)

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
            if self.scenario.defense.dp.mode == "distributed":
                dim = sum(a.size for a in arrays.to_numpy_ndarrays())
                sigma = distributed_noise_multiplier(self.scenario, dim)
            self._accountant = party_accountant(self.scenario, sigma)
        return self._accountant

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
            log.warning(
                "DP budget exhausted before round %d: ε=%.4f, one more round would exceed "
                "defense.dp.epsilon=%g; stopping (the last released model is kept)",
                server_round,
                acc.epsilon,
                acc.budget,
            )
            return []
        self._current = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        q = self.scenario.defense.dp.party_sampling_rate
        if q < 1.0:
            coins = KeyStream(
                noise_key(self.scenario, "party-sampling", -1, server_round, secret=self._secret)
            )
            keep = coins.uniform(len(messages)) < q
            messages = [m for m, k in zip(messages, keep, strict=True) if k]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server side), aggregate with ``inner``, add noise (global mode), account."""
        if self.exhausted or self._current is None:
            return None, None
        current = self._current
        base = flatten(current.to_numpy_ndarrays())
        valid = [r for r in replies if not r.has_error()]
        weight_key = getattr(self.inner, "weighted_by_key", "num-examples")
        num_parties = 0
        if self._secure:
            # One synthetic reply carrying the secure sum's average; its weight counts parties.
            for reply in valid:
                metrics = reply.content.metric_records[
                    _only(reply.content.metric_records, "MetricRecord")
                ]
                num_parties += int(metrics[weight_key])
        else:
            norms = self.update_norms.setdefault(server_round, {})
            for reply in valid:
                name = _only(reply.content.array_records, "ArrayRecord")
                record = reply.content.array_records[name]
                delta, norm = self.mechanism.constrain_sensitivity(
                    flatten(record.to_numpy_ndarrays()) - base
                )
                reply.content[name] = record_with_vector(record, base + delta)
                metrics = reply.content.metric_records[
                    _only(reply.content.metric_records, "MetricRecord")
                ]
                metrics[weight_key] = 1  # unweighted mean: sensitivity C/n
                norms[self.party_of.get(reply.metadata.src_node_id, reply.metadata.src_node_id)] = (
                    norm
                )
            num_parties = len(valid)

        arrays, metrics = self.inner.aggregate_train(server_round, valid) if valid else (None, None)
        eps = self._accountant.step(server_round)  # a configured round is a released step
        global_noise = self.scenario.defense.dp.mode == "global"
        if arrays is not None and (global_noise or self.canary_parties is not None):
            mean = flatten(arrays.to_numpy_ndarrays()) - base
            if self.canary_parties is not None:
                # The auditor's canary parties join the (secure, noisy) sum as parties would.
                canary_sum, count = self.canary_parties()
                mean = (mean * num_parties + canary_sum) / (num_parties + count)
                num_parties += count
            if global_noise:
                stream = KeyStream(
                    noise_key(self.scenario, "dp-fedavg", -1, server_round, secret=self._secret)
                )
                mean = self.mechanism.add_noise(mean, num_parties=num_parties, stream=stream)
            arrays = record_with_vector(arrays, base + mean)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["epsilon"] = eps
        log.info("round %d: party-level ε=%.4f (δ=%g)", server_round, eps, self.delta)
        return arrays, metrics

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
        dp = self.scenario.defense.dp
        log.info(
            "DPGlobalUpdate: mode=%s clip=%g σ=%.4f δ=%g budget ε=%s sampling q=%g",
            dp.mode,
            dp.clip,
            self.noise_multiplier,
            dp.delta,
            dp.epsilon or "none",
            dp.party_sampling_rate,
        )
        self.inner.summary()
