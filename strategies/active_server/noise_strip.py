"""The noise strip: regenerate the distributed-DP noise keyed from the seed, subtract it."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from privfl.attacks.active_server import Score
from privfl.config import Scenario
from privfl.dp import distributed_noise, flatten, seed_secret
from privfl.strategies.active_server.base import ActiveServer
from privfl.strategies.dp_global import DPGlobalUpdate


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
