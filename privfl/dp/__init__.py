"""Differential privacy: noise from a keyed CSPRNG, Gaussian and integer mechanisms,
and privacy accounting through Opacus' accountants.

Randomness
    Every noise draw comes from an AES-256-CTR keystream (:class:`KeyStream`) whose key
    (:func:`noise_key`) is fresh from ``os.urandom`` by default (``party.noise = "os"``),
    or, in lab mode (``party.noise = "lab"``), HKDF-SHA256 of a party-local secret with
    the seed, purpose, party and round: a lab run reproduces its numbers while no message
    or result holds what is needed to regenerate the noise.

Mechanisms
    * :class:`GaussianAggregateMechanism` (DP-FedAvg, McMahan et al. 2018): clip each
      party's update to L2 norm C, add N(0, (σC/n)²) to the unweighted mean.
    * Distributed DP inside secure aggregation: each party adds integer noise of
      variance σ²C²s²/m in ring units (s = 2**frac_bits) to its encoded update before
      masking, m being the fewest parties it lets into a sum (``party.min_parties``);
      any sum it enters carries noise of standard deviation at least σCs, i.e. σC in
      real units. Skellam noise sums to Skellam noise exactly; discrete Gaussians sum to a
      distribution within a negligible distance of a discrete Gaussian at these scales.

Accounting
    Opacus' RDP or PRV accountant, for the sampled Gaussian mechanism. Distributed noise
    is accounted as a Gaussian with the sensitivity inflated by fixed-point rounding
    (C·s + sqrt(d)/2 ring units); :func:`check_distributed` insists the per-party noise is
    large enough (at least :data:`MIN_RING_NOISE_STD` ring units) for the Gaussian
    approximation of the integer noise to be immaterial.

Rooms: :mod:`privfl.dp.noise` (keyed randomness and exact samplers),
:mod:`privfl.dp.accounting` (Opacus accountants, calibration, the party's accountant),
:mod:`privfl.dp.mechanisms` (clipping, DP-FedAvg's Gaussian mechanism, distributed DP),
:mod:`privfl.dp.sgd` (the DP-SGD kernel) and :mod:`privfl.dp.clip` (per-sample clipping in
one backward pass). This package imports no Flower.
"""

from privfl.dp.accounting import (
    PartyAccountant,
    accounted_sampling_rate,
    calibrate_noise,
    epsilon_of_history,
    epsilon_spent,
    global_noise_multiplier,
    party_accountant,
)
from privfl.dp.mechanisms import (
    MAX_ROUNDING_INFLATION,
    MIN_RING_NOISE_STD,
    NOISE_TO_SIGNAL_WARNING,
    GaussianAggregateMechanism,
    check_distributed,
    clip_l2,
    distributed_epsilon,
    distributed_noise,
    distributed_noise_multiplier,
    effective_noise_multiplier,
    flatten,
    unflatten,
    utility_warning,
    wrap_probability_bound,
)
from privfl.dp.noise import KeyStream, derive_noise_key, noise_key, seed_secret

__all__ = [
    "MAX_ROUNDING_INFLATION",
    "MIN_RING_NOISE_STD",
    "NOISE_TO_SIGNAL_WARNING",
    "GaussianAggregateMechanism",
    "KeyStream",
    "PartyAccountant",
    "accounted_sampling_rate",
    "calibrate_noise",
    "check_distributed",
    "clip_l2",
    "derive_noise_key",
    "distributed_epsilon",
    "distributed_noise",
    "distributed_noise_multiplier",
    "effective_noise_multiplier",
    "epsilon_of_history",
    "epsilon_spent",
    "flatten",
    "global_noise_multiplier",
    "noise_key",
    "party_accountant",
    "seed_secret",
    "unflatten",
    "utility_warning",
    "wrap_probability_bound",
]
