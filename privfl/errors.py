"""privfl's exceptions: one base, :class:`PrivflError`, so that a caller can catch
everything privfl raises on purpose; :class:`UserError` for what a user fixes by changing
what they asked for."""

from __future__ import annotations


class PrivflError(Exception):
    """The base of every exception privfl raises on purpose (a protocol fault, a refusal, a
    bad input); anything else escaping privfl is a bug."""


class UserError(PrivflError):
    """A bad scenario value, a missing or corrupt data file, an unusable run folder, a
    device that is not there: the message names the key, file or party and says what
    would be accepted. The command line prints it without a traceback (``-v`` shows one).
    """
