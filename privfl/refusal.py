"""Refusals and divergence: what a party sends instead of anything derived from its data.

A refusal is a Flower error reply whose code is :data:`REFUSAL_CODE` and whose reason
starts with :data:`REFUSAL_PREFIX`, so any Flower strategy drops it like a failed reply
while privfl's strategies record why.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.app.error import Error

from privfl.errors import PrivflError

# Error code of a refusal reply; its reason says what was refused and why.
REFUSAL_CODE = 4403
REFUSAL_PREFIX = "privfl refusal: "


class RefusalError(PrivflError, RuntimeError):
    """A party refuses a server request; the message says what the policy forbids."""


def refusal_reply(msg: Message, reason: str) -> Message:
    """The reply a party sends instead of anything derived from its data."""
    return Message(Error(code=REFUSAL_CODE, reason=REFUSAL_PREFIX + reason), reply_to=msg)


def refusal_reason(reply: Message) -> str | None:
    """The reason of a refusal reply, or None for any other reply."""
    if not reply.has_error():
        return None
    reason = str(reply.error.reason or "")
    if reply.error.code == REFUSAL_CODE or reason.startswith(REFUSAL_PREFIX):
        return reason.removeprefix(REFUSAL_PREFIX)
    return None


# Error code of a party whose local training produced non-finite weights.
DIVERGED_CODE = 4422
DIVERGED_PREFIX = "privfl diverged: "


def diverged_reply(msg: Message, reason: str) -> Message:
    """The reply of a party whose training diverged (it sends no weights)."""
    return Message(Error(code=DIVERGED_CODE, reason=DIVERGED_PREFIX + reason), reply_to=msg)


def diverged_reason(reply: Message) -> str | None:
    """The reason of a divergence reply, or None for any other reply."""
    if not reply.has_error():
        return None
    reason = str(reply.error.reason or "")
    if reply.error.code == DIVERGED_CODE or reason.startswith(DIVERGED_PREFIX):
        return reason.removeprefix(DIVERGED_PREFIX)
    return None
