"""The base of every error a user can fix by changing what they asked for."""

from __future__ import annotations


class UserError(Exception):
    """A bad scenario value, a missing or corrupt data file, an unusable run folder, a
    device that is not there: the message names the key, file or party and says what
    would be accepted. The command line prints it without a traceback (``-v`` shows one).
    """
