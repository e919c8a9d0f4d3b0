"""The deployment engine's error: a process failed or timed out, or a value cannot travel."""

from __future__ import annotations

from privfl.errors import UserError


class DeploymentError(UserError):
    """The deployment engine could not run the scenario (a process failed or timed out)."""
