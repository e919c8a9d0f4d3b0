"""The model a scenario's federation runs: the honest task model of :mod:`privfl.models`,
or, when the scenario's attacker supplies the model (imprint), that task model behind the
attacker's rigged block. Server and parties build it from their own copies of the
scenario, so they agree on the architecture the server's weights are loaded into; the
honest builder itself knows nothing of attacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from privfl.attacks.imprint import rig_model
from privfl.config import Scenario
from privfl.data import sample_shape
from privfl.models import build_task_model
from privfl.training import seed_torch


def build_model(
    scenario: Scenario, num_classes: int, input_shape: Sequence[int] | None = None
) -> nn.Module:
    """The model every party of ``scenario`` trains, seeded by the scenario's seed.

    ``input_shape`` defaults to the shape of the scenario's samples
    (:func:`privfl.data.sample_shape`). When the scenario's attack ships a rigged model
    (imprint), the task model is wrapped so that the server and all parties agree on the
    architecture.
    """
    shape = tuple(sample_shape(scenario) if input_shape is None else input_shape)
    seed_torch(scenario.scenario.seed)
    model = build_task_model(
        scenario.model.name, num_classes, scenario.model.hidden, input_shape=shape
    )
    if scenario.attack.kind == "imprint":
        model = rig_model(model, scenario, num_classes)
    return model
