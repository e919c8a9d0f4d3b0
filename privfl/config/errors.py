"""The error every scenario check raises, naming the key it is about."""

from __future__ import annotations

import typing

from privfl.errors import UserError


class ScenarioError(UserError, ValueError):
    """A scenario file or override is invalid; the message names the key."""


def _fail(key: str, msg: str) -> typing.NoReturn:
    raise ScenarioError(f"{key}: {msg}")
