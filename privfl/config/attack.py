"""The attack sections of a scenario (``attack`` and its one table per attack)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from privfl.config.errors import _fail


@dataclass(frozen=True)
class GradientInversionSection:
    """Curious server inverting one party's update (``attack.gradient_inversion``)."""

    method: Literal["dlg", "idlg", "inverting-gradients", "feature-span"] = "dlg"
    target_party: int = 0
    round: int = 1
    iterations: int = 300
    restarts: int = 1
    lr: float = 1.0
    tv_weight: float = 1e-4
    labels_known: bool = False
    # "average": invert the update as one averaged step; "simulate": unroll the local steps.
    multi_step: Literal["average", "simulate"] = "average"
    recovered_psnr: float = 18.0
    # dlg with unknown labels: "analytic" recovers them from the last-layer bias gradient
    # first and holds them fixed; "joint" optimises soft labels with the images (original DLG).
    label_recovery: Literal["analytic", "joint"] = "analytic"
    # Public images the server feeds the model to estimate the batch's mean prediction
    # when counting labels (LLG*); 0 = estimate it from the gradient alone.
    auxiliary_samples: int = 1000
    # inverting-gradients: steps each random start runs before the best one (lowest
    # gradient distance) continues to `iterations`; 0 = every start runs all of them.
    trial_iterations: int = 0

    def validate(self, key: str) -> None:
        if self.trial_iterations < 0:
            _fail(f"{key}.trial_iterations", f"must be >= 0, got {self.trial_iterations}")
        if self.auxiliary_samples < 0:
            _fail(f"{key}.auxiliary_samples", f"must be >= 0, got {self.auxiliary_samples}")
        if self.target_party < 0:
            _fail(f"{key}.target_party", f"must be >= 0, got {self.target_party}")
        if self.round < 1:
            _fail(f"{key}.round", f"must be >= 1, got {self.round}")
        if self.iterations < 1:
            _fail(f"{key}.iterations", f"must be >= 1, got {self.iterations}")
        if self.restarts < 1:
            _fail(f"{key}.restarts", f"must be >= 1, got {self.restarts}")
        if self.lr <= 0:
            _fail(f"{key}.lr", f"must be > 0, got {self.lr}")
        if self.tv_weight < 0:
            _fail(f"{key}.tv_weight", f"must be >= 0, got {self.tv_weight}")
        if not 0 < self.recovered_psnr < 100:
            _fail(f"{key}.recovered_psnr", f"must be in (0, 100) dB, got {self.recovered_psnr}")


@dataclass(frozen=True)
class ImprintSection:
    """Imprint-layer extraction (``attack.imprint``)."""

    role: Literal["malicious-server", "malicious-participant"] = "malicious-server"
    # Number of imprint neurons; 0 = choose from target_fraction and the expected samples.
    bins: int = 0
    target_fraction: float = 0.95
    measurement: Literal["brightness", "random", "dct"] = "brightness"
    round: int = 1
    participant: int = 0  # which party is malicious (role malicious-participant)
    public_samples: int = 1000
    recovered_psnr: float = 18.0
    # Std of the block's probe columns: keeps bin gradients above the fixed-point step.
    probe_scale: float = 1.0
    # Malicious server only: put the block's shipped weights back into every global model
    # it broadcasts, so the trap is set again each round and the rigged model keeps
    # computing exactly the task model (training, and any DP noise on the block, cannot
    # drift it).
    rearm: bool = True
    # Malicious server only: the local steps and batch size it asks the parties for in
    # its attack round (FL servers set local hyper-parameters; one step of a small batch
    # makes the update an exact gradient). 0 = the scenario's training values.
    local_steps: int = 0
    batch_size: int = 0
    # ... and the learning rate (a larger one lifts the bin rows above float32 rounding).
    lr: float = 0.0

    def validate(self, key: str) -> None:
        if self.bins < 0:
            _fail(f"{key}.bins", f"must be >= 0 (0 = automatic), got {self.bins}")
        if not 0 < self.target_fraction < 1:
            _fail(f"{key}.target_fraction", f"must be in (0, 1), got {self.target_fraction}")
        if self.round < 1:
            _fail(f"{key}.round", f"must be >= 1, got {self.round}")
        if self.participant < 0:
            _fail(f"{key}.participant", f"must be >= 0, got {self.participant}")
        if self.public_samples < 2:
            _fail(f"{key}.public_samples", f"must be >= 2, got {self.public_samples}")
        if self.probe_scale <= 0:
            _fail(f"{key}.probe_scale", f"must be > 0, got {self.probe_scale}")
        for name in ("local_steps", "batch_size", "lr"):
            value = getattr(self, name)
            if value < 0:
                _fail(f"{key}.{name}", f"must be >= 0 (0 = the scenario's), got {value}")
            if value and self.role != "malicious-server":
                _fail(
                    f"{key}.{name}",
                    f"only a malicious server sets the parties' hyper-parameters; role is "
                    f"{self.role!r}",
                )


