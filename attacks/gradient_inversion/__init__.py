"""Gradient inversion: rebuild a party's training batch from the update it sent.

Threat model: an honest-but-curious server that knows the model architecture and the
weights it sent (always), plus what :class:`AttackerKnowledge` states explicitly. The
attack functions receive only the model, the observed update and that knowledge; they
never see the party's data.

Methods
-------
``dlg``
    Deep Leakage from Gradients (Zhu et al., 2019): dummy images (and, unless the labels
    are fixed, soft labels) optimised with L-BFGS on the squared L2 gradient distance.
``idlg``
    iDLG (Zhao et al., 2020): the label of a batch of one read from the sign of the last
    layer's gradient, then DLG on the image only.
``inverting-gradients``
    Geiping et al. (2020): cosine gradient distance over all layers plus a
    total-variation prior, Adam on the signed gradient with a stepped step size, box
    constraint [0, 1], the best of several random starts kept by its gradient distance.
    For a FedAvg update it unrolls the party's local steps, each on its own batch of
    the dummy images (``multi_step="simulate"``, :attr:`AttackerKnowledge.samples`).
``feature-span``
    Reads the first dense layer's update as a sum of one rank-one term per sample and
    peels the local steps off one at a time: the samples' features are vertices of the
    non-negative cone of its row space, the right vertices, labels and steps pass an exact
    test against its column space, and each feature is inverted through the layers below
    (:func:`feature_span`; related to the Cocktail Party Attack, Kariyappa et al., 2023).

Labels of larger batches are recovered first (:func:`recover_labels`, count-based from
the last-layer bias gradient, with the batch's mean prediction estimated on the
attacker's public images when it has them) and then held fixed, which removes most of
DLG's label/image ambiguity. One local SGD step gives the gradient exactly
(``Δ = −lr·g``); with several steps the update is inverted either as the average
gradient (``multi_step="average"``) or by unrolling the local steps
(``multi_step="simulate"``), as Inverting Gradients does for FedAvg. The party's SGD
momentum and weight decay, which the server sets with lr, are applied as the party's
optimiser applies them (:attr:`AttackerKnowledge.momentum`, ``weight_decay``).

Modules
-------
``knowledge``
    :class:`AttackerKnowledge` (what the attacker is handed) and :class:`Reconstruction`.
``objective``
    :func:`gradient_from_update`, the attacked model called functionally (one batch or the
    unrolled local steps) and the gradient distances and priors.
``labels``
    :func:`recover_labels` from the output layer's gradient.
``dlg``
    :func:`dlg`, :func:`idlg` and :func:`duplicate_pairs`.
``inverting``
    :func:`inverting_gradients` and :func:`spread_labels` (the FedAvg simulation).
``span``
    :func:`feature_span`, the feature-span peeling of a whole FedAvg update.
``update``
    :func:`invert_update`, the curious server's entry point.
"""

from __future__ import annotations

from privfl.attacks.gradient_inversion.dlg import dlg, duplicate_pairs, idlg
from privfl.attacks.gradient_inversion.inverting import inverting_gradients, spread_labels
from privfl.attacks.gradient_inversion.knowledge import (
    AttackerKnowledge,
    LabelRecovery,
    Method,
    MultiStep,
    Reconstruction,
)
from privfl.attacks.gradient_inversion.labels import recover_labels
from privfl.attacks.gradient_inversion.objective import gradient_from_update
from privfl.attacks.gradient_inversion.span import SpanError, feature_span
from privfl.attacks.gradient_inversion.update import invert_update

__all__ = [
    "AttackerKnowledge",
    "LabelRecovery",
    "Method",
    "MultiStep",
    "Reconstruction",
    "SpanError",
    "dlg",
    "duplicate_pairs",
    "feature_span",
    "gradient_from_update",
    "idlg",
    "invert_update",
    "inverting_gradients",
    "recover_labels",
    "spread_labels",
]
