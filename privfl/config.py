"""Scenario files: parsed once into frozen dataclasses and validated there.

A scenario is a TOML file with the sections ``scenario``, ``data``, ``model``,
``training``, ``defense`` and ``attack``. Every key is checked: an unknown key, a
value of the wrong type or an impossible value raises :class:`ScenarioError` naming
the key (``data.parties``) and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from privfl.errors import UserError


class ScenarioError(UserError, ValueError):
    """A scenario file or override is invalid; the message names the key."""


def _fail(key: str, msg: str) -> typing.NoReturn:
    raise ScenarioError(f"{key}: {msg}")


# --------------------------------------------------------------------------- sections


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
    dropout_stage: Literal["train", "advertise", "keyshare", "sum", "unmask"] = "train"

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
                "masking": ("advertise", "keyshare", "unmask"),
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


# Rings an automatic defense.secagg.ring_bits chooses from, smallest first.
RING_CHOICES = (32, 62)
# Neighbours per party of the automatic masking graph, per bit of the party count (Bell et
# al. 2020 show O(log n) neighbours suffice for a random graph).
NEIGHBOUR_FACTOR = 3.0


@dataclass(frozen=True)
class SecAggSection:
    """Parameters of secret-shared secure aggregation (``defense.secagg``)."""

    # Each coordinate of an update is clipped to [-clip_range, clip_range] before encoding.
    clip_range: float = 4.0
    # Fixed-point scale: 2**frac_bits quantisation steps per unit.
    frac_bits: int = 20
    # Ring Z_{2^ring_bits}; the encoder checks the headroom for n parties. 0 = automatic:
    # the smaller of RING_CHOICES that has headroom for the run's parties, clip range and
    # weights (see resolve_ring_bits); the validated scenario holds the chosen value.
    ring_bits: int = 0
    # Masking: Shamir threshold t (0 = floor(2m/3) + 1 for neighbourhoods of m, self
    # included) and neighbours per party (0 = all pairs; otherwise an even k < parties:
    # a k-regular Harary graph, offsets +-1 .. +-k/2 around a ring of the parties).
    threshold: int = 0
    neighbours: int = 0
    # Masking: size the neighbours from the parties of a round, n, as SecAgg+ does: the
    # smallest even k >= NEIGHBOUR_FACTOR * log2(n), all pairs when k >= n - 1. The
    # validated scenario holds the chosen k in ``neighbours``.
    auto_neighbours: bool = False
    # Additive: how many times a round is retried without the dropped parties.
    max_retries: int = 2

    def validate(self, key: str) -> None:
        if self.clip_range <= 0:
            _fail(f"{key}.clip_range", f"must be > 0, got {self.clip_range}")
        if not 1 <= self.frac_bits <= 40:
            _fail(f"{key}.frac_bits", f"must be in [1, 40], got {self.frac_bits}")
        if self.ring_bits != 0 and not 16 <= self.ring_bits <= 64:
            _fail(f"{key}.ring_bits", f"must be in [16, 64] or 0 (automatic), got {self.ring_bits}")
        if self.ring_bits and self.frac_bits > self.ring_bits - 2:
            _fail(
                f"{key}.frac_bits",
                f"must be <= ring_bits - 2 = {self.ring_bits - 2} (a sign bit and one "
                f"integer bit), got {self.frac_bits}",
            )
        if self.threshold < 0:
            _fail(f"{key}.threshold", f"must be >= 0 (0 = automatic), got {self.threshold}")
        if self.neighbours < 0:
            _fail(f"{key}.neighbours", f"must be >= 0 (0 = all pairs), got {self.neighbours}")
        if self.neighbours % 2:
            _fail(
                f"{key}.neighbours",
                f"must be even (the k-regular graph takes k/2 neighbours on each side), "
                f"or 0 for all pairs; got {self.neighbours}",
            )
        if self.max_retries < 0:
            _fail(f"{key}.max_retries", f"must be >= 0, got {self.max_retries}")
        if self.ring_bits:
            self.check_headroom(key, parties=1, max_weight=1.0)

    def resolve_ring_bits(self, scenario: Scenario) -> int:
        """The ring ``ring_bits = 0`` stands for in ``scenario``: 32 bits when they suffice.

        A 32-bit ring halves the keystream, the encoding work and the bytes sent, so it is
        taken whenever :meth:`check_headroom` passes for the run's parties and weights;
        otherwise 62. The weights must be known up front: 1 under ``defense.dp.mode``
        ``global`` / ``distributed``, else at most ``data.samples_per_party`` (0 = not
        known: 62, since a party may hold any number of examples). Distributed DP always
        gets 62: its noise needs headroom that depends on the model size, which is only
        checked at key setup (:func:`privfl.dp.check_distributed`).
        """
        if self.ring_bits:
            return self.ring_bits
        dp_mode = scenario.defense.dp.mode
        spp = scenario.data.samples_per_party
        if dp_mode == "distributed" or not (dp_mode == "global" or spp):
            return RING_CHOICES[-1]
        weight = 1.0 if dp_mode == "global" else float(spp)
        for bits in RING_CHOICES:
            need = scenario.data.parties * (self.clip_range * weight * 2.0**self.frac_bits + 1)
            if self.frac_bits <= bits - 2 and need < 2.0 ** (bits - 1):
                return bits
        return RING_CHOICES[-1]  # validate_for then names the keys to change

    @staticmethod
    def log_neighbours(parties: int) -> int:
        """SecAgg+'s degree for ``parties`` per round: the smallest even k >= NEIGHBOUR_FACTOR
        * log2(parties), or 0 (all pairs) when that leaves no party out."""
        k = math.ceil(NEIGHBOUR_FACTOR * math.log2(max(parties, 2)))
        k += k % 2
        return 0 if k >= parties - 1 else k

    @staticmethod
    def dropout_threshold(size: int, dropout_rate: float) -> int:
        """The largest threshold that neighbourhoods of ``size`` reach despite dropouts:
        their expected survivors less one standard deviation (binomial), rounded down."""
        q = dropout_rate
        return math.floor(size * (1 - q) - math.sqrt(size * q * (1 - q)))

    def neighbourhood_size(self, parties: int) -> int:
        """Parties in one masking neighbourhood, self included."""
        k = self.neighbours
        return parties if k == 0 or k >= parties - 1 else k + 1

    def check_headroom(self, key: str, *, parties: int, max_weight: float) -> None:
        """Fail unless ``parties`` clipped updates of weight ``max_weight`` sum without wrapping.

        The bound of :meth:`privfl.fixedpoint.FixedPointCodec.check_headroom`:
        ``parties * (clip_range * max_weight * 2^frac_bits + 1) < 2^(ring_bits - 1)``.
        """
        need = parties * (self.clip_range * max_weight * 2.0**self.frac_bits + 1.0)
        if need >= 2.0 ** (self.ring_bits - 1):
            bits = int(need).bit_length() + 1
            _fail(
                f"{key}.ring_bits",
                f"{self.ring_bits} bits leave no headroom for {parties} parties x clip_range "
                f"{self.clip_range:g} x weight {max_weight:g} at frac_bits={self.frac_bits}; "
                f"raise ring_bits to >= {bits} or lower frac_bits or clip_range",
            )

    def validate_for(self, key: str, scenario: Scenario) -> None:
        """Checks that need the rest of the scenario (party count, weights, protocol).

        Also fixes an automatic ``ring_bits`` (0) to :meth:`resolve_ring_bits`, so every
        reader of the validated scenario (codec, DP checks, results.json) sees one ring.
        """
        if not self.ring_bits:
            # Validation completes construction: the section is not shared yet.
            object.__setattr__(self, "ring_bits", self.resolve_ring_bits(scenario))
        protocol = scenario.defense.secure_aggregation
        if protocol == "none":
            return
        n = scenario.data.parties
        if protocol == "masking":
            self._check_masking(key, scenario)
        # Parties weigh their update by their number of examples, except under DP
        # (weight 1); without samples_per_party that number is only known at run time,
        # where the encoder checks it again.
        unit = scenario.defense.dp.mode in ("global", "distributed")
        spp = scenario.data.samples_per_party
        self.check_headroom(key, parties=n, max_weight=1.0 if unit or not spp else float(spp))

    def _check_masking(self, key: str, scenario: Scenario) -> None:
        """The masking graph and threshold for the parties of one round and its dropouts.

        Fixes an automatic ``neighbours`` to :meth:`log_neighbours`, and an automatic
        ``threshold`` that dropouts would not let neighbourhoods reach to
        :meth:`dropout_threshold` (never below a majority of the neighbourhood).
        """
        sc = scenario.scenario
        n = sc.per_round(scenario.data.parties)
        what = "the parties of a round" if n < scenario.data.parties else "data.parties"
        if self.auto_neighbours:
            k = self.log_neighbours(n)
            if self.neighbours not in (0, k):
                _fail(
                    f"{key}.neighbours",
                    f"is sized automatically ({k} for {n} parties a round) with "
                    f"{key}.auto_neighbours; leave it at 0, got {self.neighbours}",
                )
            object.__setattr__(self, "neighbours", k)  # validation completes construction
        if self.neighbours and self.neighbours >= n:
            _fail(
                f"{key}.neighbours",
                f"must be < {what} ({n}) for a k-regular graph (0 = all pairs), "
                f"got {self.neighbours}",
            )
        m = self.neighbourhood_size(n)
        if self.threshold > m:
            _fail(
                f"{key}.threshold",
                f"must be <= the neighbourhood size {m} (neighbours + 1 = "
                f"{what if m == n else f'{self.neighbours} + 1'}), "
                f"got {self.threshold}",
            )
        # Dropouts at or after the masked inputs need t survivors in every neighbourhood;
        # earlier ones only restart key setup.
        rate = sc.dropout_rate if sc.dropout_stage in ("train", "unmask") else 0.0
        if not rate:
            return
        reach, majority = self.dropout_threshold(m, rate), m // 2 + 1
        t = self.threshold or (2 * m) // 3 + 1
        if not self.threshold and t > reach >= majority:
            object.__setattr__(self, "threshold", reach)
        elif t > reach:
            fix = "lower it" if self.threshold and reach >= majority else "raise neighbours"
            _fail(
                f"{key}.threshold",
                f"{t} of a neighbourhood of {m} cannot be reached with scenario.dropout_rate "
                f"= {rate:g} (expected survivors less one standard deviation: {reach}, a "
                f"majority is {majority}); {fix}, parties_per_round or lower the dropout rate",
            )


@dataclass(frozen=True)
class DPSection:
    """Differential privacy (``defense.dp``).

    mode: ``none``; ``client`` (record-level DP-SGD on every party); ``global``
    (DP-FedAvg: clipped party updates, Gaussian noise on the aggregate);
    ``distributed`` (each party adds integer noise inside secure aggregation).
    """

    mode: Literal["none", "client", "global", "distributed"] = "none"
    # Target epsilon for the whole run; 0 means "use noise_multiplier as given".
    epsilon: float = 0.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    # Clipping norm: per-sample gradient norm (client) or party update norm (global).
    clip: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    # global mode: where updates are clipped; "client" is required under secure aggregation.
    clipping: Literal["client", "server"] = "client"
    # global mode: fraction of parties sampled each round (party-level amplification).
    party_sampling_rate: float = 1.0
    # distributed mode: the integer noise each party adds in the ring.
    mechanism: Literal["discrete-gaussian", "skellam"] = "skellam"
    # Stop the run cleanly once the budget is spent (global mode).
    stop_when_exhausted: bool = True
    # distributed mode: largest accepted probability that a coordinate of the noisy sum
    # wraps around the ring in a round (checked up front against defense.secagg).
    max_wrap_probability: float = 1e-9
    # client mode: per-sample clipping engine: privfl's one-pass book-keeping clipping
    # (layers it cannot clip exactly fall back to "hooks") or an Opacus engine.
    grad_sample_mode: Literal["bookkeeping", "hooks", "functorch", "ew", "ghost"] = "bookkeeping"

    def validate(self, key: str) -> None:
        if self.mode == "none":
            return
        if self.epsilon < 0:
            _fail(f"{key}.epsilon", f"must be >= 0, got {self.epsilon}")
        if self.epsilon == 0 and self.noise_multiplier <= 0:
            _fail(
                f"{key}.epsilon",
                f"mode={self.mode!r} needs a target epsilon > 0 or a noise_multiplier > 0",
            )
        if not 0 < self.delta < 1:
            _fail(f"{key}.delta", f"must be in (0, 1), got {self.delta}")
        if self.noise_multiplier < 0:
            _fail(f"{key}.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        if self.clip <= 0:
            _fail(f"{key}.clip", f"must be > 0, got {self.clip}")
        if not 0 < self.party_sampling_rate <= 1:
            _fail(
                f"{key}.party_sampling_rate", f"must be in (0, 1], got {self.party_sampling_rate}"
            )
        if self.mode == "client" and self.epsilon > 0 and self.noise_multiplier > 0:
            _fail(
                f"{key}.noise_multiplier",
                "mode='client' takes either a target epsilon (noise calibrated for the run) "
                f"or a noise_multiplier, not both (got epsilon={self.epsilon}, "
                f"noise_multiplier={self.noise_multiplier}); set one of them to 0",
            )
        if self.mode == "client" and self.party_sampling_rate != 1.0:
            _fail(
                f"{key}.party_sampling_rate",
                "only used by modes 'global' and 'distributed'; leave it at 1.0 with 'client'",
            )
        if not 0 < self.max_wrap_probability < 1:
            _fail(
                f"{key}.max_wrap_probability",
                f"must be in (0, 1), got {self.max_wrap_probability}",
            )


@dataclass(frozen=True)
class DefenseSection:
    secure_aggregation: Literal["none", "additive", "masking"] = "none"
    secagg: SecAggSection = field(default_factory=SecAggSection)
    dp: DPSection = field(default_factory=DPSection)

    def validate(self, key: str) -> None:
        self.secagg.validate(f"{key}.secagg")
        self.dp.validate(f"{key}.dp")
        if self.dp.mode == "distributed" and self.secure_aggregation == "none":
            _fail(
                f"{key}.dp.mode",
                "'distributed' adds noise inside secure aggregation; set "
                "defense.secure_aggregation to 'additive' or 'masking'",
            )
        if (
            self.dp.mode == "global"
            and self.secure_aggregation != "none"
            and self.dp.clipping == "server"
        ):
            _fail(
                f"{key}.dp.clipping",
                "the server cannot clip single updates under secure aggregation; use 'client'",
            )


@dataclass(frozen=True)
class GradientInversionSection:
    """Curious server inverting one party's update (``attack.gradient_inversion``)."""

    method: Literal["dlg", "idlg", "inverting-gradients"] = "dlg"
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
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        n = self.data.parties
        gi = self.attack.gradient_inversion
        if self.attack.kind == "gradient-inversion":
            if gi.target_party >= n:
                _fail("attack.gradient_inversion.target_party", f"must be < data.parties ({n})")
            if gi.round > self.scenario.rounds:
                _fail(
                    "attack.gradient_inversion.round",
                    f"must be <= scenario.rounds ({self.scenario.rounds})",
                )
        im = self.attack.imprint
        if self.attack.kind == "imprint":
            if im.round > self.scenario.rounds:
                _fail(
                    "attack.imprint.round", f"must be <= scenario.rounds ({self.scenario.rounds})"
                )
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
                f"defense.secure_aggregation = {sa!r} the server only ever sees their sum; "
                "use a mean-based strategy (fedavg, fedprox, fedadam, fedyogi, fedadagrad)",
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
                "mean-based strategy (fedavg, fedprox, fedadam, fedyogi, fedadagrad)",
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
            if act.target_party >= n:
                _fail("attack.active_server.target_party", f"must be < data.parties ({n})")
            if act.round > self.scenario.rounds:
                _fail(
                    "attack.active_server.round",
                    f"must be <= scenario.rounds ({self.scenario.rounds})",
                )
        if self.data.samples_per_party and self.training.batch_size > self.data.samples_per_party:
            _fail(
                "training.batch_size",
                f"{self.training.batch_size} is larger than a party's data "
                f"(data.samples_per_party = {self.data.samples_per_party})",
            )

    # ----------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

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


