"""The whole scenario: its sections, the checks across them and its plain forms."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from privfl.config.attack import AttackSection
from privfl.config.codec import _build, _copy_plain, _to_plain, apply_overrides
from privfl.config.defense import DefenseSection
from privfl.config.errors import _fail
from privfl.config.sections import (
    ROBUST_STRATEGIES,
    AuditSection,
    DataSection,
    ModelSection,
    PartySection,
    ScenarioSection,
    StrategySection,
    TrainingSection,
)

# Attributes under which a Scenario keeps its plain dict and its JSON text (to_dict, to_json).
_PLAIN, _JSON = "_plain_cache", "_json_cache"


@dataclass(frozen=True)
class Scenario:
    """A fully resolved, validated scenario."""

    scenario: ScenarioSection = field(default_factory=ScenarioSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    defense: DefenseSection = field(default_factory=DefenseSection)
    party: PartySection = field(default_factory=PartySection)
    strategy: StrategySection = field(default_factory=StrategySection)
    attack: AttackSection = field(default_factory=AttackSection)
    audit: AuditSection = field(default_factory=AuditSection)

    def validate(self) -> None:
        # Validation completes the sections (an automatic ring, neighbours, threshold):
        # plain forms taken before it are stale.
        self.__dict__.pop(_PLAIN, None)
        self.__dict__.pop(_JSON, None)
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        n = self.data.parties
        gi = self.attack.gradient_inversion
        if self.attack.kind == "gradient-inversion":
            self._check_target("attack.gradient_inversion", gi.round, gi.target_party)
            if gi.method == "feature-span" and self.training.weight_decay:
                # decay adds a full-rank term to the dense layer's update
                _fail(
                    "attack.gradient_inversion.method",
                    "feature-span needs training.weight_decay = 0 "
                    f"(got {self.training.weight_decay})",
                )
        im = self.attack.imprint
        if self.attack.kind == "imprint":
            self._check_target("attack.imprint", im.round)
            changes_plan = bool(im.local_steps or im.batch_size or im.lr)
            if changes_plan and self.defense.dp.mode == "client" and im.round == 1:
                # DP-SGD parties calibrate their noise for the whole run in round 1.
                _fail(
                    "attack.imprint.round",
                    "must be > 1 when the server changes local_steps / batch_size under "
                    "DP-SGD (parties calibrate their noise on round 1's plan)",
                )
            if im.role == "malicious-participant":
                if im.participant >= n:
                    _fail("attack.imprint.participant", f"must be < data.parties ({n})")
                if im.round + 1 > self.scenario.rounds:
                    _fail(
                        "scenario.rounds",
                        "a malicious participant needs the global model after its round: "
                        f"rounds must be >= attack.imprint.round + 1 ({im.round + 1})",
                    )
        mi = self.attack.membership
        if (
            self.attack.kind == "membership-inference"
            and mi.target == "federated"
            and mi.target_party >= n
        ):
            _fail("attack.membership.target_party", f"must be < data.parties ({n})")
        sa = self.defense.secure_aggregation
        if sa != "none" and n < 2:
            _fail("defense.secure_aggregation", f"needs at least 2 parties, data.parties is {n}")
        robust = self.strategy.name in ROBUST_STRATEGIES
        if robust and sa != "none":
            _fail(
                "strategy.name",
                f"{self.strategy.name!r} ranks single updates, but with "
                f"defense.secure_aggregation = {sa!r} the server only ever sees their sum; use "
                "a mean-based strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)",
            )
        if self.strategy.name == "fedprox" and self.defense.dp.mode == "client":
            _fail(
                "strategy.name",
                "'fedprox' adds a proximal term to plain local training; DP-SGD parties "
                "(defense.dp.mode = 'client') do not train with it",
            )
        if robust and self.defense.dp.mode in ("global", "distributed"):
            _fail(
                "strategy.name",
                f"{self.strategy.name!r} with defense.dp.mode = {self.defense.dp.mode!r}: "
                "party-level DP calibrates its noise to the mean of clipped updates; use a "
                "mean-based strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)",
            )
        self.scenario.validate_for("scenario", self)
        self.defense.secagg.validate_for("defense.secagg", self)
        au = self.audit
        if au.enabled:
            mode = self.defense.dp.mode
            if self.attack.kind != "none":
                _fail("audit.enabled", f"audit a run without an attack, got {self.attack.kind!r}")
            if au.view != "aggregate" and mode in ("global", "distributed"):
                _fail(
                    "audit.view",
                    f"party-level DP is audited with canary parties in the aggregate; "
                    f"use view = 'aggregate', got {au.view!r}",
                )
            if au.target_party >= n:
                _fail("audit.target_party", f"must be < data.parties ({n})")
        if self.party.min_parties > n:
            _fail(
                "party.min_parties", f"must be <= data.parties ({n}), got {self.party.min_parties}"
            )
        act = self.attack.active_server
        if self.attack.kind == "active-server":
            self._check_target("attack.active_server", act.round, act.target_party)
        if self.data.samples_per_party and self.training.batch_size > self.data.samples_per_party:
            _fail(
                "training.batch_size",
                f"{self.training.batch_size} is larger than a party's data "
                f"(data.samples_per_party = {self.data.samples_per_party})",
            )

    # ----------------------------------------------------------------- conversions
    # The party policy and the secure-aggregation mod convert the scenario once per
    # message: the plain forms are computed once per instance and kept beside the fields
    # (not fields themselves, so equality, hash and repr are unchanged).
    def _check_target(self, key: str, rnd: int, party: int | None = None) -> None:
        """An attack's round falls inside the run and its target party exists."""
        n = self.data.parties
        if party is not None and party >= n:
            _fail(f"{key}.target_party", f"must be < data.parties ({n})")
        if rnd > self.scenario.rounds:
            _fail(f"{key}.round", f"must be <= scenario.rounds ({self.scenario.rounds})")

    def _plain(self) -> dict[str, Any]:
        plain = self.__dict__.get(_PLAIN)
        if plain is None:
            plain = _to_plain(self)
            object.__setattr__(self, _PLAIN, plain)
        return plain

    def to_dict(self) -> dict[str, Any]:
        # A fresh copy: callers edit it (replace applies overrides to it).
        return _copy_plain(self._plain())

    def to_json(self) -> str:
        text = self.__dict__.get(_JSON)
        if text is None:
            text = json.dumps(self._plain(), sort_keys=True)
            object.__setattr__(self, _JSON, text)
        return text

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Scenario:
        obj = _build(cls, raw, "")
        obj.validate()
        return obj

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        return cls.from_dict(json.loads(text))

    def replace(self, overrides: Iterable[str]) -> Scenario:
        """A copy with ``section.key=value`` overrides applied (values parsed as TOML)."""
        raw = self.to_dict()
        apply_overrides(raw, overrides)
        return Scenario.from_dict(raw)
