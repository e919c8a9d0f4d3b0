"""The model inconsistency: every party but the target gets a model whose ReLUs are dead."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn

from privfl.architecture import build_model
from privfl.attacks.active_server import Score
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.strategies.active_server.base import ActiveServer, _with_content


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
