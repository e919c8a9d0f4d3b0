"""Flower ClientApp and mods: the honest party, its policy, secure aggregation, DP-SGD,
the malicious participant."""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it; imported on first use, so importing the
# package costs nothing and no module here is pulled into an import cycle.
_EXPORTS = {
    "make_client_app": "privfl.clients.app",
    "node_policy": "privfl.clients.app",
    "PartyPolicy": "privfl.clients.policy",
    "make_policy_mod": "privfl.clients.policy",
    "simulation_policy": "privfl.clients.policy",
    "party_record": "privfl.clients.policy",
    "lab_secret": "privfl.clients.policy",
    "secagg_mod": "privfl.clients.secagg",
    "make_secagg_mod": "privfl.clients.secagg",
    "register_secure_aggregation": "privfl.clients.secagg",
    "clip_update_mod": "privfl.clients.dp_mods",
    "dp_sgd_round": "privfl.clients.dp_sgd",
    "train_dp_sgd": "privfl.clients.dp_sgd",
    "BudgetExhaustedError": "privfl.clients.dp_sgd",
    "participant_mod": "privfl.clients.malicious_participant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