@dataclass(frozen=True)
class MembershipSection:
    """Query-only membership inference (``attack.membership``)."""

    attacks: tuple[str, ...] = ("qmia", "loss", "lira")
    # "single": one model trained on a member set; "federated": the global model.
    target: Literal["single", "federated"] = "single"
    target_party: int = 0
    # single target: records it is trained on (members) and epochs of training.
    members: int = 500
    # single target: independent small hospitals attacked, each with its own members and
    # non-members; their records are pooled so that low FPRs can be resolved.
    targets: int = 1
    epochs: int = 30
    # Evaluation set: this many members and ``eval_non_members`` non-members (0 = as many
    # as members). More non-members than members resolve low FPRs: 0.1% of n non-members
    # is floor(n / 1000) false positives, none at all below n = 1000.
    eval_samples: int = 500
    eval_non_members: int = 0
    public_samples: int = 5000
    shadow_models: int = 8
    fixed_variance: bool = True
    quantile_levels: int = 32
    # The FPR each attack aims for at its operating point (its flagged set).
    operating_fpr: float = 0.01
    # QMIA regressor: pinball loss on many quantile levels, or a Gaussian (mean, std) head.
    qmia_head: Literal["pinball", "gaussian"] = "pinball"
    qmia_epochs: int = 30
    # Regressors averaged per target (each qmia_epochs long): lowers the variance of the
    # predicted quantiles at the cost of training this many.
    qmia_ensemble: int = 1
    # Mimic classifiers (the target's architecture, distilled from its logits on the
    # public records) whose mean hinge is the regressor's location; 0 = none.
    qmia_mimics: int = 0

    @property
    def non_members(self) -> int:
        """Non-members scored: ``eval_non_members``, or ``eval_samples`` when that is 0."""
        return self.eval_non_members or self.eval_samples

    def validate(self, key: str) -> None:
        if not 0.0 < self.operating_fpr < 0.5:
            _fail(f"{key}.operating_fpr", f"must be in (0, 0.5), got {self.operating_fpr}")
        if self.qmia_epochs < 1:
            _fail(f"{key}.qmia_epochs", f"must be >= 1, got {self.qmia_epochs}")
        if self.qmia_ensemble < 1:
            _fail(f"{key}.qmia_ensemble", f"must be >= 1 regressor, got {self.qmia_ensemble}")
        if self.qmia_mimics < 0:
            _fail(f"{key}.qmia_mimics", f"must be >= 0 (0 = none), got {self.qmia_mimics}")
        if "lira" in self.attacks and self.shadow_models < 2:
            _fail(
                f"{key}.shadow_models", f"LiRA needs >= 2 shadow models, got {self.shadow_models}"
            )
        known = {"qmia", "loss", "lira"}
        bad = [a for a in self.attacks if a not in known]
        if bad or not self.attacks:
            _fail(
                f"{key}.attacks",
                f"unknown or empty {bad or list(self.attacks)}; accepted: {sorted(known)}",
            )
        for name in (
            "members",
            "epochs",
            "eval_samples",
            "public_samples",
            "shadow_models",
            "quantile_levels",
        ):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.targets < 1:
            _fail(f"{key}.targets", f"must be >= 1, got {self.targets}")
        if self.targets > 1 and self.target != "single":
            _fail(
                f"{key}.targets",
                f"pooling {self.targets} targets needs target = 'single' (a federated run "
                f"has one global model), got target = {self.target!r}",
            )
        if self.eval_non_members < 0:
            _fail(
                f"{key}.eval_non_members",
                f"must be >= 0 (0 = as many as eval_samples), got {self.eval_non_members}",
            )
        if self.eval_samples > self.members and self.target == "single":
            _fail(
                f"{key}.eval_samples",
                f"must be <= members ({self.members}), got {self.eval_samples}",
            )


ACTIVE_ATTACKS = (
    "downgrade",
    "noise_strip",
    "key_mitm",
    "isolation",
    "round_replay",
    "model_inconsistency",
)


@dataclass(frozen=True)
class ActiveServerSection:
    """A malicious server that breaks the protocol to reach one party (``attack.active_server``)."""

    method: Literal[
        "downgrade", "noise_strip", "key_mitm", "isolation", "round_replay", "model_inconsistency"
    ] = "downgrade"
    target_party: int = 0
    # The round in which the server attacks (>= 1).
    round: int = 1

    def validate(self, key: str) -> None:
        if self.target_party < 0:
            _fail(f"{key}.target_party", f"must be >= 0, got {self.target_party}")
        if self.round < 1:
            _fail(f"{key}.round", f"must be >= 1, got {self.round}")


@dataclass(frozen=True)
class AttackSection:
    kind: Literal[
        "none", "gradient-inversion", "imprint", "membership-inference", "active-server"
    ] = "none"
    gradient_inversion: GradientInversionSection = field(default_factory=GradientInversionSection)
    imprint: ImprintSection = field(default_factory=ImprintSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    active_server: ActiveServerSection = field(default_factory=ActiveServerSection)

    def validate(self, key: str) -> None:
        self.active_server.validate(f"{key}.active_server")
        self.gradient_inversion.validate(f"{key}.gradient_inversion")
        self.imprint.validate(f"{key}.imprint")
        self.membership.validate(f"{key}.membership")
