"""Secure aggregation: authenticated channels, PRG, Shamir, additive and masking protocols.

The protocol classes are plain state machines (no Flower inside); the Flower wiring is
:mod:`privfl.strategies.secure_aggregation` (server) and :mod:`privfl.clients.secagg`
(client mod).
"""

from privfl.secagg.additive import AdditiveParty, AdditiveServer, RoundAbortedError
from privfl.secagg.channel import ChannelError, SecureChannel
from privfl.secagg.masking import MaskingError, MaskingParty, MaskingServer, neighbourhoods

__all__ = [
    "AdditiveParty",
    "AdditiveServer",
    "ChannelError",
    "MaskingError",
    "MaskingParty",
    "MaskingServer",
    "RoundAbortedError",
    "SecureChannel",
    "neighbourhoods",
]
