"""Malicious servers that break the protocol to reach the parties' private inputs.

Each attack is an outermost strategy wrapper, like
:class:`~privfl.strategies.curious_server.CuriousServer`: the attacker *is* the server
and sees exactly what the server sees. Unlike the curious server it acts: it rewrites
the train messages of a round, hands the strategies it wraps a :class:`ServerGrid` whose
stage exchanges it may rewrite and read, and sends messages of its own. It never reads
ground truth: what it recovered is scored by
:class:`privfl.attacks.active_server.ActiveServerEvaluator`.

==========================  =======================================================
class (``method``)          what the server does
==========================  =======================================================
DowngradeServer             asks for a round without secure aggregation or DP
NoiseStripServer            regenerates distributed-DP noise keyed from the seed
KeyMitmServer               forges the key directory, relays shares in the middle
IsolationServer             re-runs a finished sum without the target
RoundReplayServer           replays a finished round: the pairwise masks repeat
ModelInconsistencyServer    sends all but the target a model whose ReLUs are dead
==========================  =======================================================

A party that refuses (``privfl.clients.policy``) answers with an error reply; the
attacker records the refusal, skips what cannot finish, and the run ends normally.

Every class takes explicit keyword parameters (the attack round, the target, what the
attack needs of its own) and wraps the strategies it subverts; ``from_scenario`` (and
:func:`build_active_server`) reads them from ``attack.active_server``.

Modules
    * ``base`` — :class:`ActiveServer` (the relay, the transcript, the refusals, the
      report), :class:`ServerGrid`, :class:`Exchange`, :class:`Refusal`, ``ROLE`` and
      ``SERVER_ROUND``.
    * ``downgrade`` — :class:`DowngradeServer` and :func:`downgraded_scenario`.
    * ``noise_strip`` — :class:`NoiseStripServer`.
    * ``key_mitm`` — :class:`KeyMitmServer`.
    * ``isolation`` — :class:`IsolationServer`.
    * ``round_replay`` — :class:`RoundReplayServer`.
    * ``model_inconsistency`` — :class:`ModelInconsistencyServer` and
      :func:`dead_relu_model`.
    * ``registry`` — ``ACTIVE_SERVERS`` (method -> class) and :func:`build_active_server`.
"""

from __future__ import annotations

from privfl.strategies.active_server.base import (
    ROLE,
    SERVER_ROUND,
    ActiveServer,
    Exchange,
    Refusal,
    Relay,
    ServerGrid,
)
from privfl.strategies.active_server.downgrade import DowngradeServer, downgraded_scenario
from privfl.strategies.active_server.isolation import IsolationServer
from privfl.strategies.active_server.key_mitm import KeyMitmServer
from privfl.strategies.active_server.model_inconsistency import (
    ModelInconsistencyServer,
    dead_relu_model,
)
from privfl.strategies.active_server.noise_strip import NoiseStripServer
from privfl.strategies.active_server.registry import ACTIVE_SERVERS, build_active_server
from privfl.strategies.active_server.round_replay import RoundReplayServer

__all__ = [
    "ACTIVE_SERVERS",
    "ROLE",
    "SERVER_ROUND",
    "ActiveServer",
    "DowngradeServer",
    "Exchange",
    "IsolationServer",
    "KeyMitmServer",
    "ModelInconsistencyServer",
    "NoiseStripServer",
    "Refusal",
    "Relay",
    "RoundReplayServer",
    "ServerGrid",
    "build_active_server",
    "dead_relu_model",
    "downgraded_scenario",
]
