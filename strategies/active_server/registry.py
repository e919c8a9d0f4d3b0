"""The protocol-breaking servers by ``attack.active_server.method``, and the builder."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import Strategy

from privfl.config import Scenario
from privfl.strategies.active_server.base import ActiveServer
from privfl.strategies.active_server.downgrade import DowngradeServer
from privfl.strategies.active_server.isolation import IsolationServer
from privfl.strategies.active_server.key_mitm import KeyMitmServer
from privfl.strategies.active_server.model_inconsistency import ModelInconsistencyServer
from privfl.strategies.active_server.noise_strip import NoiseStripServer
from privfl.strategies.active_server.round_replay import RoundReplayServer

ACTIVE_SERVERS: dict[str, type[ActiveServer]] = {
    cls.method: cls
    for cls in (
        DowngradeServer,
        NoiseStripServer,
        KeyMitmServer,
        IsolationServer,
        RoundReplayServer,
        ModelInconsistencyServer,
    )
}


def build_active_server(
    strategy: Strategy, *, scenario: Scenario, party_of: Mapping[int, int]
) -> ActiveServer:
    """The malicious server ``attack.active_server.method`` names, wrapping ``strategy``
    (its ``from_scenario``)."""
    method = scenario.attack.active_server.method
    if method not in ACTIVE_SERVERS:
        raise ValueError(
            f"attack.active_server.method: unknown method {method!r}; accepted: "
            f"{', '.join(ACTIVE_SERVERS)}"
        )
    return ACTIVE_SERVERS[method].from_scenario(strategy, scenario, party_of=party_of)
