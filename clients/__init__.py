"""Flower ClientApp and mods: the honest party, its policy, secure aggregation, DP-SGD,
the malicious participant, and the honest trainer (``train_local`` with a
``TrainConfig``)."""

from __future__ import annotations

from privfl.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
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
        "SecAggSettings": "privfl.clients.secagg",
        "clip_update_mod": "privfl.clients.dp_mods",
        "make_clip_update_mod": "privfl.clients.dp_mods",
        "dp_sgd_round": "privfl.clients.dp_sgd",
        "train_dp_sgd": "privfl.dp.sgd",
        "BudgetExhaustedError": "privfl.dp.sgd",
        "participant_mod": "privfl.clients.malicious_participant",
        "TrainConfig": "privfl.training",
        "train_local": "privfl.training",
    },
)
