"""Query-only membership inference: quantile regression (QMIA), LOSS and offline LiRA.

Threat model: the attacker can send images to the target and read its outputs (logits),
nothing else — :class:`QueryAPI` is the whole of its view. It also holds public data from
the same distribution that it knows was not trained on.

Attacks (all scores: higher = "member"):

- :class:`QuantileMIA` (Bertran et al., NeurIPS 2023): a regressor trained on public
  non-members predicts, for each (image, label), quantiles of the target's hinge score at
  many levels near 1. A record whose score exceeds its predicted ``1 - α`` quantile is
  flagged at FPR ``α``; no shadow model is trained. Optionally (``mimics``) the
  regressor works around a location: the hinge of mimics distilled from the target's
  logits on the same public records, so it only has to model what they miss.
- :func:`loss_attack` (Yeom et al. 2018): the negated cross-entropy, one global threshold
  calibrated on the public scores.
- :class:`OfflineLiRA` (Carlini et al. 2022): shadow models trained on public subsets give
  each target record a Gaussian of OUT scores; the one-sided z-score is the statistic.

Rooms: :mod:`.query` (the view and the logit scores), :mod:`.qmia`, :mod:`.lira`,
:mod:`.classifier` (training shared by shadow models and targets). The harness that
trains targets, knows the members and scores the attacks is an evaluator:
:func:`privfl.evaluation.membership.run_membership`.
"""

from privfl.attacks.membership.classifier import train_classifier
from privfl.attacks.membership.lira import OfflineLiRA, lira_offline_scores
from privfl.attacks.membership.qmia import QuantileMIA, quantile_alphas
from privfl.attacks.membership.query import (
    LabelledImages,
    LabelledTensors,
    QueryAPI,
    hinge_score,
    loss_attack,
)

__all__ = [
    "LabelledImages",
    "LabelledTensors",
    "OfflineLiRA",
    "QuantileMIA",
    "QueryAPI",
    "hinge_score",
    "lira_offline_scores",
    "loss_attack",
    "quantile_alphas",
    "train_classifier",
]
