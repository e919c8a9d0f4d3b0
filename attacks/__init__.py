"""Attack algorithms: gradient inversion, imprint-layer extraction, membership inference,
and the evaluator of the protocol-breaking servers."""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it; imported on first use, so importing the
# package costs nothing and no module here is pulled into an import cycle.
_EXPORTS = {
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
    "run_membership": "privfl.attacks.membership",
    "ActiveServerEvaluator": "privfl.attacks.active_server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
