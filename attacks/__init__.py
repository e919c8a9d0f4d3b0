"""Attack algorithms: gradient inversion, imprint-layer extraction, membership inference,
and the evaluator of the protocol-breaking servers."""

from __future__ import annotations

from privfl.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "dlg": "privfl.attacks.gradient_inversion",
        "idlg": "privfl.attacks.gradient_inversion",
        "inverting_gradients": "privfl.attacks.gradient_inversion",
        "invert_update": "privfl.attacks.gradient_inversion",
        "rig_model": "privfl.attacks.imprint",
        "reconstruct_from_update": "privfl.attacks.imprint",
        "QueryAPI": "privfl.attacks.membership",
        "QuantileMIA": "privfl.attacks.membership",
        "OfflineLiRA": "privfl.attacks.membership",
        "loss_attack": "privfl.attacks.membership",
        "run_membership": "privfl.evaluation.membership",
        "ActiveServerEvaluator": "privfl.attacks.active_server",
    },
)
