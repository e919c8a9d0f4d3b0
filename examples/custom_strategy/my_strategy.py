"""A user's own Flower strategy: FedAvg with server momentum (FedAvgM, Hsu et al. 2019).

Nothing here knows about privfl. Under privfl's secure aggregation and DP, the strategy
receives one reply carrying the (privatised) average of the parties' models, so its
server step is post-processing of what the defenses release.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class ServerMomentum(FedAvg):
    """FedAvg whose global step is ``w ← w + lr · v``, ``v ← momentum · v + Δ``.

    Parameters
    ----------
    server_momentum : float
        Momentum of the server's velocity (0: plain FedAvg).
    server_lr : float
        Server learning rate applied to the velocity.
    **kwargs
        Passed to FedAvg.
    """

    def __init__(self, *, server_momentum: float = 0.9, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_momentum = server_momentum
        self.server_lr = server_lr
        self._global: dict[str, np.ndarray] = {}
        self._velocity: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model sent, then let FedAvg sample the parties."""
        self._global = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's average, turned into a momentum step."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        out = {}
        for key, avg in arrays.items():
            w = self._global[key]
            v = self.server_momentum * self._velocity.get(key, 0.0) + (avg.numpy() - w)
            self._velocity[key] = v
            out[key] = Array((w + self.server_lr * v).astype(w.dtype))
        return ArrayRecord(out), metrics
