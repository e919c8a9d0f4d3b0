"""The run's sections of a scenario: ``scenario``, ``data``, ``model``, ``strategy``,
``training``, ``party`` and ``audit``, each a frozen dataclass with its own ``validate``.

The defense and attack sections live in :mod:`privfl.config.defense` and
:mod:`privfl.config.attack`; checks across sections in :mod:`privfl.config.scenario`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from privfl.config.errors import _fail

if TYPE_CHECKING:
    # Annotations only: privfl.config.scenario imports this module.
    from privfl.config.scenario import Scenario


@dataclass(frozen=True)
class ScenarioSection:
    """Identity of the run."""

    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    rounds: int = 3
    # "auto" picks CUDA when present; "cpu" / "cuda" / "cuda:N" force it.
    device: str = "auto"
    # Fraction of one GPU each simulated party may hold (Flower client resources).
    gpus_per_party: float = 0.0
    cpus_per_party: int = 1
    # Seconds the server waits for replies in one exchange.
    timeout: float = 600.0
    # Parties sampled each round (0 = every party), drawn from seed and round number.
    # Party-level DP credits no amplification for this sample (a fixed-size sample the
    # server draws); defense.dp.party_sampling_rate must then stay 1.
    parties_per_round: int = 0
    # Simulated dropouts: each sampled party drops out of a round with this probability,
    # at dropout_stage (drawn from seed, round and party; the party simply stops answering).
    dropout_rate: float = 0.0
    dropout_stage: Literal["train", "advertise", "sum", "unmask"] = "train"

    def validate(self, key: str) -> None:
        if self.rounds < 1:
            _fail(f"{key}.rounds", f"must be >= 1, got {self.rounds}")
        if self.parties_per_round < 0:
            _fail(
                f"{key}.parties_per_round",
                f"must be >= 0 (0 = every party), got {self.parties_per_round}",
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail(f"{key}.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail(
                f"{key}.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if not 0.0 <= self.gpus_per_party <= 1.0:
            _fail(f"{key}.gpus_per_party", f"must be in [0, 1], got {self.gpus_per_party}")
        if self.cpus_per_party < 1:
            _fail(f"{key}.cpus_per_party", f"must be >= 1, got {self.cpus_per_party}")
        if self.timeout <= 0:
            _fail(f"{key}.timeout", f"must be > 0, got {self.timeout}")

    def per_round(self, parties: int) -> int:
        """Parties asked to train in one round, of a federation of ``parties``."""
        return min(self.parties_per_round, parties) if self.parties_per_round else parties

    def validate_for(self, key: str, scenario: Scenario) -> None:
        """Checks against the rest of the scenario (party count, DP sampling, protocol)."""
        n, m = scenario.data.parties, self.parties_per_round
        if m > n:
            _fail(f"{key}.parties_per_round", f"must be <= data.parties ({n}), got {m}")
        sa = scenario.defense.secure_aggregation
        if m and sa != "none" and m < 2:
            _fail(f"{key}.parties_per_round", f"secure aggregation needs >= 2 a round, got {m}")
        dp = scenario.defense.dp
        if m and dp.mode in ("global", "distributed") and dp.party_sampling_rate != 1.0:
            # Two samplers would compose into a sample no accountant here describes.
            _fail(
                "defense.dp.party_sampling_rate",
                f"must be 1.0 when {key}.parties_per_round samples the parties ({m} a "
                f"round); got {dp.party_sampling_rate}",
            )
        stage = self.dropout_stage
        if self.dropout_rate and stage != "train":
            allowed = {
                "additive": ("advertise", "sum"),
                "masking": ("advertise", "unmask"),
            }.get(sa, ())
            if stage not in allowed:
                _fail(
                    f"{key}.dropout_stage",
                    f"{stage!r} is no stage of defense.secure_aggregation = {sa!r}; accepted: "
                    f"{', '.join(('train', *allowed))}",
                )
        mp = scenario.party.min_parties
        if mp > self.per_round(n):
            _fail(
                "party.min_parties",
                f"must be <= the parties of a round ({self.per_round(n)}), got {mp}: "
                "every round would be refused",
            )


DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
EMNIST_SPLITS = ("letters", "balanced", "digits", "byclass", "bymerge", "mnist")


@dataclass(frozen=True)
class DataSection:
    """Where the data comes from and how it is split among the parties."""

    # mnist | fashion-mnist | emnist-<split> (letters, balanced, digits, byclass, ...) |
    # cifar10 | cifar100 | torchvision:<Class> | "module:loader" (your own)
    dataset: str = "mnist"
    # "" -> $PRIVFL_DATA if set, else the MNIST sample shipped with privfl ("embedded").
    root: str = ""
    download: bool = False
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    # Who draws the partition: privfl's own partitioners, or flwr-datasets' (optional package).
    partitioner: Literal["privfl", "flwr-datasets"] = "privfl"
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    shards_per_party: int = 2
    parties: int = 3
    # 0 = every sample of the party's partition.
    samples_per_party: int = 0
    # Fraction of each party's samples kept back as its local test split.
    party_test_fraction: float = 0.1
    # Samples of the test set the server evaluates on (0 = all).
    server_test_samples: int = 0

    def validate(self, key: str) -> None:
        known = self.dataset in DATASETS or self.dataset.startswith("emnist-")
        if not known and not _is_object_spec(self.dataset):
            _fail(
                f"{key}.dataset",
                f"unknown dataset {self.dataset!r}; accepted: {', '.join(DATASETS)}, "
                f"emnist-<split> with split in {', '.join(EMNIST_SPLITS)}, "
                "torchvision:<Class> (a torchvision dataset on disk) or 'module:loader'",
            )
        if self.dataset.startswith("emnist-"):
            split = self.dataset.removeprefix("emnist-")
            if split not in EMNIST_SPLITS:
                _fail(
                    f"{key}.dataset", f"unknown EMNIST split {split!r}; accepted: {EMNIST_SPLITS}"
                )
        if self.parties < 1:
            _fail(f"{key}.parties", f"must be >= 1, got {self.parties}")
        if self.alpha <= 0:
            _fail(f"{key}.alpha", f"must be > 0, got {self.alpha}")
        if self.shards_per_party < 1:
            _fail(f"{key}.shards_per_party", f"must be >= 1, got {self.shards_per_party}")
        if self.samples_per_party < 0:
            _fail(
                f"{key}.samples_per_party", f"must be >= 0 (0 = all), got {self.samples_per_party}"
            )
        if not 0.0 <= self.party_test_fraction < 1.0:
            _fail(
                f"{key}.party_test_fraction", f"must be in [0, 1), got {self.party_test_fraction}"
            )
        if self.server_test_samples < 0:
            _fail(f"{key}.server_test_samples", f"must be >= 0, got {self.server_test_samples}")


MODELS = ("cnn", "mlp", "lenet")


def _is_object_spec(text: str) -> bool:
    """``module:attr`` with a dotted module path and an attribute name (checked for form
    only; importing is left to the code that uses it)."""
    module, sep, attr = text.partition(":")
    names = [*module.split("."), *attr.split(".")]
    return bool(sep) and all(n.isidentifier() for n in names)


@dataclass(frozen=True)
class ModelSection:
    """The task model every party trains."""

    # cnn | mlp | lenet (the sigmoid LeNet of DLG) | "module:factory", where
    # factory(input_shape, num_classes) returns a torch.nn.Module.
    name: str = "cnn"
    hidden: int = 128  # width of the MLP's hidden layers / the CNN's dense layer

    def validate(self, key: str) -> None:
        if self.name not in MODELS and not _is_object_spec(self.name):
            _fail(
                f"{key}.name",
                f"unknown model {self.name!r}; accepted: {', '.join(MODELS)} or "
                "'module:factory' (factory(input_shape, num_classes) -> torch.nn.Module)",
            )
        if self.hidden < 1:
            _fail(f"{key}.hidden", f"must be >= 1, got {self.hidden}")


STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)

# Aggregators that rank or select single updates: meaningless on a secure sum.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")


@dataclass(frozen=True)
class StrategySection:
    """The server's aggregation strategy (``[strategy]``).

    ``name`` is a built-in (:data:`STRATEGIES`, Flower's classes of the same name) or a
    user's ``"module:Class"``; every other key of the table is a keyword argument of the
    class. They are checked for form here and against the class's signature where the
    server builds it (:func:`privfl.strategies.factory.build_strategy`), so a party never
    imports the server's strategy.
    """

    name: str = "fedavg"
    # The keyword arguments, canonical JSON (frozen and hashable like every section).
    options_json: str = "{}"

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments for the strategy class."""
        return json.loads(self.options_json)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], key: str) -> StrategySection:
        name = table.get("name", "fedavg")
        if not isinstance(name, str):
            _fail(f"{key}.name", f"must be a string, got {name!r}")
        options = {k: v for k, v in table.items() if k != "name"}
        for k, v in options.items():
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError):
                _fail(f"{key}.{k}", f"must be a string, number, boolean, list or table, got {v!r}")
        return cls(name=name, options_json=json.dumps(options, sort_keys=True))

    def to_table(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    def validate(self, key: str) -> None:
        if self.name not in STRATEGIES and not _is_object_spec(self.name):
            _fail(
                f"{key}.name",
                f"unknown strategy {self.name!r}; accepted: {', '.join(STRATEGIES)} or "
                "'module:Class' (a flwr.serverapp.strategy.Strategy subclass)",
            )


@dataclass(frozen=True)
class TrainingSection:
    """Local training on each party."""

    local_epochs: int = 1
    # > 0: exactly this many local optimiser steps per round instead of epochs.
    local_steps: int = 0
    batch_size: int = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def validate(self, key: str) -> None:
        if self.local_epochs < 1:
            _fail(f"{key}.local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.local_steps < 0:
            _fail(
                f"{key}.local_steps", f"must be >= 0 (0 = use local_epochs), got {self.local_steps}"
            )
        if self.batch_size < 1:
            _fail(f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            _fail(f"{key}.lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            _fail(f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            _fail(f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class PartySection:
    """What every party holds locally and enforces, whatever the server asks (``party``).

    A party takes its defenses (``defense.*``), data and model from its own copy of the
    scenario, never from a server message; the server may choose only the training
    hyper-parameters (``training.*``), within the bounds below. A request that asks for
    less is refused: nothing derived from the data leaves the party.
    """

    # Teaching mode: do whatever the server's messages ask (defenses, noise keys, sums of
    # any size, repeated rounds), as a party that trusts the server would.
    trust_server: bool = False
    # Fewest parties whose inputs a sum may hold before this party lets its input into it;
    # distributed DP sizes each party's noise share for it. 0 = automatic:
    # max(2, floor(2n/3) + 1) for n = the parties of a round (scenario.parties_per_round, or
    # data.parties when every party takes part): the masking threshold's rule.
    min_parties: int = 0
    # Where DP noise and DP sampling coins come from: "os" (the OS CSPRNG, secret and not
    # reproducible) or "lab" (an AES-CTR stream keyed from a party-local lab secret and
    # the scenario seed: reproducible on this machine, never in a message or results.json).
    noise: Literal["os", "lab"] = "os"
    # Bounds on what the server may ask for (0 = no bound).
    max_local_steps: int = 0
    min_batch_size: int = 1
    max_lr: float = 0.0
    # Answer evaluate requests (loss, accuracy, test-set size in plaintext): "auto"
    # withholds them under DP and releases them otherwise.
    evaluation: Literal["auto", "release", "withhold"] = "auto"

    def validate(self, key: str) -> None:
        if self.min_parties < 0:
            _fail(f"{key}.min_parties", f"must be >= 0 (0 = automatic), got {self.min_parties}")
        if self.min_parties == 1:
            _fail(
                f"{key}.min_parties",
                "must be >= 2: a sum of one party is that party's input (0 = automatic)",
            )
        if self.max_local_steps < 0:
            _fail(
                f"{key}.max_local_steps", f"must be >= 0 (0 = no bound), got {self.max_local_steps}"
            )
        if self.min_batch_size < 1:
            _fail(f"{key}.min_batch_size", f"must be >= 1, got {self.min_batch_size}")
        if self.max_lr < 0:
            _fail(f"{key}.max_lr", f"must be >= 0 (0 = no bound), got {self.max_lr}")

    def resolve_min_parties(self, parties: int) -> int:
        """The fewest parties this party accepts in a sum, for a federation of ``parties``."""
        if self.min_parties:
            return self.min_parties
        return min(parties, max(2, (2 * parties) // 3 + 1))


@dataclass(frozen=True)
class AuditSection:
    """The one-run privacy audit (``audit``): an empirical ε lower bound beside the
    accounted ε, from canaries only the auditor knows are in or out."""

    enabled: bool = False
    # Canaries, each included with probability 1/2 by the auditor's secret coins.
    canaries: int = 2000
    # What the auditor is handed: "aggregate" (every round's aggregate the server
    # receives: Dirac gradient canaries in the parties' training, or canary parties under
    # party-level DP); "party-update" (what the server receives from one party,
    # target_party, whose training holds every canary: its plain update, or its masked
    # payload under secure aggregation); "final-model" (the released model only, black box:
    # mislabelled canary records in the parties' data, scored by the model's loss).
    view: Literal["aggregate", "party-update", "final-model"] = "aggregate"
    target_party: int = 0
    confidence: float = 0.95
    # Fraction of the canaries guessed (half as in, half as out), fixed up front.
    guess_fraction: float = 0.05
    # A lower bound above the accounted ε is a privacy bug: exit non-zero.
    fail_on_violation: bool = True

    def validate(self, key: str) -> None:
        if self.canaries < 20:
            _fail(f"{key}.canaries", f"must be >= 20, got {self.canaries}")
        if not 0.5 <= self.confidence < 1:
            _fail(f"{key}.confidence", f"must be in [0.5, 1), got {self.confidence}")
        if not 0 < self.guess_fraction <= 1:
            _fail(f"{key}.guess_fraction", f"must be in (0, 1], got {self.guess_fraction}")
        if self.target_party < 0:
            _fail(f"{key}.target_party", f"must be >= 0, got {self.target_party}")
