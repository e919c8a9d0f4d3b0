"""Imprint-layer extraction: a rigged model that lets whoever sees an aggregate read
single training samples out of it (Fowl et al., "Robbing the Fed", ICLR 2022).

The block
---------
:class:`ImprintBlock` sits in front of the task model. Its encoder has ``F × k`` ReLU
neurons that all measure the same linear function ``m(x) = a·x`` of the image (mean
brightness, a random projection or a DCT mode); neuron ``i`` of each family has the bias
``-t_i``, with ``t_1 < … < t_k`` the quantiles of ``m`` on the attacker's public data, so
it fires for every sample with ``m(x) > t_i``. For one sample ``n`` and one family
``f`` the gradient of the encoder row ``i`` is ``g_fn · x_n`` and that of its bias
``g_fn``, with ``g_fn = c_f · ∂L/∂y_n`` the same for every neuron of the family (all of
a family's neurons feed the output through the same column ``c_f``). The aggregated
update is a weighted sum of such terms, so the difference of neighbouring rows keeps
only the samples whose measurement lies in ``(t_i, t_{i+1}]``, and when that bin holds
one sample, ``ΔW_i / Δb_i = x_n`` exactly, whatever the learning rate, batch size or
FedAvg weight in front of it.

Collisions are found from the update alone: each bin is seen through ``F = 3``
families with probe columns ``c_A``, ``c_B`` and ``-(c_A + c_B)``. One sample makes the
``F × d`` matrix of a bin's row differences rank one and proportional to its bias
differences; two or more samples (whose probe ratios ``g_An / g_Bn`` differ) make it
rank two. A bin is reported only when the rank-one fit explains it. The third family
makes the block's output term ``Σ_f c_f Σ_i h_fi`` cancel, so at the shipped weights
the rigged model computes exactly the task model.

The block works on any sample shape: images of any size and channel count (the
measurement and the readout act on the flattened sample) and tabular rows ``(d,)``
(readouts of rows are not clipped to [0, 1]; the ``dct`` measurement needs images).

What holds exactly: one local SGD step per party, with or without momentum (the first
momentum step is the plain gradient) and with any FedAvg weights. Weight decay adds
``-lr·wd·b_i`` to the biases (negligible against the data term at the defaults); Adam
normalises each coordinate and breaks the ratio; more local steps change the rows
between steps and blur the differences (measured in ``privfl.bench.imprint``).

Modules
-------
``block``
    :class:`ImprintBlock`, :class:`RiggedModel`, :func:`rig_model` and the block's layout
    (:class:`ImprintInfo`, the measurement, the bin edges).
``sizing``
    The samples an attack round puts in the aggregate, the bins for a target fraction and
    the rounding noise of secure aggregation.
``readout``
    :func:`reconstruct_from_update` and the attacker's unverified fallback
    :func:`strongest_bins_readout`.

The evaluator that scores a readout against the true samples is
:mod:`privfl.evaluation.imprint`.
"""

from __future__ import annotations

from privfl.attacks.imprint.block import (
    BIAS_KEY,
    FAMILIES,
    IMAGE_SHAPE,
    WEIGHT_KEY,
    ImprintBlock,
    ImprintInfo,
    RiggedModel,
    bin_edges,
    measurement_vector,
    rig_model,
)
from privfl.attacks.imprint.readout import (
    ImprintReconstruction,
    reconstruct_from_update,
    state_update,
    strongest_bins_readout,
)
from privfl.attacks.imprint.sizing import (
    aggregate_noise_std,
    attack_round_scenario,
    bins_for_fraction,
    expected_fraction,
    imprint_bins_of,
    imprinted_samples,
    samples_per_round,
    summed_parties,
)

__all__ = [
    "BIAS_KEY",
    "FAMILIES",
    "IMAGE_SHAPE",
    "WEIGHT_KEY",
    "ImprintBlock",
    "ImprintInfo",
    "ImprintReconstruction",
    "RiggedModel",
    "aggregate_noise_std",
    "attack_round_scenario",
    "bin_edges",
    "bins_for_fraction",
    "expected_fraction",
    "imprint_bins_of",
    "imprinted_samples",
    "measurement_vector",
    "reconstruct_from_update",
    "rig_model",
    "samples_per_round",
    "state_update",
    "strongest_bins_readout",
    "summed_parties",
]
