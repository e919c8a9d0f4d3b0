"""The defense sections of a scenario (``defense``, ``defense.secagg``, ``defense.dp``)
and the ring sizing of secure aggregation: the headroom bound, the automatic ring and the
masking graph's degree and threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from privfl.config.errors import _fail

if TYPE_CHECKING:
    # Annotations only: privfl.config.scenario imports this module.
    from privfl.config.scenario import Scenario


# Rings an automatic defense.secagg.ring_bits chooses from, smallest first.
RING_CHOICES = (32, 62)
# The model size the automatic ring under distributed DP is sized for (a union bound over
# coordinates: a larger model only needs a larger bound).
MAX_MODEL_PARAMETERS = 2**40
# Neighbours per party of the automatic masking graph, per bit of the party count (Bell et
# al. 2020 show O(log n) neighbours suffice for a random graph).
NEIGHBOUR_FACTOR = 3.0


def ring_units_needed(parties: int, max_abs: float, frac_bits: int) -> float:
    """A bound, in ring units, on the sum of ``parties`` values of magnitude at most
    ``max_abs`` encoded with ``frac_bits`` fractional bits (each rounds to within one unit)."""
    return parties * (max_abs * 2.0**frac_bits + 1.0)


def summands(scenario: Scenario) -> int:
    """The most party updates one secure sum holds: a round's parties."""
    return scenario.scenario.parties_per_round or scenario.data.parties


def has_headroom(parties: int, max_abs: float, frac_bits: int, ring_bits: int) -> bool:
    """Whether such a sum decodes without wrapping in the signed range of
    ``Z_{2^ring_bits}``: ``parties * (max_abs * 2^frac_bits + 1) < 2^(ring_bits - 1)``.

    The one copy of the bound: the scenario checks and
    :meth:`privfl.fixedpoint.FixedPointCodec.check_headroom` both ask it.
    """
    return ring_units_needed(parties, max_abs, frac_bits) < 2.0 ** (ring_bits - 1)


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
        known: 62, since a party may hold any number of examples). Under distributed DP
        see :meth:`distributed_ring_bits`.
        """
        if self.ring_bits:
            return self.ring_bits
        dp_mode = scenario.defense.dp.mode
        spp = scenario.data.samples_per_party
        if dp_mode == "distributed":
            return self.distributed_ring_bits(scenario)
        if not (dp_mode == "global" or spp):
            return RING_CHOICES[-1]
        weight = 1.0 if dp_mode == "global" else float(spp)
        n, max_abs = summands(scenario), self.clip_range * weight
        for bits in RING_CHOICES:
            if self.frac_bits <= bits - 2 and has_headroom(n, max_abs, self.frac_bits, bits):
                return bits
        return RING_CHOICES[-1]  # validate_for then names the keys to change

    def distributed_ring_bits(self, scenario: Scenario) -> int:
        """The smallest ring in which a round's noisy sum wraps with probability at most
        ``defense.dp.max_wrap_probability``, for any model of up to
        :data:`MAX_MODEL_PARAMETERS` coordinates.

        The sum holds a round's parties (``scenario.parties_per_round``, else all), each
        adding a clipped update and, at worst, the noise of a whole sum (a party sizes its
        noise for the fewest parties it accepts, at least one). Key setup checks the real
        model size again (:func:`privfl.dp.check_distributed`).
        """
        # privfl.dp reads scenarios, so it imports this package: imported here, not on top.
        from privfl.dp.accounting import global_noise_multiplier
        from privfl.dp.mechanisms import wrap_probability_bound

        dp = scenario.defense.dp
        n = summands(scenario)
        sigma = global_noise_multiplier(scenario) * math.sqrt(n)
        for bits in RING_CHOICES:
            if self.frac_bits > bits - 2 or not has_headroom(
                n, self.clip_range, self.frac_bits, bits
            ):
                continue
            p = wrap_probability_bound(
                dim=MAX_MODEL_PARAMETERS,
                parties=n,
                ring_bits=bits,
                frac_bits=self.frac_bits,
                clip_range=self.clip_range,
                clip=dp.clip,
                noise_multiplier=sigma,
                mechanism=dp.mechanism,
            )
            if p <= dp.max_wrap_probability:
                return bits
        return RING_CHOICES[-1]

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

        The bound of :func:`has_headroom` for values of magnitude
        ``clip_range * max_weight``.
        """
        max_abs = self.clip_range * max_weight
        if not has_headroom(parties, max_abs, self.frac_bits, self.ring_bits):
            bits = int(ring_units_needed(parties, max_abs, self.frac_bits)).bit_length() + 1
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
        n = summands(scenario)
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
        :meth:`dropout_threshold`, never to ``t <= (m + 1) / 2``: a server that tells
        parties different survivor sets could then have both a party's self-mask seed and
        all its round seeds revealed (see :mod:`privfl.secagg.masking`).
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
        # earlier ones (key setup) only leave the party out of that round.
        rate = sc.dropout_rate if sc.dropout_stage in ("train", "unmask") else 0.0
        if not rate:
            return
        reach, floor_t = self.dropout_threshold(m, rate), (m + 3) // 2
        t = self.threshold or (2 * m) // 3 + 1
        if not self.threshold and t > reach >= floor_t:
            object.__setattr__(self, "threshold", reach)
        elif t > reach:
            fix = "lower it" if self.threshold and reach >= floor_t else "raise neighbours"
            _fail(
                f"{key}.threshold",
                f"{t} of a neighbourhood of {m} cannot be reached with scenario.dropout_rate "
                f"= {rate:g} (expected survivors less one standard deviation: {reach}, a "
                f"safe floor is {floor_t}); {fix}, parties_per_round or lower the dropout rate",
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
