"""Side records: the public records a party attaches to its train reply.

A party writes ``privfl.side.<name>`` (:func:`key`) next to its update: the ε it has
spent, what a malicious participant exfiltrates. They are public by design: secure
aggregation and the DP global update forward them untouched while the update itself is
summed. Once a reply is merged with others, a record is tagged with the node it came
from, ``privfl.side.<node>.<name>`` (:func:`tagged`); tagging is idempotent, so every
layer may tag what it forwards and the final name is always the same. Names start with
a letter, node ids are digits: the two forms cannot be confused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict

PREFIX = "privfl.side."
EPSILON = "dp-epsilon"  # the ε a party has spent, by its own account
IMPRINT = "imprint"  # what a malicious participant read out of the aggregate


def key(name: str) -> str:
    """The content key under which a party sends the side record ``name``."""
    if not name or not name[0].isalpha():
        raise ValueError(f"a side record's name starts with a letter, got {name!r}")
    return PREFIX + name


def is_side(content_key: str) -> bool:
    """Whether a content key is a side record (tagged or not)."""
    return content_key.startswith(PREFIX)


def _split(content_key: str) -> tuple[int | None, str]:
    rest = content_key[len(PREFIX) :]
    head, dot, tail = rest.partition(".")
    if dot and head.isdigit():
        return int(head), tail
    return None, rest


def name_of(content_key: str) -> str:
    """The record's name, without prefix or node tag."""
    return _split(content_key)[1]


def node_of(content_key: str) -> int | None:
    """The node a tagged record came from (None: untagged)."""
    return _split(content_key)[0]


def tagged(content_key: str, node: int) -> str:
    """``privfl.side.<node>.<name>``; a key that already names its node is kept."""
    known, name = _split(content_key)
    return f"{PREFIX}{known if known is not None else node}.{name}"


def records_of(content: RecordDict) -> dict[str, Any]:
    """The side records of one message's content, keys as they are."""
    return {k: rec for k, rec in content.items() if is_side(k)}


def collect(replies: Iterable[Message]) -> dict[str, Any]:
    """Every side record of error-free replies, each tagged with the node it came from."""
    out: dict[str, Any] = {}
    for msg in replies:
        if msg.has_error() or not msg.has_content():
            continue
        for k, rec in records_of(msg.content).items():
            out[tagged(k, msg.metadata.src_node_id)] = rec
    return out