# --------------------------------------------------------------------------- parsing


def _to_plain(obj: Any) -> Any:
    if hasattr(obj, "to_table"):
        return obj.to_table()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(key, f"must be a table, got {type(value).__name__}")
        if hasattr(tp, "from_table"):  # a section with free-form keys ([strategy])
            return tp.from_table(value, key)
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            _fail(key, f"must be {_describe(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(key, f"must be {_describe(tp)}, got {value!r}")
        (inner, *_) = get_args(tp)
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}")
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be a boolean (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            _fail(key, f"unknown key; accepted keys here: {', '.join(names)}")
        kwargs[k] = _coerce(hints[k], v, key)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> None:
    """Apply ``section.key=value`` strings to a raw scenario dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        path = path.strip()
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise ScenarioError(f"override {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # bare words such as dirichlet or /data/mnist
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"override {item!r}: {p} is not a table")
        node[parts[-1]] = value


# Config key under which every server message carries the resolved scenario (JSON).
SCENARIO_KEY = "privfl.scenario"


@functools.lru_cache(maxsize=8)
def scenario_from_json(text: str) -> Scenario:
    """:meth:`Scenario.from_json`, parsed once per distinct text: parties receive the
    scenario in every message and validating it costs milliseconds; a Scenario is
    frozen, so sharing one is safe."""
    return Scenario.from_json(text)


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Read, override and validate a scenario TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from exc
    apply_overrides(raw, overrides)
    return Scenario.from_dict(raw)


def scenario_dir() -> Path:
    """Folder of the scenarios shipped with privfl (checkout or installed package)."""
    here = Path(__file__).resolve().parent
    # Installed: privfl/scenarios/. A checkout keeps them beside privfl/, next to
    # pyproject.toml (so an unrelated scenarios/ in site-packages is never picked).
    if (here / "scenarios").is_dir():
        return here / "scenarios"
    if (here.parent / "scenarios").is_dir() and (here.parent / "pyproject.toml").is_file():
        return here.parent / "scenarios"
    raise FileNotFoundError(
        f"privfl's scenarios folder was not found (looked in {here / 'scenarios'} and "
        f"{here.parent / 'scenarios'}); reinstall privfl"
    )


def resolve_scenario_path(name: str | Path) -> Path:
    """A path as given, or the name of a shipped scenario (with or without .toml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name.removesuffix(".toml")
    shipped = scenario_dir() / f"{stem}.toml"
    if shipped.is_file():
        return shipped
    raise ScenarioError(
        f"scenario {str(name)!r} not found as a file nor among the shipped ones "
        f"({', '.join(sorted(q.stem for q in scenario_dir().glob('*.toml')))})"
    )
