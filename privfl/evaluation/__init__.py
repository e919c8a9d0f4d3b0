"""Evaluators: they hold the ground truth an attacker never sees (which records are members,
what a party trained on) and score what an attack recovered.

``membership``
    :func:`~privfl.evaluation.membership.run_membership`, the harness that trains the
    targets, knows the members and scores the membership attacks.
``inversion``
    :class:`~privfl.evaluation.inversion.InversionEvaluator`: a curious server's
    gradient inversion against the batch the target party trained on.
``imprint``
    :func:`~privfl.evaluation.imprint.evaluate_imprint`, the scorer of the imprint
    attacks; :class:`~privfl.evaluation.imprint.ImprintServerEvaluator` (a malicious
    server) and :func:`~privfl.evaluation.imprint.participant_report` (a malicious
    participant).
"""
