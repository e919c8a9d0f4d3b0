"""Scenario files: parsed once into frozen dataclasses and validated there.

A scenario is a TOML file with the sections ``scenario``, ``data``, ``model``,
``training``, ``defense`` and ``attack``. Every key is checked: an unknown key, a
value of the wrong type or an impossible value raises :class:`ScenarioError` naming
the key (``data.parties``) and what would be accepted.

Submodules, by role (every public name is re-exported here):

- :mod:`~privfl.config.errors`: :class:`ScenarioError`.
- :mod:`~privfl.config.sections`: the sections of the run (``scenario``, ``data``,
  ``model``, ``strategy``, ``training``, ``party``, ``audit``) and their ``validate``.
- :mod:`~privfl.config.defense`: ``defense``, ``defense.secagg``, ``defense.dp`` and the
  ring sizing of secure aggregation (:func:`has_headroom`, the one headroom bound).
- :mod:`~privfl.config.attack`: ``attack`` and its per-attack tables.
- :mod:`~privfl.config.scenario`: :class:`Scenario`, the checks across sections and its
  plain forms (``to_dict`` / ``to_json``, computed once per instance).
- :mod:`~privfl.config.codec`: plain values to section dataclasses (type and unknown-key
  errors) and back; ``--set`` overrides (:func:`apply_overrides`).
- :mod:`~privfl.config.load`: :func:`load_scenario`, the shipped scenarios
  (:func:`scenario_dir`, :func:`resolve_scenario_path`) and the scenario in a message
  (:data:`SCENARIO_KEY`, :func:`scenario_from_json`).
"""

from privfl.config.attack import (
    ACTIVE_ATTACKS,
    ActiveServerSection,
    AttackSection,
    GradientInversionSection,
    ImprintSection,
    MembershipSection,
)
from privfl.config.codec import apply_overrides
from privfl.config.defense import (
    NEIGHBOUR_FACTOR,
    RING_CHOICES,
    DefenseSection,
    DPSection,
    SecAggSection,
    has_headroom,
    ring_units_needed,
)
from privfl.config.errors import ScenarioError
from privfl.config.load import (
    SCENARIO_KEY,
    load_scenario,
    resolve_scenario_path,
    scenario_dir,
    scenario_from_json,
)
from privfl.config.scenario import Scenario
from privfl.config.sections import (
    DATASETS,
    EMNIST_SPLITS,
    MODELS,
    ROBUST_STRATEGIES,
    STRATEGIES,
    AuditSection,
    DataSection,
    ModelSection,
    PartySection,
    ScenarioSection,
    StrategySection,
    TrainingSection,
)

__all__ = [
    "ACTIVE_ATTACKS",
    "DATASETS",
    "EMNIST_SPLITS",
    "MODELS",
    "NEIGHBOUR_FACTOR",
    "RING_CHOICES",
    "ROBUST_STRATEGIES",
    "SCENARIO_KEY",
    "STRATEGIES",
    "ActiveServerSection",
    "AttackSection",
    "AuditSection",
    "DPSection",
    "DataSection",
    "DefenseSection",
    "GradientInversionSection",
    "ImprintSection",
    "MembershipSection",
    "ModelSection",
    "PartySection",
    "Scenario",
    "ScenarioError",
    "ScenarioSection",
    "SecAggSection",
    "StrategySection",
    "TrainingSection",
    "apply_overrides",
    "has_headroom",
    "load_scenario",
    "resolve_scenario_path",
    "ring_units_needed",
    "scenario_dir",
    "scenario_from_json",
]
